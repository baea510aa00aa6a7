"""The transfer flow's decision on the real shared data, kept as a results file for BENCHMARKS.md.

Runs ``cnncodes transfer`` on ``../shared/data/hymenoptera`` with MobileNet 0.25 and the ImageNet
weights in ``../shared/keras`` (offline), and keeps what decided: the size, the layer scores, the
similarity, the case, the champion and its accuracy per split, and the gate. Then twice more with
fine-tuning forced (``--case 3``), so that the gate compares two models: on the split folders (the
test split carved from val/) and on the same images as class folders with no split at all (drawn).

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


def run_transfer(data: Path, out: str, keras_home: Path, *extra: str) -> dict:
    env = dict(os.environ, KERAS_HOME=str(keras_home), CNNCODES_PROGRESS="0")
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "cnncodes"), "transfer", str(data), "--backbone",
                           "mobilenet", "--backbone-arg", "alpha=0.25", "--weights", "imagenet", "--out", out,
                           "--json", *extra], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gate_summary(r: dict) -> dict:
    """What decided the champion: the split, both models' val and test accuracies, the difference and
    its interval, and the test images it rests on."""
    g = r["gate"]
    return {"split": g["split"], "promoted": g["promoted"], "accuracies": g["accuracies"],
            "difference": g.get("difference"), "interval": g.get("interval"), "margin": g["margin"],
            "images": (g.get("comparison") or {}).get("images"), "mcnemar_p": (g.get("comparison") or {}).get("mcnemar_p"),
            "warning": g.get("warning")}


def unsplit_copy(data: Path, dest: Path) -> Path:
    """hymenoptera as one folder per class, no split (links to the same files)."""
    for f in sorted(data.glob("*/*/*")):
        if f.is_file():
            target = dest / f.parent.name / f"{f.parent.parent.name}_{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f.resolve())
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data, keras_home = SHARED / "data" / "hymenoptera", SHARED / "keras"
    if not data.is_dir() or not (keras_home / "models").is_dir():
        print(f"needs {data} and {keras_home}/models (../shared)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="cnncodes-transfer-") as out:
        r = run_transfer(data, out, keras_home)
        # the gate with both models: fine-tuning forced (case 3), on the split folders (train/ and val/,
        # test carved from val) and on the same images as class folders without any split
        forced = run_transfer(data, str(Path(out) / "forced"), keras_home, "--case", "3")
        unsplit = unsplit_copy(data, Path(out) / "hymenoptera-unsplit")
        flat = run_transfer(unsplit, str(Path(out) / "flat"), keras_home, "--case", "3")
    d = r["decision"]
    scores = {row["layer"]: row["mean"] for row in d["similarity"]["scores"]}
    results = {"dataset": "hymenoptera", "backbone": "mobilenet alpha=0.25, imagenet",
               "train_images": d["size"]["train_images"], "median_per_class": d["size"]["median_per_class"],
               "large_threshold": d["size"]["threshold"], "large": d["size"]["large"], "scores": scores,
               "late_layer": d["similarity"]["late_layer"], "difference": d["similarity"]["difference"],
               "similar": d["similarity"]["similar"], "case": r["case"], "probe_layer": d["probe_layer"],
               "champion": r["champion"]["name"],
               "accuracy": {split: m["accuracy"] for split, m in r["champion"]["metrics"].items()},
               "images": {split: m["images"] for split, m in r["champion"]["metrics"].items()},
               "gate": gate_summary(r),
               "forced_case_3": {"split_folders": gate_summary(forced), "class_folders_no_split": gate_summary(flat)}}
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
