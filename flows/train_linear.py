"""Flow ``train-linear``: a linear classifier on CNN codes from a feature store (cases 1 and 2).

Train on the store's train split (C chosen by stratified k-fold CV), register the model with its
provenance, evaluate it on every split, write the report with its plots.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.linear import LinearConfig
from tasks.prefect_tasks import evaluate_probe, fit_probe


@flow(name="train-linear", log_prints=True, flow_run_name="train-linear {classifier} on {layer}")
def train_linear(
    store: str,
    layer: str,
    pooling: str | None = None,
    classifier: str = "softmax",
    C: float | None = None,
    cv_folds: int = 5,
    class_weight: str | None = None,
    l2_normalize: bool = False,
    pca: float | int | None = None,
    calibrate: bool = True,
    sgd_epochs: int = 5,
    chunk_rows: int = 8192,
    model_name: str | None = None,
    registry: str = "cnncodes-out/registry",
    out: str = "cnncodes-out",
    seed: int = 0,
) -> dict:
    """Train, register and evaluate a linear probe on ``layer`` of ``store``.

    Returns ``{"model", "version", "C", "metrics": {split: {...}}, "report", "confusion_plots"}``."""
    config = LinearConfig(classifier=classifier, C=C, cv_folds=cv_folds, class_weight=class_weight,
                          l2_normalize=l2_normalize, pca=pca, calibrate=calibrate, sgd_epochs=sgd_epochs,
                          chunk_rows=chunk_rows, seed=seed).validate()
    trained = fit_probe(store, layer, pooling, config.as_dict(), registry, model_name)
    print(f"registered {trained['name']} v{trained['version']} (C={trained['C']:g}, "
          f"{trained['train_images']} training images, {trained['seconds']} s)")
    result = evaluate_probe(registry, trained["name"], trained["version"], store, str(Path(out) / "reports"))
    for split, m in result["metrics"].items():
        print(f"{split}: accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}, "
              f"macro-F1 {m['macro_f1']:.3f} on {m['images']} images")
    print(f"report: {result['report']}")
    return {"model": trained["name"], "version": trained["version"], "C": trained["C"],
            "cv_scores": trained["cv_scores"], "train_seconds": trained["seconds"], "metrics": result["metrics"],
            "report": result["report"], "confusion_plots": result["confusion_plots"],
            "registry": str(Path(registry).resolve())}
