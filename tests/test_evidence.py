"""Paired evidence between two models on the same images: bootstrap interval, McNemar, alignment."""
from __future__ import annotations

import numpy as np
import pytest

from storage.errors import ParameterError
from tasks.decide import evidence
from tasks.reports.evaluate import read_outcomes, write_outcomes


def _write(path, correct, labels=None, ids=None):
    ids = ids if ids is not None else list(range(len(correct)))
    y = labels if labels is not None else [i % 3 for i in ids]
    pred = [t if c else (t + 1) % 3 for t, c in zip(y, correct)]
    return write_outcomes(path, [f"d/img,{i}.png" for i in ids], [f"{i:064x}" for i in ids], y, pred)


def test_outcomes_round_trip_with_awkward_paths(tmp_path):
    p = _write(tmp_path / "a.csv", [True, False, True])
    got = read_outcomes(p)
    assert got[("d/img,1.png", f"{1:064x}")] == (1, False) and len(got) == 3


def test_bootstrap_interval_covers_the_difference_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.7
    b = a | (rng.random(400) < 0.2)         # b is right wherever a is, and on some more
    lo, hi = evidence.paired_bootstrap(a, b, seed=1)
    d = b.mean() - a.mean()
    assert 0 < lo < d < hi
    lo_small, hi_small = evidence.paired_bootstrap(a[:50], b[:50], seed=1)
    assert hi_small - lo_small > hi - lo
    # identical models: a zero-width interval at zero
    assert evidence.paired_bootstrap(a, a) == (0.0, 0.0)


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    # by hand: twice the smaller tail of Binomial(n, 1/2), at most 1
    assert evidence.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert evidence.mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert evidence.mcnemar_exact(0, 7) == pytest.approx(2 / 2 ** 7)
    assert evidence.mcnemar_exact(3, 3) == 1.0
    assert evidence.mcnemar_exact(0, 0) == 1.0


def test_compare_aligns_images_and_refuses_mismatches(tmp_path):
    a = _write(tmp_path / "a.csv", [True] * 50 + [False] * 50)
    b = _write(tmp_path / "b.csv", [True] * 100, ids=list(range(99, -1, -1)))  # same images, other order
    c = evidence.compare(a, b)
    assert c["images"] == 100 and c["difference"] == pytest.approx(0.5) and c["b_only_correct"] == 50
    assert c["interval"][0] > 0.35 and evidence.clear_win(c, 0.01) and not evidence.clear_win(c, 0.6)
    # only the shared images count
    part = _write(tmp_path / "p.csv", [True] * 10, ids=list(range(10)))
    assert evidence.compare(a, part)["images"] == 10
    with pytest.raises(ParameterError, match="share no evaluated image"):
        evidence.compare(a, _write(tmp_path / "o.csv", [True] * 5, ids=list(range(200, 205))))
    with pytest.raises(ParameterError, match="different labels"):
        evidence.compare(a, _write(tmp_path / "l.csv", [True] * 100, labels=[(i + 1) % 3 for i in range(100)]))
    # a negative margin asks only for non-inferiority
    worse = _write(tmp_path / "w.csv", [True] * 48 + [False] * 52)
    c = evidence.compare(a, worse)
    assert c["difference"] < 0 and evidence.clear_win(c, -0.2) and not evidence.clear_win(c, 0.0)
