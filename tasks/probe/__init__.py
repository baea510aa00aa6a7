"""Linear probes on CNN codes (cases 1 and 2): :mod:`.linear` trains scikit-learn classifiers (the C
search, chunked SGD for stores larger than memory); :mod:`.train` reads a store's groups, fits,
registers, evaluates and reports a probe, and sweeps layers."""
from .train import evaluate_probe, fit_probe, metrics_markdown, resolve_groups, sweep_layers

__all__ = ["evaluate_probe", "fit_probe", "metrics_markdown", "resolve_groups", "sweep_layers"]
