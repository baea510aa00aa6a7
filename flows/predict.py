"""Flow ``predict``: new images -> codes exactly as the model was trained on -> predictions file."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.prefect_tasks import predict_images
from tasks.results import PredictResult
from tasks.settings import Output
from tasks.runtime import use_backend


@flow(name="predict", log_prints=True, flow_run_name="predict {images} with {model}")
def predict(images: str, model: str, version: str | None = None, output: Output = Output(),
            predictions: str | None = None, batch_size: int = 32, group_by: str | None = None) -> PredictResult:
    """Predict ``images`` (folder, image, or .txt/.csv list) with registered ``model`` (``version``:
    a number, an alias such as ``champion``, or the latest) from ``output.registry``. Writes CSV or
    Parquet by ``predictions``' suffix (default: OUT/predictions/<model>.csv). ``group_by``: the groups (a
    regular expression on file names) a model trained with ``--adapt-batchnorm`` adapts to one by one."""
    use_backend(output.backend)  # Keras's backend for this process: before anything imports Keras
    path = predictions or str(Path(output.out) / "predictions" / f"{model}.csv")
    result = PredictResult(**predict_images(images, output.registry_path, model, version, path,
                                            {"batch_size": batch_size}, group_by))
    print(f"{result.images} images predicted ({result.reused} codes reused from the training store, "
          f"{result.computed} computed, {len(result.skipped)} skipped): {result.predictions}")
    if result.adaptation:
        a = result.adaptation
        print(f"BatchNormalization statistics adapted to {len(a['adapted_groups'])} group(s) (AdaBN); "
              f"{len(a['kept_groups'])} group(s) under {a['min_images']} files kept the trained statistics")
    return result
