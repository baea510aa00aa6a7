"""Reading codes: the storage API next to NumPy reading the same bytes from a .npy, in one run.

100,000 x 1,280 float32 codes (488 MiB) are written once into a feature store (through the
single-writer API, as an extraction would) and into a .npy file. Then, alternately, 5 times each:

  * numpy     ``np.load("codes.npy")``
  * features  ``FeatureStore(path).read_features(layer, pooling)``: the same bytes, through the API
  * store     ``FeatureStore(path).read(layer, pooling)`` (features plus paths, labels, splits, hashes)
  * chunks    ``for c in FeatureStore(path).iter_chunks(layer, pooling, rows=8192)`` (bounded memory)
  * split     ``read(..., split="train")`` (80% of the rows, a selection)

Both files are in the page cache after writing (the machine has 24 GiB), so this compares the
reading code, not the disk. Target: the API <= 2x numpy for the same bytes (``features``).

Usage:
    .venv/bin/python benchmarks/store.py [--rows 100000] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from storage import FeatureStore, Manifest, Sample  # noqa: E402
from storage.store import GroupSpec, StoreWriter  # noqa: E402
from report import emit  # noqa: E402  benchmarks/ is the script's folder


def write(path: Path, npy: Path, rows: int, dims: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, rows)
    samples = [Sample(f"c{labels[i]}/img_{i:07d}.jpg", f"{i:064x}", int(labels[i]), "val" if i % 5 == 0 else "train")
               for i in range(rows)]
    m = Manifest("/data", "folders", [f"c{i}" for i in range(10)], samples)
    spec = GroupSpec("codes", "avg", (dims,))
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(rows, dims))
    with StoreWriter(path, {"backbone": "generated"}, [spec]) as w:
        w.plan(m)
        w.start_appending()
        for start in range(0, rows, 4096):
            s = samples[start:start + 4096]
            X = rng.standard_normal((len(s), dims), dtype=np.float32)
            out[start:start + len(s)] = X
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s],
                     [x.split for x in s], X)
        w.finish(m)
    out.flush()
    del out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnncodes-store-") as tmp:
        store, npy = Path(tmp) / "codes.h5", Path(tmp) / "codes.npy"
        t_write = timed(lambda: write(store, npy, args.rows, args.dims))
        fs = FeatureStore(store)
        check = fs.read("codes", "avg")
        assert np.array_equal(check.features, np.load(npy)), "the store and the .npy disagree"
        del check

        def chunks():
            n = 0
            for c in fs.iter_chunks("codes", "avg", rows=8192):
                n += len(c)
            assert n == args.rows

        runs: dict[str, list[float]] = {"numpy": [], "features": [], "store": [], "chunks": [], "split": []}
        for _ in range(args.repeats):
            runs["numpy"].append(timed(lambda: np.load(npy)))
            runs["features"].append(timed(lambda: fs.read_features("codes", "avg")))
            runs["store"].append(timed(lambda: fs.read("codes", "avg")))
            runs["chunks"].append(timed(chunks))
            runs["split"].append(timed(lambda: fs.read("codes", "avg", split="train")))
        med = {k: statistics.median(v) for k, v in runs.items()}
        mib = args.rows * args.dims * 4 / 2**20
        result = {"rows": args.rows, "dims": args.dims, "mib": round(mib, 1), "write_s": round(t_write, 2),
                  "median_s": {k: round(v, 4) for k, v in med.items()},
                  "mib_per_s": {k: round(mib / v, 1) for k, v in med.items()},
                  "ratio_to_numpy": {k: round(v / med["numpy"], 3) for k, v in med.items()},
                  "runs_s": runs, "store_bytes": store.stat().st_size, "npy_bytes": npy.stat().st_size}
    emit(result, args.json)


if __name__ == "__main__":
    main()
