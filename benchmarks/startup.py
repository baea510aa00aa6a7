"""Whole-command cost: ``cnncodes`` against the plain script a user would otherwise write, side by side.

Each measurement is a fresh process timed from start to exit (what a user waits for), the two sides
alternating, ``--repeats`` times; the median is compared. No Prefect server runs unless stated.

  * extract, 32 photos, MobileNetV2 (random weights, 224 px, global average pooling):
    ``cnncodes extract`` into a new store against a script that imports TensorFlow, builds the same
    network, decodes with Pillow, predicts and writes the codes with h5py;
  * extract, 400 photos, ResNet50: the same;
  * train-linear on a 32-row store with a running ``cnncodes server`` against a script that imports
    scikit-learn, reads the codes with h5py, fits StandardScaler + LogisticRegression and dumps it
    with joblib (cnncodes also searches C by cross-validation, evaluates every split and writes a report
    with plots). ``cnncodes server start`` also starts the warm runner, which the command runs in
    (``CNNCODES_RUNNER=require``); beside them run ``train-linear --C 1`` (``given_C``: the same without
    the C search) and the command in its own process (``no_runner``: ``CNNCODES_RUNNER=0``).

Usage:
    .venv/bin/python benchmarks/startup.py --json benchmarks/results/startup-cpu.json
    .venv/bin/python benchmarks/startup.py --quick
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402  benchmarks/ is the script's folder

PY = str(ROOT / ".venv" / "bin" / "python")
CNNCODES = str(ROOT / ".venv" / "bin" / "cnncodes")

PLAIN_EXTRACT = r'''
import sys, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
import numpy as np, h5py
from PIL import Image
import keras
data, out, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
app = {"mobilenet_v2": (keras.applications.MobileNetV2, keras.applications.mobilenet_v2),
       "resnet50": (keras.applications.ResNet50, keras.applications.resnet50)}[name]
model = app[0](weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
paths = sorted(p for p in data.rglob("*.jpg"))
feats = []
for i in range(0, len(paths), 32):
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
                      for p in paths[i:i + 32]])
    feats.append(model.predict(app[1].preprocess_input(batch), verbose=0))
with h5py.File(out, "w") as f:
    f["features"] = np.concatenate(feats)
    f["paths"] = np.array([str(p) for p in paths], dtype="S")
'''

PLAIN_LINEAR = r'''
import sys
import h5py, joblib, numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
with h5py.File(sys.argv[1], "r") as f:
    g = f[sys.argv[2]]["avg"]
    n = int(g["committed"][0])
    X, y, split = g["features"][:n], g["label"][:n], g["split"][:n].astype(str)
model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[split == "train"], y[split == "train"])
joblib.dump(model, sys.argv[3])
'''


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    dt = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{proc.stderr[-3000:]}")
    return dt


def side_by_side(name: str, plain, ours, repeats: int, variants: dict | None = None) -> dict:
    """``plain`` and ``ours`` (and each of ``variants``, other cnncodes commands) alternating."""
    p, o = [], []
    v: dict[str, list[float]] = {k: [] for k in variants or {}}
    for i in range(repeats):
        p.append(plain(i))
        o.append(ours(i))
        for k, fn in (variants or {}).items():
            v[k].append(fn(i))
        print(f"{name} #{i + 1}: plain {p[-1]:.2f} s, cnncodes {o[-1]:.2f} s"
              + "".join(f", {k} {t[-1]:.2f} s" for k, t in v.items()), file=sys.stderr)
    mp, mo = statistics.median(p), statistics.median(o)
    out = {"plain_s": p, "cnncodes_s": o, "plain_median_s": mp, "cnncodes_median_s": mo, "ratio": mo / mp,
           "ratio_per_repeat": [b / a for a, b in zip(p, o)]}
    for k, t in v.items():
        out[k] = {"s": t, "median_s": statistics.median(t), "ratio": statistics.median(t) / mp}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, 32 photos only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    from tasks.data.synthetic import make_dataset

    work = Path(tempfile.mkdtemp(prefix="cnncodes-startup-"))
    env = dict(os.environ, CNNCODES_PROGRESS="0", TF_CPP_MIN_LOG_LEVEL="2", CNNCODES_HOME=str(work / "home"),
               PREFECT_HOME=str(work / "prefect"))
    env.pop("PREFECT_API_URL", None)
    (work / "plain_extract.py").write_text(PLAIN_EXTRACT)
    (work / "plain_linear.py").write_text(PLAIN_LINEAR)
    results: dict = {"cores": os.cpu_count(), "repeats": repeats}
    try:
        # A first command, not compared: Prefect's database is created (and migrated) once per machine,
        # not per command, on the first flow run. Its time is recorded on its own.
        warm = make_dataset(work / "warm-up", classes=("stripes", "checks"), per_class=2, size=(64, 64), seed=0)
        results["first_command_s"] = timed([CNNCODES, "extract", str(warm), "--backbone", "mobilenet_v2",
                                            "--weights", "none", "--layer", "out_relu", "--pooling", "avg",
                                            "--out", str(work / "out-warm-up")], env)
        cases = [("extract_32_mobilenet_v2", 8, "mobilenet_v2", "out_relu")]
        if not args.quick:
            cases.append(("extract_400_resnet50", 100, "resnet50", "conv5_block3_out"))
        for key, per_class, backbone, layer in cases:
            data = make_dataset(work / key, classes=("stripes", "checks", "rings", "blobs"), per_class=per_class,
                                size=(375, 500), seed=1)
            results[key] = side_by_side(
                key,
                lambda i: timed([PY, str(work / "plain_extract.py"), str(data), str(work / f"{key}-{i}.h5"),
                                 backbone], env),
                lambda i: timed([CNNCODES, "extract", str(data), "--backbone", backbone, "--weights", "none",
                                 "--layer", layer, "--pooling", "avg", "--out", str(work / f"out-{key}-{i}")], env),
                repeats)
            results[key]["images"] = 4 * per_class
        # train-linear: a small store, a running server on the cnncodes side
        store = next((work / "out-extract_32_mobilenet_v2-0" / "stores").glob("*.h5"))
        port = free_port()
        subprocess.run([CNNCODES, "server", "start", "--port", str(port)], env=env, check=True, capture_output=True)
        try:
            results["train_linear_with_server"] = side_by_side(
                "train-linear",
                lambda i: timed([PY, str(work / "plain_linear.py"), str(store), "out_relu", str(work / f"m{i}.joblib")],
                                env),
                # in the warm runner the server started (require: a command it did not take fails the run)
                lambda i: timed([CNNCODES, "train-linear", str(store), "--layer", "out_relu", "--out",
                                 str(work / f"lin-{i}")], dict(env, CNNCODES_RUNNER="require")),
                repeats,
                # the same with C given: no C search (what the search costs); and without the warm runner
                # (each command imports Prefect, scikit-learn and the flow itself: what the runner saves)
                {"given_C": lambda i: timed([CNNCODES, "train-linear", str(store), "--layer", "out_relu", "--C", "1",
                                             "--out", str(work / f"lin-c-{i}")], dict(env, CNNCODES_RUNNER="require")),
                 "no_runner": lambda i: timed([CNNCODES, "train-linear", str(store), "--layer", "out_relu", "--out",
                                               str(work / f"lin-nr-{i}")], dict(env, CNNCODES_RUNNER="0"))})
        finally:
            subprocess.run([CNNCODES, "server", "stop"], env=env, capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
