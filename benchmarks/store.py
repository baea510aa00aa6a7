"""Reading codes: the storage API next to NumPy reading the same bytes from a .npy, in one run; and what
the stores' checksums cost.

100,000 x 1,280 float32 codes (488 MiB) are written into a feature store (through the single-writer
API, as an extraction would) and into a .npy file; then the store is written 3 more times with the
Fletcher-32 checksums every new store carries and 3 times without, alternately (``write_s`` and
``write_unchecked_s``: the medians).
Then, alternately, 9 times each (``--repeats``):

  * numpy     ``np.load("codes.npy")``
  * features  ``FeatureStore(path).read_features(layer, pooling)``: the same bytes, through the API
  * store     ``FeatureStore(path).read(layer, pooling)`` (features plus paths, labels, splits, hashes)
  * chunks    ``for c in FeatureStore(path).iter_chunks(layer, pooling, rows=8192)`` (bounded memory)
  * split     ``read(..., split="train")`` (80% of the rows, a selection)
  * the same four on the store without checksums (``*_unchecked``): ``checksum_cost`` is each checked
    median over its unchecked one, minus 1: what HDF5's Fletcher-32 check of every chunk costs

All files are in the page cache after writing (the machine has 24 GiB), so this compares the
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
from storage import writer as store_writer  # noqa: E402
from storage.store import GroupSpec, StoreWriter  # noqa: E402
from report import emit  # noqa: E402  benchmarks/ is the script's folder


def write(path: Path, npy: Path | None, rows: int, dims: int, checksums: bool = True) -> None:
    """The store at ``path`` (replaced) and, with ``npy``, the same codes as a .npy file."""
    path.unlink(missing_ok=True)
    saved = store_writer.CHECKED
    store_writer.CHECKED = saved if checksums else {}
    try:
        _write(path, npy, rows, dims)
    finally:
        store_writer.CHECKED = saved


def _write(path: Path, npy: Path | None, rows: int, dims: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, rows)
    samples = [Sample(f"c{labels[i]}/img_{i:07d}.jpg", f"{i:064x}", int(labels[i]), "val" if i % 5 == 0 else "train")
               for i in range(rows)]
    m = Manifest("/data", "folders", [f"c{i}" for i in range(10)], samples)
    spec = GroupSpec("codes", "avg", (dims,))
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(rows, dims)) if npy else None
    with StoreWriter(path, {"backbone": "generated"}, [spec]) as w:
        w.plan(m)
        w.start_appending()
        for start in range(0, rows, 4096):
            s = samples[start:start + 4096]
            X = rng.standard_normal((len(s), dims), dtype=np.float32)
            if out is not None:
                out[start:start + len(s)] = X
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s],
                     [x.split for x in s], X)
        w.finish(m)
    if out is not None:
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
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnncodes-store-") as tmp:
        store, plain, npy = Path(tmp) / "codes.h5", Path(tmp) / "plain.h5", Path(tmp) / "codes.npy"
        write(store, npy, args.rows, args.dims)
        writes: dict[str, list[float]] = {"checked": [], "unchecked": []}
        for _ in range(3):
            writes["checked"].append(timed(lambda: write(store, None, args.rows, args.dims)))
            writes["unchecked"].append(timed(lambda: write(plain, None, args.rows, args.dims, checksums=False)))
        fs, fp = FeatureStore(store), FeatureStore(plain)
        for f in (fs, fp):
            check = f.read("codes", "avg")
            assert np.array_equal(check.features, np.load(npy)), "the store and the .npy disagree"
            del check
        with fs.open() as f:
            assert f["codes/avg/features"].fletcher32
        with fp.open() as f:
            assert not f["codes/avg/features"].fletcher32

        def chunks(s: FeatureStore):
            n = 0
            for c in s.iter_chunks("codes", "avg", rows=8192):
                n += len(c)
            assert n == args.rows

        reads = {"features": lambda s: s.read_features("codes", "avg"), "store": lambda s: s.read("codes", "avg"),
                 "chunks": chunks, "split": lambda s: s.read("codes", "avg", split="train")}
        runs: dict[str, list[float]] = {"numpy": []}
        for _ in range(args.repeats):
            runs["numpy"].append(timed(lambda: np.load(npy)))
            for name, fn in reads.items():  # checked and unchecked one after the other, for each kind of read
                runs.setdefault(name, []).append(timed(lambda: fn(fs)))
                runs.setdefault(f"{name}_unchecked", []).append(timed(lambda: fn(fp)))
        med = {k: statistics.median(v) for k, v in runs.items()}
        wmed = {k: statistics.median(v) for k, v in writes.items()}
        mib = args.rows * args.dims * 4 / 2**20
        result = {"rows": args.rows, "dims": args.dims, "repeats": args.repeats, "mib": round(mib, 1),
                  "write_s": round(wmed["checked"], 2),
                  "write_unchecked_s": round(wmed["unchecked"], 2), "writes_s": writes,
                  "median_s": {k: round(v, 4) for k, v in med.items()},
                  "mib_per_s": {k: round(mib / v, 1) for k, v in med.items()},
                  "ratio_to_numpy": {k: round(v / med["numpy"], 3) for k, v in med.items()},
                  "checksum_cost": {**{k: round(med[k] / med[f"{k}_unchecked"] - 1, 4) for k in reads},
                                    "write": round(wmed["checked"] / wmed["unchecked"] - 1, 4)},
                  "runs_s": runs, "store_bytes": store.stat().st_size, "store_unchecked_bytes": plain.stat().st_size,
                  "npy_bytes": npy.stat().st_size}
    emit(result, args.json)


if __name__ == "__main__":
    main()
