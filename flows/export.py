"""Flow ``export``: a registered model (the champion by default) as one folder that serves without
cnncodes: a Keras file, a TensorFlow SavedModel or a TFLite file, its classes and a model card."""
from __future__ import annotations

from prefect import flow

from tasks.prefect_tasks import export_model
from tasks.results import ExportResult
from tasks.settings import ExportOptions, Output
from tasks.runtime import use_backend


@flow(name="export", log_prints=True, flow_run_name="export {model} as {options.format}")
def export(model: str, path: str, version: str | None = None, options: ExportOptions = ExportOptions(),
           output: Output = Output()) -> ExportResult:
    """Export registered ``model`` (``version``: a number or an alias; default the champion, else the
    latest) from ``output.registry`` into the folder ``path``."""
    use_backend(output.backend)  # Keras's backend for this process: before anything imports Keras
    result = ExportResult(**export_model(output.registry_path, model, version, path, options.as_dict()))
    print(f"exported {result.model} v{result.version} as {result.format}: {result.output}")
    return result
