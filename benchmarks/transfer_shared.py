"""The transfer flow's decision on the real shared data, kept as a results file for BENCHMARKS.md.

Runs ``cnncodes transfer`` on ``../shared/data/hymenoptera`` with MobileNet 0.25 and the ImageNet
weights in ``../shared/keras`` (offline), and keeps what decided: the size, the layer scores, the
similarity, the case, the champion and its accuracy per split.

Usage:
    .venv/bin/python benchmarks/transfer_shared.py --json benchmarks/results/transfer-hymenoptera.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402  benchmarks/ is the script's folder

SHARED = ROOT.parent / "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data, keras_home = SHARED / "data" / "hymenoptera", SHARED / "keras"
    if not data.is_dir() or not (keras_home / "models").is_dir():
        print(f"needs {data} and {keras_home}/models (../shared)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="cnncodes-transfer-") as out:
        env = dict(os.environ, KERAS_HOME=str(keras_home), CNNCODES_PROGRESS="0")
        proc = subprocess.run([str(ROOT / ".venv" / "bin" / "cnncodes"), "transfer", str(data), "--backbone",
                               "mobilenet", "--backbone-arg", "alpha=0.25", "--weights", "imagenet", "--out", out,
                               "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    d = r["decision"]
    scores = {row["layer"]: row["mean"] for row in d["similarity"]["scores"]}
    results = {"dataset": "hymenoptera", "backbone": "mobilenet alpha=0.25, imagenet",
               "train_images": d["size"]["train_images"], "median_per_class": d["size"]["median_per_class"],
               "large_threshold": d["size"]["threshold"], "large": d["size"]["large"], "scores": scores,
               "late_layer": d["similarity"]["late_layer"], "difference": d["similarity"]["difference"],
               "similar": d["similarity"]["similar"], "case": r["case"], "probe_layer": d["probe_layer"],
               "champion": r["champion"]["name"],
               "accuracy": {split: m["accuracy"] for split, m in r["champion"]["metrics"].items()},
               "images": {split: m["images"] for split, m in r["champion"]["metrics"].items()}}
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
