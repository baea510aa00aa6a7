"""Two processes at one store: a second extraction is refused with a clear message while the first writes, a
reader sees whole committed rows meanwhile, and the store ends whole, without duplicates (issue 33)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, TINY_LAST

pytestmark = pytest.mark.slow

# One extraction in its own process. With a flag folder it pauses after its first committed batch (its progress
# callback, a public seam), says so, and goes on only when told: the other process then acts mid-write.
EXTRACT = r'''
import json, sys, time
from pathlib import Path
from storage import StoreLockedError
from tasks.backbones import BackboneSpec
from tasks.data.datasets import scan_dataset
from tasks.extract import ExtractOptions, extract_to_store

data, store, spec, layer, flags = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
flags = Path(flags) if flags != "-" else None

def progress(done, total):
    if flags is None or done == 0 or (flags / "paused").exists():
        return
    (flags / "paused").write_text(str(done))
    deadline = time.monotonic() + 300
    while not (flags / "go").exists():
        assert time.monotonic() < deadline, "never told to go on"
        time.sleep(0.05)

try:
    s = extract_to_store(scan_dataset(data), store, BackboneSpec(**spec), [(layer, "avg")],
                         ExtractOptions(batch_size=8), progress=progress)
except StoreLockedError as exc:
    print(json.dumps({"refused": str(exc)}))
    sys.exit(3)
print(json.dumps({"computed": s["computed"], "up_to_date": s["up_to_date"]}))
'''


def _extract(texture_data, store, flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", EXTRACT, str(texture_data), str(store), json.dumps(TINY), TINY_LAST,
                             str(flags) if flags else "-"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first extraction ended before pausing: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def test_a_second_extraction_is_refused_mid_write_and_the_store_ends_whole(tmp_path, texture_data):
    from storage import FeatureStore
    from storage.verify import verify_store

    store, flags = tmp_path / "s.h5", tmp_path / "flags"
    flags.mkdir()
    first = _extract(texture_data, store, flags)
    try:
        _wait_for(flags / "paused", first)
        second = _extract(texture_data, store, None)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 3, (out, err[-3000:])
        said = json.loads(out)["refused"]
        assert "being written by pid" in said and str(first.pid) in said, said

        codes = FeatureStore(store).read(TINY_LAST, "avg")  # a reader meanwhile: the committed rows, whole
        assert 0 < len(codes) < 36 and len(set(codes.paths)) == len(codes)
    finally:
        (flags / "go").write_text("")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert json.loads(out)["computed"] == 36

    again = _extract(texture_data, store, None)  # the refused one, run again: nothing left to do
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and json.loads(out)["up_to_date"], (out, err[-3000:])
    codes = FeatureStore(store).read(TINY_LAST, "avg")
    assert len(codes) == 36 and len(set(codes.paths)) == 36
    report = verify_store(store)
    assert report["ok"], report
