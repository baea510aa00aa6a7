"""Flow ``predict``: new images -> codes exactly as the model was trained on -> predictions file."""
from __future__ import annotations

from prefect import flow

from tasks.prefect_tasks import predict_images


@flow(name="predict", log_prints=True, flow_run_name="predict {images} with {model}")
def predict(images: str, model: str, version: str | None = None, registry: str = "cnncodes-out/registry",
            output: str = "cnncodes-out/predictions.csv", batch_size: int = 32) -> dict:
    """Predict ``images`` (folder, image, or .txt/.csv list) with registered ``model`` (``version``:
    a number, an alias such as ``champion``, or the latest). Writes CSV or Parquet by ``output``'s suffix."""
    result = predict_images(images, registry, model, version, output, {"batch_size": batch_size})
    print(f"{result['images']} images predicted ({result['reused']} codes reused from the training store, "
          f"{result['computed']} computed, {len(result['skipped'])} skipped): {result['predictions']}")
    return result
