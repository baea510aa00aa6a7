"""What each speed mechanism buys on the command where it acts: the same command with it and without it.

Issue 31's rule: a mechanism stays where it saves at least 1 s and at least 20% of that command, or where
it prevents a failure. Measured here, each a fresh process timed from start to exit (what a user waits
for), the two sides alternating, ``--repeats`` times, medians:

  * **warm runner** (``cnncodes server start`` forks commands from a process that has imported Prefect,
    scikit-learn and the flows): ``cnncodes train-linear`` on a 5,000-row store (256-dimensional codes,
    MobileNet α=0.25's last layer, 10 classes) with a server running, in the runner
    (``CNNCODES_RUNNER=require``) against the same in its own process (``CNNCODES_RUNNER=0``);
  * **the nightly retrain's probe**: ``cnncodes train-linear`` on a 100,000-row store of the same codes, in its
    own process, once: the part of a nightly ``retrain`` over 100,000 images that comes after the scan
    (the retrain trains its challenger with the same flow). With the scan's figures from
    ``benchmarks/rescan.py --files 100000`` it bounds that retrain from below, which is what the
    watcher's saving is compared with.

The other mechanisms' figures come from their own benchmarks' results files (BENCHMARKS.md says which).

Usage:
    .venv/bin/python benchmarks/mechanisms.py --json benchmarks/results/mechanisms.json
    .venv/bin/python benchmarks/mechanisms.py --quick      # 1 repeat, 20,000 rows for the retrain's probe
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402  benchmarks/ is the script's folder
from startup import free_port, timed  # noqa: E402  the same timing of a fresh process

CNNCODES = str(ROOT / ".venv" / "bin" / "cnncodes")
DIMS = 256  # MobileNet alpha=0.25's last layer (conv_pw_13_relu), the default backbone's
CLASSES = 10
LAYER = "conv_pw_13_relu"


def make_store(path: Path, rows: int, seed: int = 0) -> Path:
    """A store of ``rows`` generated codes (class means plus noise: a probe reaches well under 100%)."""
    import numpy as np

    from storage import Manifest, Sample
    from storage.store import GroupSpec, StoreWriter

    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % CLASSES
    splits = np.where(np.arange(rows) % 10 == 0, "val", np.where(np.arange(rows) % 10 == 1, "test", "train"))
    classes = [f"c{c}" for c in range(CLASSES)]
    samples = [Sample(f"{classes[y]}/{i}.jpg", f"{i:064x}", int(y), str(s))
               for i, (y, s) in enumerate(zip(labels, splits))]
    codes = (rng.normal(0, 1, (CLASSES, DIMS))[labels] * 0.3 + rng.normal(0, 1, (rows, DIMS))).astype("f4")
    manifest = Manifest("/data", "folders", classes, samples)
    ident = {"backbone": "mobilenet", "weights": "none", "weights_digest": "d" * 64, "input_size": 224,
             "preprocessing": "none"}
    spec = GroupSpec(LAYER, "avg", (DIMS,))
    with StoreWriter(path, ident, [spec]) as w:
        w.plan(manifest)
        w.start_appending()
        for at in range(0, rows, 10_000):
            part = samples[at:at + 10_000]
            w.append(spec.name, [s.path for s in part], [s.sha256 for s in part], labels[at:at + 10_000],
                     [s.split for s in part], codes[at:at + 10_000])
        w.finish(manifest)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 20,000 rows for the retrain's probe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    big = 20_000 if args.quick else 100_000
    work = Path(tempfile.mkdtemp(prefix="cnncodes-mechanisms-"))
    env = dict(os.environ, CNNCODES_PROGRESS="0", TF_CPP_MIN_LOG_LEVEL="2", CNNCODES_HOME=str(work / "home"),
               PREFECT_HOME=str(work / "prefect"))
    env.pop("PREFECT_API_URL", None)
    results: dict = {"cores": os.cpu_count(), "repeats": repeats, "dims": DIMS, "classes": CLASSES}
    try:
        small = make_store(work / "small.h5", 5_000)
        large = make_store(work / "large.h5", big, seed=1)

        def train(store: Path, out: str, runner: str) -> float:
            return timed([CNNCODES, "train-linear", str(store), "--layer", LAYER, "--out", str(work / out)],
                         dict(env, CNNCODES_RUNNER=runner))

        # the first flow run creates Prefect's database (once per machine): not compared
        results["first_command_s"] = train(small, "warm-up", "0")
        port = free_port()
        subprocess.run([CNNCODES, "server", "start", "--port", str(port)], env=env, check=True, capture_output=True)
        runner, own = [], []
        try:
            for i in range(repeats):
                runner.append(train(small, f"runner-{i}", "require"))
                own.append(train(small, f"own-{i}", "0"))
                print(f"train-linear 5,000 rows #{i + 1}: runner {runner[-1]:.2f} s, own process {own[-1]:.2f} s",
                      file=sys.stderr)
        finally:
            subprocess.run([CNNCODES, "server", "stop"], env=env, capture_output=True)
        results["runner"] = {"rows": 5_000, "with_s": runner, "without_s": own,
                             "with_median_s": statistics.median(runner), "without_median_s": statistics.median(own)}
        r = results["runner"]
        r["saved_s"] = r["without_median_s"] - r["with_median_s"]
        r["saved_fraction"] = r["saved_s"] / r["without_median_s"]
        results["retrain_probe"] = {"rows": big, "seconds": train(large, "large", "0")}
        print(f"train-linear {big:,} rows: {results['retrain_probe']['seconds']:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
