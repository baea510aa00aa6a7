"""Damaged files never hang a reader and never read as wrong values (issue 15).

A real (small) store, a registry and a manifest are cut short at many offsets and have bytes
overwritten at random offsets, metadata and data alike. Each case runs in a worker process
(tests/fuzz_worker.py) with a time limit, since a hang inside HDF5's C code cannot be interrupted from
a thread; a worker past the limit is killed and a new one started. Every case must end within the limit
in a CnncodesError naming the damaged file, or in a read equal to the undamaged file's (for a store, a
``verify_store`` that does not crash either); a history cut at any point reads as the events whose lines
it still holds whole (an append cut short by a crash).
"""
from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage import Manifest, ModelRegistry, Sample, Skip
from storage.store import GroupSpec, StoreWriter

import fuzz_worker

pytestmark = pytest.mark.slow

LIMIT_S = 5.0  # a case that takes longer counts as a hang
WORKER = Path(fuzz_worker.__file__)
IDENT = {"backbone": "toy", "weights": "none", "input_size": 8, "preprocessing": "none"}


class Worker:
    """tests/fuzz_worker.py in a subprocess, killed and started again when a case runs past LIMIT_S."""

    def __init__(self):
        self.proc = None
        self.restarts = 0
        self.start()

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        assert self._line(120) == {"ready": True}

    def _line(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, case: dict) -> dict:
        t0 = time.monotonic()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        answer = self._line(LIMIT_S)
        wall = time.monotonic() - t0
        if answer is None:  # a hang (or the worker died): kill it and go on with a fresh one
            self.proc.kill()
            self.proc.wait()
            self.restarts += 1
            self.start()
            return {"id": case["id"], "outcome": "hang", "wall": wall}
        answer["wall"] = wall
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _check(cases: list[dict], answers: list[dict], expected: dict, target_of) -> dict:
    """Failures (as text) and a summary of how the cases ended."""
    failures, outcomes = [], {}
    for case, a in zip(cases, answers):
        outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
        what = f"{case['id']}"
        if a["outcome"] == "hang":
            failures.append(f"{what}: no answer within {LIMIT_S} s (a hang)")
        elif a["outcome"] == "crash":
            failures.append(f"{what}: not a clear error: {a['message'][:300]}")
        elif a["outcome"] == "error":
            if str(target_of(case)) not in a["message"]:
                failures.append(f"{what}: the error does not name {target_of(case)}: {a['message'][:300]}")
        elif a["value"] != case.get("expect", expected):
            failures.append(f"{what}: read wrong values without an error")
        if a.get("verify", {}).get("crash"):
            failures.append(f"{what}: verify crashed: {a['verify']['crash']}")
        if a["outcome"] != "hang" and a["wall"] > LIMIT_S:
            failures.append(f"{what}: took {a['wall']:.1f} s")
    worst = max(a["wall"] for a in answers)
    return {"failures": failures, "outcomes": outcomes, "cases": len(cases), "worst_s": round(worst, 3)}


# --------------------------------------------------------------------------- a store


