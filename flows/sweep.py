"""Flow ``sweep``: which layer's codes carry the signal? (the evidence for case 2's earlier layer)"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.linear import LinearConfig
from tasks.prefect_tasks import sweep_layers


@flow(name="sweep", log_prints=True, flow_run_name="sweep {store}")
def sweep(store: str, layers: list[str] | None = None, pooling: str | None = None, classifier: str = "softmax",
          C: float = 0.1, cv_folds: int = 5, out: str = "cnncodes-out", seed: int = 0,
          max_images: int | None = None) -> dict:
    """Cross-validate the same probe on each layer group of ``store`` (all groups when ``layers`` is
    empty; only ``pooling`` groups when given) and name the best; ``max_images`` caps the images per layer
    with a stratified sample. Returns the table, the best group and the report and plot paths."""
    config = LinearConfig(classifier=classifier, C=C, cv_folds=cv_folds, seed=seed, calibrate=False).validate()
    result = sweep_layers(store, layers, pooling, config.as_dict(), str(Path(out) / "reports"), max_images)
    for r in result["rows"]:
        print(f"{r['layer']}/{r['pooling']}: {r['mean']:.3f} ± {r['std']:.3f}")
    print(f"best: {result['best']['layer']}/{result['best']['pooling']}; report: {result['report']}")
    return result
