"""A full disk during an extraction: a clear error before HDF5 writes (HDF5 cannot recover from a disk that fills
mid-write: the process died there, in the library), every committed row kept, and the next run, with room again,
computes only what is missing (issue 33). On a real small filesystem (a 16 MiB tmpfs) where this process may
mount one; elsewhere the room the writer sees is made small instead. Each extraction runs in its own process, so
that a crash fails this test, not the whole run."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, TINY_LAST
from tasks.data.synthetic import make_dataset

pytestmark = pytest.mark.slow

EXTRACT = r'''
import json, shutil, sys
from storage import StoreFullError
from tasks.backbones import BackboneSpec
from tasks.data.datasets import scan_dataset
from tasks.extract import ExtractOptions, extract_to_store

data, store, spec, layer, left = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
if left != "-":  # no filesystem of our own: the writer is shown a disk with that little room
    import storage.writer
    real = shutil.disk_usage
    storage.writer.shutil.disk_usage = lambda p: real(p)._replace(free=int(left))
try:
    s = extract_to_store(scan_dataset(data), store, BackboneSpec(**spec), [(layer, "avg")], ExtractOptions(batch_size=8))
except StoreFullError as exc:
    print(json.dumps({"full": str(exc)}))
    sys.exit(3)
print(json.dumps({"computed": s["computed"]}))
'''


@contextlib.contextmanager
def small_disk(folder):
    """A 16 MiB filesystem at ``folder`` where one can be mounted; yields ``fill(left)``, which leaves ``left``
    bytes free (``None``: all the room again) and returns what the extraction script must be told."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    filler = folder / "filler"

    def fill(left: int | None) -> str:
        filler.unlink(missing_ok=True)
        if left is not None and mounted:
            with open(filler, "wb") as fh:
                fh.write(b"\0" * max(0, shutil.disk_usage(folder).free - left))
        return str(left) if left is not None and not mounted else "-"
    try:
        yield fill
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _extract(data, store, told: str) -> tuple[int, dict]:
    run = subprocess.run([sys.executable, "-c", EXTRACT, str(data), str(store), json.dumps(TINY), TINY_LAST, told],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 3), f"the extraction died (status {run.returncode}):\n{run.stderr[-3000:]}"
    return run.returncode, json.loads(run.stdout.strip().splitlines()[-1])


def test_a_full_disk_stops_an_extraction_cleanly_and_the_next_run_finishes_it(tmp_path, texture_data):
    from storage import FeatureStore
    from storage.verify import verify_store

    with small_disk(tmp_path / "disk") as fill:
        store = tmp_path / "disk" / "s.h5"
        assert _extract(texture_data, store, fill(None)) == (0, {"computed": 36})
        more = make_dataset(tmp_path / "more", classes=("rings", "zigzags"), per_class=30, size=(40, 40), seed=3)
        for folder in more.iterdir():  # 60 new files beside the 36 the store has
            shutil.copytree(folder, texture_data / f"new-{folder.name}")

        status, said = _extract(texture_data, store, fill(64 * 1024))
        assert status == 3, said
        assert "free space there" in said["full"] and "The 36 rows already committed are kept" in said["full"], said
        codes = FeatureStore(store).read(TINY_LAST, "avg")
        assert len(codes) == 36 and verify_store(store)["ok"]

        assert _extract(texture_data, store, fill(None)) == (0, {"computed": 60})  # room again: only what is missing
        codes = FeatureStore(store).read(TINY_LAST, "avg")
        assert len(codes) == 96 and len(set(codes.paths)) == 96 and verify_store(store)["ok"]


TRAIN = r'''
import errno, sys
if sys.argv[1] != "-":  # no filesystem of our own: the model's file meets a full disk instead
    import joblib
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    joblib.dump = full
from cnncodes import cli
sys.exit(cli.main(sys.argv[2:]))
'''


def test_a_full_disk_while_registering_saves_nothing_and_says_what_to_do(tmp_path):
    from storage import ModelRegistry
    from test_linear import make_store

    store = make_store(tmp_path / "s.h5")
    with small_disk(tmp_path / "disk") as fill:
        out = tmp_path / "disk" / "out"

        def train(told):
            return subprocess.run([sys.executable, "-c", TRAIN, told, "train-linear", str(store), "--layer", "signal",
                                   "--C", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=600, env=dict(os.environ, CNNCODES_RUNNER="0"))

        full = train(fill(16 * 1024))
        assert full.returncode == 2, full.stderr[-3000:]
        assert "No space left on device" in full.stderr, full.stderr[-3000:]
        assert "free space there, then run the same command again" in full.stderr
        assert ModelRegistry(out / "registry").versions("s-signal-softmax") == []  # no version, not even a partial one
        done = train(fill(None))
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(ModelRegistry(out / "registry").versions("s-signal-softmax")) == 1  # (a number is never reused)