def _store(path: Path) -> None:
    rng = np.random.default_rng(0)
    m = Manifest("/data", "folders", ["a", "b"],
                 [Sample(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", i % 2, "val" if i % 5 == 0 else "train")
                  for i in range(40)], skipped=[Skip("bad.jpg", "not an image")])
    spec = GroupSpec("l1", "avg", (3,))
    feats = rng.normal(size=(40, 3)).astype("f4")
    with StoreWriter(path, IDENT, [spec]) as w:
        w.plan(m)
        w.start_appending()
        for i in range(0, 40, 8):
            s = m.samples[i:i + 8]
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s],
                     [x.split for x in s], feats[i:i + 8])
        w.finish(m)


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, stop) byte ranges of every raw data chunk of the store."""
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        def visit(_, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    out.append((info.byte_offset, info.byte_offset + info.size))
        f.visititems(visit)
    return sorted(out)



def _damaged(raw: bytes, op: tuple, rnd) -> bytes:
    """``raw`` cut at ``op[1]`` (op ``("cut", at)``) or with the byte at ``op[1]`` flipped to another value."""
    kind, at = op
    if kind == "cut":
        return raw[:at]
    b = bytearray(raw)
    b[at] ^= rnd.randrange(1, 256)
    return bytes(b)

def test_a_damaged_store_is_an_error_naming_it_or_a_correct_read_never_a_hang(tmp_path, worker):
    good = tmp_path / "good.h5"
    _store(good)
    raw = good.read_bytes()
    expected = fuzz_worker.read_store(str(good))
    data = _data_ranges(good)
    in_data = np.zeros(len(raw), bool)
    for a, b in data:
        in_data[a:b] = True
    meta_offsets = np.flatnonzero(~in_data)
    # the bytes of rows that exist (not the fill past them): where a flip changes values readers return
    row_offsets = np.concatenate([np.arange(a, min(b, a + 512)) for a, b in data])
    rnd = random.Random(15)
    cuts = sorted(set(range(0, 16384, 512)) | {rnd.randrange(16384, len(raw)) for _ in range(14)}
                  | {len(raw) - 1, len(raw) - 4096, data[0][0] + 1})
    cases = [{"id": f"cut at {n}", "op": ("cut", n)} for n in cuts]
    cases += [{"id": f"metadata byte {o} overwritten", "op": ("flip", int(o))}
              for o in rnd.sample(list(meta_offsets[meta_offsets < len(raw)]), 40)]
    cases += [{"id": f"data byte {o} overwritten", "op": ("flip", int(o))} for o in rnd.sample(list(row_offsets), 20)]
    target = tmp_path / "case.h5"
    answers = []
    for case in cases:
        target.write_bytes(_damaged(raw, case["op"], rnd))
        answers.append(worker.ask({"id": case["id"], "kind": "store", "path": str(target)}))
    summary = _check(cases, answers, expected, lambda c: target)
    cut_answers = [a for c, a in zip(cases, answers) if c["op"][0] == "cut"]
    assert all(a["outcome"] == "error" for a in cut_answers), "a cut store must never read as whole"
    print(f"\nstore fuzz: {summary['cases']} cases ({len(cut_answers)} cuts), outcomes {summary['outcomes']}, "
          f"slowest {summary['worst_s']} s, worker restarts {worker.restarts}")
    assert not summary["failures"], "\n".join(summary["failures"])
    # overwritten bytes in rows: the read refuses them and verify names the damaged rows
    for c, a in zip(cases, answers):
        if c["id"].startswith("data byte") and a["outcome"] == "error":
            assert a["verify"]["damaged"], f"{c['id']}: the read failed but verify found no damaged rows"


# --------------------------------------------------------------------------- a registry and a manifest


def _registry(root: Path) -> ModelRegistry:
    reg = ModelRegistry(root)
    reg.save("m", {"w": np.arange(6.0), "b": 1}, {"class_names": ["a", "b"], "feature_dim": 6})
    reg.save("m", {"w": np.arange(6.0) * 2, "b": 2}, {"class_names": ["a", "b"], "feature_dim": 6, "note": "é"})
    reg.set_alias("m", "champion", 2)
    reg.set_alias("m", "previous", 1)
    reg.pin_splits("m", {f"{i:064x}": ("train", "val", "test")[i % 3] for i in range(12)}, {"val": 0.2}, seed=3)
    for i in range(4):
        reg.record_event("m", {"challenger": i + 2, "champion_after": 2, "reason": f"event {i}"})
    return reg


def _history_prefix(raw: bytes, cut: int, reg: ModelRegistry) -> list:
    """The events whose whole line (its newline aside) lies within the first ``cut`` bytes."""
    events, start = [], 0
    full = reg.history("m")
    for i, line in enumerate(raw.split(b"\n")[:-1]):
        if start + len(line) <= cut:
            events.append(full[i])
        start += len(line) + 1
    return events


def test_a_damaged_registry_or_manifest_is_an_error_naming_the_file_or_a_correct_read(tmp_path, worker):
    root = tmp_path / "models"
    reg = _registry(root)
    expected = fuzz_worker.read_registry(str(root))
    d = root / "m"
    files = [d / "v2" / "model.joblib", d / "v2" / "metadata.json", d / "aliases.json", d / "splits.json",
             d / "history.jsonl"]
    originals = {p: p.read_bytes() for p in files}
    rnd = random.Random(150)
    cases = []
    for p, raw in originals.items():
        cuts = sorted({0, 1, len(raw) - 1, len(raw) - 2} | {rnd.randrange(len(raw)) for _ in range(8)})
        cases += [{"id": f"{p.name} cut at {n}", "file": p, "op": ("cut", n)} for n in cuts]
        cases += [{"id": f"{p.name} byte {o} overwritten", "file": p, "op": ("flip", o)}
                  for o in rnd.sample(range(len(raw)), 14)]
    answers = []
    for case in cases:
        p, (kind, at) = case["file"], case["op"]
        raw = originals[p]
        if kind == "cut" and p.name == "history.jsonl":
            case["expect"] = dict(expected, history=_history_prefix(raw, at, reg))
        p.write_bytes(_damaged(raw, (kind, at), rnd))
        answers.append(worker.ask({"id": case["id"], "kind": "registry", "path": str(root)}))
        p.write_bytes(raw)
    summary = _check(cases, answers, expected, lambda c: c["file"])
    print(f"\nregistry fuzz: {summary['cases']} cases, outcomes {summary['outcomes']}, slowest {summary['worst_s']} s")
    assert not summary["failures"], "\n".join(summary["failures"])

    man = tmp_path / "manifest.json"
    m = Manifest(str(tmp_path / "data"), "folders", ["a", "b"],
                 [Sample(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", i % 2, "train") for i in range(10)],
                 split_seed=0, split_fractions={"val": 0.2}, skipped=[Skip("x.txt", "not an image")])
    m.save(man)
    raw = man.read_bytes()
    expected = m.to_dict()
    cases = [{"id": f"manifest cut at {n}", "op": ("cut", n)} for n in sorted({0, len(raw) - 1}
                                                                             | set(rnd.sample(range(len(raw)), 10)))]
    cases += [{"id": f"manifest byte {o} overwritten", "op": ("flip", o)} for o in rnd.sample(range(len(raw)), 30)]
    answers = []
    target = tmp_path / "case.json"
    for case in cases:
        kind, at = case["op"]
        b = bytearray(raw[:at] if kind == "cut" else raw)
        if kind == "flip":
            b[at] ^= rnd.randrange(1, 256)
        target.write_bytes(bytes(b))
        answers.append(worker.ask({"id": case["id"], "kind": "manifest", "path": str(target)}))
    summary = _check(cases, answers, expected, lambda c: target)
    print(f"manifest fuzz: {summary['cases']} cases, outcomes {summary['outcomes']}, slowest {summary['worst_s']} s")
    assert not summary["failures"], "\n".join(summary["failures"])
