"""What each flow returns: typed, documented results.

Each result is a pydantic model: fields with types that the CLI prints and ``--json`` dumps, that a
notebook reads as attributes (``result.store``), and that Prefect shows as a flow run's result;
``result.as_dict()`` gives the JSON-ready values.
Nested details (metrics per split, per-class tables, timings) stay plain dicts: they are reports.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Result(BaseModel):
    """Base of every flow result: attributes, and :meth:`as_dict` for the JSON-ready values."""

    # extra keys are kept (optional details such as per-shard timings), never dropped
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (what ``--json`` prints)."""
        return self.model_dump(mode="json")


class ExtractResult(Result):
    """``extract-features``: the store brought up to date, and what it took."""

    store: str
    report: str | None = None
    manifest: str | None = None
    groups: list[dict[str, Any]]
    images: int
    classes: list[str]
    counts: dict[str, Any]
    computed: int
    reused: int
    removed: int
    up_to_date: bool
    skipped: list[dict[str, Any]]
    timings: dict[str, float]
    images_per_s: float | None = None
    forward_images_per_s: float | None = None
    backbone: str | None = None
    weights: str | None = None
    manifest_fingerprint: str


class ProbeResult(Result):
    """``train-linear``: the registered probe and its metrics per split."""

    model: str
    version: int
    C: float
    cv_scores: Any = None
    train_seconds: float
    metrics: dict[str, dict[str, Any]]
    report: str
    confusion_plots: dict[str, str]
    registry: str


class SweepResult(Result):
    """``sweep``: the cross-validated score of each layer group and the best one."""

    store: str
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    plot: str
    report: str


class PredictResult(Result):
    """``predict``: the predictions file and what went into it."""

    predictions: str
    images: int
    reused: int
    computed: int
    skipped: list[dict[str, Any]]
    model: str
    version: int
    class_counts: dict[str, int]
    adaptation: dict[str, Any] | None = None  # AdaBN per group (a fine-tuned model trained with it), else None


class FineTuneRunResult(Result):
    """``fine-tune``: the registered fine-tuned model, its metrics and where its run lives."""

    model: str
    version: int
    metrics: dict[str, dict[str, Any]]
    report: str
    learning_curves: str | None = None
    workdir: str
    skipped: list[dict[str, Any]]
    resumed_from_epoch: dict[str, int]
    stopped_early: bool | None = None
    registry: str


class TransferResult(Result):
    """``transfer``: the case and why, the models trained, the champion and the decision report."""

    case: int
    description: str
    decision: dict[str, Any]
    gate: dict[str, Any]
    champion: dict[str, Any]
    probe: dict[str, Any]
    finetuned: dict[str, Any] | None = None
    store: str
    sweep_plot: str
    registry: str
    report: str


class RetrainResult(Result):
    """``retrain``: whether a challenger was trained, and whether it became the champion."""

    retrained: bool
    reason: str
    champion: int
    images: int
    promoted: bool | None = None
    challenger: int | None = None
    decision: dict[str, Any] | None = None
    challenger_report: str | None = None
    extracted: int | None = None


class DemoResult(Result):
    """``demo``: the generated dataset, the transfer run on it, and predictions with its champion."""

    dataset: str
    transfer: TransferResult
    predict: PredictResult


class ExportResult(Result):
    """``export``: the folder written, what it holds, and the checks run on it."""

    output: str
    format: str
    model: str
    version: int
    files: list[str]
    classes: list[str]
    input_size: int
    outputs: str
    self_check: dict[str, Any]
    reload_check: dict[str, Any]
    test: dict[str, Any]
    int8: dict[str, Any] | None = None
