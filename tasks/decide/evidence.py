"""Is one model really better than another? Paired evidence on the same test images.

Each evaluation writes an *outcomes* file: one row per image (path, content hash, true label,
predicted label, correct). Two models judged on the same images are compared image by image:

* the accuracy difference ``b - a`` over the images both were evaluated on;
* a **paired bootstrap** interval of that difference (images resampled with replacement, the same
  draw for both models, so that images both get right or both get wrong add no noise);
* **McNemar's exact test** on the discordant images (one model right, the other wrong).

A decision that promotes ``b`` needs the margin *and* an interval whose lower end is above zero:
a difference inside the noise keeps the incumbent (the cheaper model, or the champion). A negative
margin (accept ``b`` unless it is worse by more than that) needs the lower end above the margin.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

import numpy as np

from storage.errors import ParameterError

from ..reports.evaluate import read_outcomes

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``mean(b) - mean(a)`` for paired 0/1 outcomes, resampling images."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    d = b - a
    diffs = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory: 256 resamples at a time
        stop = min(resamples, start + 256)
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return float(lo), float(hi)


def mcnemar_exact(b_only: int, a_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: scipy's exact binomial test, p = 1/2."""
    n = b_only + a_only
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b_only, n, 0.5).pvalue)


def compare(a_outcomes: str | Path, b_outcomes: str | Path, *, exclude: Collection[str] = (),
            resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Any]:
    """Model ``b`` against model ``a`` on the images both were evaluated on (minus content hashes in
    ``exclude``): both accuracies, their difference ``b - a``, its paired bootstrap interval and
    McNemar's p-value. Raises ParameterError when they share no image, or labels disagree."""
    a, b = read_outcomes(a_outcomes), read_outcomes(b_outcomes)
    exclude = set(exclude)
    keys = sorted(k for k in a.keys() & b.keys() if k[1] not in exclude)
    if not keys:
        raise ParameterError(f"the two models share no evaluated image ({a_outcomes} and {b_outcomes}"
                             + (f", {len(exclude)} excluded" if exclude else "") + "); judge them on the same "
                             "test split.")
    wrong = [k for k in keys if a[k][0] != b[k][0]]
    if wrong:
        raise ParameterError(f"{len(wrong)} images have different labels in {a_outcomes} and {b_outcomes} (e.g. "
                             f"{wrong[0][0]}): the two evaluations used different class lists. Evaluate both on "
                             "the same data.")
    ca = np.array([a[k][1] for k in keys], float)
    cb = np.array([b[k][1] for k in keys], float)
    lo, hi = paired_bootstrap(ca, cb, resamples, level, seed)
    b_only, a_only = int(np.sum((cb == 1) & (ca == 0))), int(np.sum((ca == 1) & (cb == 0)))
    return {"images": len(keys), "a_accuracy": float(ca.mean()), "b_accuracy": float(cb.mean()),
            "difference": float(cb.mean() - ca.mean()), "interval": [lo, hi], "level": level,
            "resamples": resamples, "b_only_correct": b_only, "a_only_correct": a_only,
            "mcnemar_p": mcnemar_exact(b_only, a_only),
            "excluded": len([k for k in a.keys() & b.keys() if k[1] in exclude])}


def clear_win(comparison: dict[str, Any], margin: float, strict: bool = False) -> bool:
    """``b`` beats ``a``: the difference reaches ``margin`` (exceeds it when ``strict``) and the
    interval's lower end is above zero. A negative margin asks only that ``b`` be no worse than
    ``a`` by more than ``-margin``: the lower end must then be above the margin (non-inferiority)."""
    d = comparison["difference"]
    return (d > margin if strict else d >= margin) and comparison["interval"][0] > min(margin, 0.0)


def describe(comparison: dict[str, Any], a_name: str, b_name: str, split: str) -> str:
    lo, hi = comparison["interval"]
    return (f"{b_name} {comparison['b_accuracy']:.3f} vs {a_name} {comparison['a_accuracy']:.3f} on "
            f"{comparison['images']} {split} images: difference {comparison['difference']:+.3f}, "
            f"{100 * comparison['level']:.0f}% paired bootstrap interval [{lo:+.3f}, {hi:+.3f}], "
            f"McNemar p = {comparison['mcnemar_p']:.3g}")
