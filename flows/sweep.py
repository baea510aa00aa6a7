"""Flow ``sweep``: which layer's codes carry the signal? (the evidence for case 2's earlier layer)"""
from __future__ import annotations


from prefect import flow

from tasks.probe.linear import SWEEP_PROBE, LinearConfig
from tasks.results import SweepResult
from tasks.settings import Output
from tasks.prefect_tasks import sweep_layers


__all__ = ["SWEEP_PROBE", "sweep"]


@flow(name="sweep", log_prints=True, flow_run_name="sweep {store}")
def sweep(store: str, layers: list[str] | None = None, pooling: str | None = None,
          linear: LinearConfig = SWEEP_PROBE, output: Output = Output(), max_images: int | None = None) -> SweepResult:
    """Cross-validate the same probe on each layer group of ``store`` (all groups when ``layers`` is
    empty; only ``pooling`` groups when given) and name the best; ``max_images`` caps the images per layer
    with a stratified sample. The probe's C is fixed (``linear.C``, 0.1 unless set): a search per layer
    would compare searches, not layers. Returns the table, the best group and the report and plot paths."""
    if linear.C is None:
        linear = linear.model_copy(update={"C": SWEEP_PROBE.C})
    result = SweepResult(**sweep_layers(store, layers, pooling, linear.as_dict(), output.reports, max_images))
    for r in result.rows:
        print(f"{r['layer']}/{r['pooling']}: {r['mean']:.3f} ± {r['std']:.3f}")
    print(f"best: {result.best['layer']}/{result.best['pooling']}; report: {result.report}")
    return result
