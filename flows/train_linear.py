"""Flow ``train-linear``: a linear classifier on CNN codes from a feature store (cases 1 and 2).

Train on the store's train split (C chosen by stratified k-fold CV), register the model with its
provenance, evaluate it on every split, write the report with its plots.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.probe.linear import LinearConfig
from tasks.results import ProbeResult
from tasks.settings import Output
from tasks.prefect_tasks import evaluate_probe, fit_probe


@flow(name="train-linear", log_prints=True, flow_run_name="train-linear {linear.classifier} on {layer}")
def train_linear(
    store: str,
    layer: str,
    pooling: str | None = None,
    linear: LinearConfig = LinearConfig(),
    model_name: str | None = None,
    output: Output = Output(),
) -> ProbeResult:
    """Train, register and evaluate a linear probe on ``layer`` of ``store``.

    Returns ``{"model", "version", "C", "metrics": {split: {...}}, "report", "confusion_plots"}``."""
    registry = output.registry_path
    trained = fit_probe(store, layer, pooling, linear.as_dict(), registry, model_name)
    print(f"registered {trained['name']} v{trained['version']} (C={trained['C']:g}, "
          f"{trained['train_images']} training images, {trained['seconds']} s)")
    result = evaluate_probe(registry, trained["name"], trained["version"], store, output.reports)
    for split, m in result["metrics"].items():
        print(f"{split}: accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}, "
              f"macro-F1 {m['macro_f1']:.3f} on {m['images']} images")
    print(f"report: {result['report']}")
    return ProbeResult(model=trained["name"], version=trained["version"], C=trained["C"],
                       cv_scores=trained["cv_scores"], train_seconds=trained["seconds"], metrics=result["metrics"],
                       report=result["report"], confusion_plots=result["confusion_plots"],
                       registry=str(Path(registry).resolve()))
