"""Linear-probe training: time and peak memory, cnncodes next to scikit-learn called directly.

For 1k, 10k and 100k rows x 1280 dims of generated features (10 classes, class-dependent means),
each case in a fresh process so that peak RSS is its own:

  * cnncodes  ``tasks.probe.linear.train_linear`` with a fixed C (no search), calibration off for the SVM;
  * sklearn   ``make_pipeline(StandardScaler(), <the same estimator>)`` on the same array.

Then the chunked SGD variant on a store larger than the memory the process may use
(``RLIMIT_AS`` set a few hundred MB above the interpreter's own size), its rows sorted by class
as an extraction from class folders writes them: SGD trains chunk by chunk as ``fit_probe`` trains
it (a pass in store order for the scaler, then each epoch block-shuffled, ``iter_chunks(...,
shuffle_seed=...)``), and, for comparison, on the chunks in store order; one pass over the train
rows is timed each way; reading the whole group, as softmax/SVM would, fails with MemoryError.

Usage:
    .venv/bin/python benchmarks/linear.py             # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/linear.py --quick     # 1k and 10k rows only, small store
    .venv/bin/python benchmarks/linear.py --sgd-only  # the out-of-core part only (a few minutes); with
                                                      # --json FILE, replaces only its sgd_out_of_core
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from report import emit  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
rng = np.random.default_rng(0)
n, d, k = {n}, {d}, 10
y = rng.integers(0, k, n)
X = (rng.normal(0, 1, (k, d))[y] * 0.3 + rng.normal(0, 1, (n, d))).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
if {which!r} == "cnncodes":
    from tasks.probe.linear import LinearConfig, train_linear
    model = train_linear(X, y, [str(i) for i in range(k)],
                         LinearConfig(classifier={clf!r}, C=0.1, calibrate=False, n_jobs=1)).model
else:
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    est = {{"softmax": lambda: LogisticRegression(C=0.1, max_iter=3000, random_state=0),
           "svm": lambda: LinearSVC(C=0.1, max_iter=3000, random_state=0, dual="auto"),
           "sgd": lambda: SGDClassifier(loss="log_loss", alpha=1 / (0.1 * 1000), random_state=0, max_iter=3000,
                                        tol=1e-4)}}[{clf!r}]()
    model = make_pipeline(StandardScaler(), est).fit(X, y)
seconds = time.perf_counter() - t
acc = float((model.predict(X[:2000]) == y[:2000]).mean())
print(json.dumps({{"seconds": seconds, "data_rss_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "train_acc": acc}}))
"""

SGD_STORE_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from sklearn.linear_model import SGDClassifier  # imported before the limit: its libraries are not the data
from storage import FeatureStore
from tasks.probe.linear import LinearConfig, train_sgd_chunked

def vm_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") / 2**20

limit_mb = vm_mb() + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (int(limit_mb * 2**20), resource.RLIM_INFINITY))
fs = FeatureStore({store!r})
out = {{"limit_mb": limit_mb, "store_features_mb": {features_mb}}}
try:
    fs.read("codes", "avg", split="train")
    out["read_whole_group"] = "fitted in memory (limit too loose)"
except MemoryError:
    out["read_whole_group"] = "MemoryError"
def chunks(epoch=None):  # as fit_probe: store order, or the epoch's block shuffle
    seed = None if epoch is None else (0, epoch)
    for c in fs.iter_chunks("codes", "avg", split="train", rows=4096, shuffle_seed=seed):
        yield c.features, c.labels
def accuracy(model):
    right = seen = 0
    for c in fs.iter_chunks("codes", "avg", split="val", rows=4096):
        right += int((model.predict(c.features) == c.labels).sum())
        seen += len(c)
    return right / seen
for name, epoch in (("in_order", None), ("shuffled", 0)):
    t = time.perf_counter()
    rows = sum(len(y) for _, y in chunks(epoch))
    out[f"pass_seconds_{{name}}"] = time.perf_counter() - t
out["pass_rows"] = rows
cfg = LinearConfig(classifier="sgd", sgd_epochs=3, chunk_rows=4096)
t = time.perf_counter()
res = train_sgd_chunked(chunks, list(range(10)), cfg, epoch_chunks=chunks)
out["sgd_seconds"] = time.perf_counter() - t
out["sgd_val_accuracy"] = accuracy(res.model)
t = time.perf_counter()
res = train_sgd_chunked(chunks, list(range(10)), cfg)  # every epoch in store order: one class a chunk
out["sgd_in_order_seconds"] = time.perf_counter() - t
out["sgd_in_order_val_accuracy"] = accuracy(res.model)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def run_child(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_big_store(path: Path, rows: int, dims: int = 1280) -> float:
    """A store of ``rows`` x ``dims`` float32 codes, sorted by class (as an extraction from class folders
    writes them), written chunk by chunk; returns its features' MB."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from storage import Manifest, Sample
    from storage.store import GroupSpec, StoreWriter

    rng = np.random.default_rng(1)
    centers = rng.normal(0, 1, (10, dims)).astype(np.float32)
    y_all = np.sort(rng.integers(0, 10, rows))
    samples = [Sample(f"img/{i}.jpg", f"{i:064x}", int(y_all[i]), "val" if i % 10 == 0 else "train")
               for i in range(rows)]
    m = Manifest("/data", "folders", [str(i) for i in range(10)], samples)
    spec = GroupSpec("codes", "avg", (dims,))
    with StoreWriter(path, {"backbone": "generated"}, [spec]) as w:
        w.plan(m)
        w.start_appending()
        for i in range(0, rows, 8192):
            s = samples[i:i + 8192]
            y = y_all[i:i + 8192]
            X = (centers[y] * 0.3 + rng.normal(0, 1, (len(s), dims))).astype(np.float32)
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], y, [x.split for x in s], X)
        w.finish(m)
    return rows * dims * 4 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sgd-only", action="store_true", help="only the out-of-core SGD part; with --json, "
                                                             "replaces only sgd_out_of_core in that file")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    sizes = (1000, 10000) if args.quick else (1000, 10000, 100000)
    rows = []
    for n in (() if args.sgd_only else sizes):
        for clf in ("softmax", "svm", "sgd"):
            row = {"rows": n, "dims": 1280, "classifier": clf}
            for which in ("cnncodes", "sklearn"):
                r = run_child(CHILD.format(root=str(ROOT), n=n, d=1280, which=which, clf=clf))
                row[f"{which}_seconds"] = round(r["seconds"], 3)
                row[f"{which}_peak_rss_mb"] = round(r["peak_rss_mb"], 1)
                row[f"{which}_data_rss_mb"] = round(r["data_rss_mb"], 1)
                row[f"{which}_train_acc"] = r["train_acc"]
            row["time_ratio"] = round(row["cnncodes_seconds"] / row["sklearn_seconds"], 3)
            row["memory_ratio"] = round(row["cnncodes_peak_rss_mb"] / row["sklearn_peak_rss_mb"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory(prefix="cnncodes-linear-") as tmp:
        store = Path(tmp) / "big.h5"
        n_big = 40000 if args.quick else 200000
        features_mb = make_big_store(store, n_big)
        headroom = 150 if args.quick else 400
        sgd = run_child(SGD_STORE_CHILD.format(root=str(ROOT), store=str(store), headroom=headroom,
                                               features_mb=round(features_mb, 1)))
        sgd["rows"] = n_big
    results = {"classifiers": rows, "sgd_out_of_core": sgd}
    if args.sgd_only:
        results = {**(json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}),
                   "sgd_out_of_core": sgd}
    emit(results, args.json)


if __name__ == "__main__":
    main()
