"""Does a change slow extraction down? Two git revisions' extraction benchmarks, alternating, one run.

Each revision is checked out into a temporary worktree and its own ``benchmarks/extract.py --only
throughput`` runs there (with this checkout's ``.venv``), alternating base and head ``--repeats``
times so that a slow spell of the machine hits both. Reports images/s of the raw forward pass and of
cnncodes per backbone and revision, and head / base ratios of the medians.

Usage:
    .venv/bin/python benchmarks/revisions.py BASE [HEAD] --json benchmarks/results/extract-revisions-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402  benchmarks/ is the script's folder


def run(tree: Path, work: Path, quick: bool) -> dict:
    out = work / "result.json"
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "benchmarks/extract.py", "--only", "throughput", "--work",
           str(work), "--json", str(out)] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONPATH=str(tree), CNNCODES_PROGRESS="0")
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("head", nargs="?", default="HEAD")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the extraction benchmark's small counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    revs = {}
    for name in ("base", "head"):
        revs[name] = subprocess.run(["git", "rev-parse", "--short", getattr(args, name)], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout.strip()
    runs: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="cnncodes-revs-") as tmp:
        tmp = Path(tmp)
        trees = {}
        for name, rev in revs.items():
            trees[name] = tmp / name
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            for k in range(args.repeats):
                for name in (("base", "head") if k % 2 == 0 else ("head", "base")):
                    work = tmp / f"work-{name}-{k}"
                    work.mkdir()
                    runs[name].append(run(trees[name], work, args.quick))
                    print(f"{name} run {k + 1}: " + ", ".join(
                        f"{t['backbone']} {t['cnncodes_float32']:.1f} img/s" for t in runs[name][-1]["throughput"]),
                        flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    results = {"base": revs["base"], "head": revs["head"], "repeats": args.repeats, "quick": args.quick,
               "backbones": {}}
    for i, t in enumerate(runs["base"][0]["throughput"]):
        name = t["backbone"]
        row = {}
        for side in ("base", "head"):
            for key in ("raw_float32", "cnncodes_float32"):
                row[f"{side}_{key}"] = [r["throughput"][i][key] for r in runs[side]]
        row["head_over_base_cnncodes"] = (statistics.median(row["head_cnncodes_float32"])
                                          / statistics.median(row["base_cnncodes_float32"]))
        row["head_over_base_raw"] = (statistics.median(row["head_raw_float32"])
                                     / statistics.median(row["base_raw_float32"]))
        results["backbones"][name] = row
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
