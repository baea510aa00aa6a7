"""Evaluation of a classifier on a split: metrics, confusion matrix (table and PNG), report text."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from storage.errors import ParameterError
from storage.files import atomic_path, atomic_write

OUTCOME_COLUMNS = ("path", "sha256", "label", "predicted", "correct")


def scores_of(model, X: np.ndarray) -> np.ndarray:
    """Class probabilities (or decision scores where the model has no probabilities), one row per image."""
    X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)
    s = model.decision_function(X)
    return np.stack([-s, s], 1) if s.ndim == 1 else s


def predicted(scores: np.ndarray, model_classes: np.ndarray | None = None) -> np.ndarray:
    """The predicted class of each row of ``scores`` (columns: ``model_classes``, default 0..k-1)."""
    idx = np.argmax(scores, axis=1)
    return idx if model_classes is None else np.asarray(model_classes)[idx]


def write_outcomes(path: str | Path, paths: Sequence[str], sha256: Sequence[str], labels: Sequence[int],
                   predicted: Sequence[int]) -> Path:
    """One CSV row per evaluated image: what the model said about it, and whether it was right."""
    lines = [",".join(OUTCOME_COLUMNS)]
    for p, h, y, q in zip(paths, sha256, labels, predicted):
        p = str(p)
        if any(c in p for c in ',"\n\r'):
            p = '"' + p.replace('"', '""') + '"'
        lines.append(f"{p},{h},{int(y)},{int(q)},{int(int(y) == int(q))}")
    path = Path(path)
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def read_outcomes(path: str | Path) -> dict[tuple[str, str], tuple[int, bool]]:
    """``{(path, sha256): (label, correct)}`` from an outcomes file."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ParameterError(f"cannot read the per-image outcomes {path}: {exc}. Evaluate the model again "
                             "(it writes them beside its report).") from None
    try:
        return {(r["path"], r["sha256"]): (int(r["label"]), r["correct"] == "1") for r in rows}
    except (KeyError, ValueError) as exc:
        raise ParameterError(f"{path} is not an outcomes file (columns {', '.join(OUTCOME_COLUMNS)}): {exc}. "
                             "Evaluate the model again.") from None


def evaluate(model, X: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1, top-k (more than 5
    classes), and the confusion matrix (rows: true class, columns: predicted), over ``class_names``."""
    labels = np.arange(len(class_names))
    return evaluate_scores(scores_of(model, X), y, class_names, np.asarray(getattr(model, "classes_", labels)))


def evaluate_scores(scores: np.ndarray, y: np.ndarray, class_names: Sequence[str],
                    model_classes: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`evaluate` from precomputed class scores (one column per entry of ``model_classes``,
    by default one per class)."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support, top_k_accuracy_score)

    labels = np.arange(len(class_names))
    model_classes = labels if model_classes is None else np.asarray(model_classes)
    pred = predicted(scores, model_classes)
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "images": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels[support > 0], average="macro", zero_division=0)),
        "per_class": [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i, c in enumerate(class_names)],
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    if len(class_names) > 5:
        k = 5
        full = np.zeros((len(y), len(class_names)))
        full[:, model_classes] = scores
        out[f"top{k}_accuracy"] = float(top_k_accuracy_score(y, full, k=k, labels=labels))
    return out


def new_figure(*grid: int, figsize: tuple[float, float]):
    """A figure and its axes (``grid``: rows, columns), without pyplot: no global figure registry to
    leak into or to lock across threads, and pyplot's import (a fair share of a short command) is
    skipped. PNGs are drawn by Agg when saved."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def save_png(fig, path: str | Path) -> Path:
    """Save a figure as PNG under a temporary name, then rename it into place."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                   title: str = "Confusion matrix") -> Path:
    """Write the confusion matrix as a PNG (counts, rows normalised for the colours)."""
    cm = np.asarray(confusion, dtype=float)
    n = len(class_names)
    size = max(4.0, min(0.45 * n + 3, 20.0))
    fig, ax = new_figure(figsize=(size, size * 0.85))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return save_png(fig, path)


def plot_scores_by(x_labels: Sequence[str], means: Sequence[float], stds: Sequence[float], path: str | Path,
                   title: str, xlabel: str, ylabel: str = "CV balanced accuracy", best: int | None = None) -> Path:
    """A bar plot with error bars (layer sweep, C search)."""
    fig, ax = new_figure(figsize=(max(5.0, 0.7 * len(x_labels) + 2), 4))
    colors = ["tab:orange" if i == best else "tab:blue" for i in range(len(x_labels))]
    ax.bar(range(len(x_labels)), means, yerr=stds, color=colors, capsize=4)
    ax.set_xticks(range(len(x_labels)), x_labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)
