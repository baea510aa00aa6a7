"""Stores never hang and never rot silently (issue 15): bounded opens, checksums, verify and repair."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, TINY_EARLY, TINY_LAST
from storage import FeatureStore, Manifest, Sample, StoreError, open_store
from storage import writer as writer_module
from storage.errors import StoreDamagedError
from storage.store import GroupSpec, StoreWriter
from storage.tools import repair_store, repair_text
from storage.verify import verify_store, verify_text

IDENT = {"backbone": "toy", "weights": "none", "input_size": 8, "preprocessing": "none"}


def _toy_store(path, n=40, dim=3):
    m = Manifest("/data", "folders", ["a", "b"], [Sample(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", i % 2, "train")
                                                  for i in range(n)])
    spec = GroupSpec("l1", "avg", (dim,))
    feats = np.random.default_rng(0).normal(size=(n, dim)).astype("f4")
    with StoreWriter(path, IDENT, [spec]) as w:
        w.plan(m)
        w.start_appending()
        w.append(spec.name, [s.path for s in m.samples], [s.sha256 for s in m.samples],
                 [s.label for s in m.samples], [s.split for s in m.samples], feats)
        w.finish(m)
    return feats


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))


def _chunk_offset(path, name: str, index: int = 0) -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(index).byte_offset


def test_every_dataset_of_a_new_store_carries_a_checksum(tmp_path):
    _toy_store(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        datasets = []
        f.visititems(lambda n, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
        assert len(datasets) == 9 and all(d.fletcher32 for d in datasets), [d.name for d in datasets]
        # text attributes live in the (checksummed) object header, not in the global heap
        assert isinstance(f.attrs["format"], bytes) and isinstance(f["l1/avg"].attrs["layer"], bytes)
    assert FeatureStore(tmp_path / "s.h5").provenance["backbone"] == "toy"


def test_a_store_cut_short_is_a_quick_error_naming_it(tmp_path):
    path = tmp_path / "s.h5"
    _toy_store(path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.h5"
    for n in (0, 100, 2048, 6000, 12000, 20000, len(raw) // 2, len(raw) - 1):
        cut.write_bytes(raw[:n])
        t = time.monotonic()
        with pytest.raises(StoreError, match=str(cut)):
            open_store(cut).read("l1")
        assert time.monotonic() - t < 5
        r = verify_store(cut)
        assert not r["ok"] and str(cut) in r["problems"][0]
    cut.write_bytes(raw[:6000])
    with pytest.raises(StoreError, match="cut short"):
        FeatureStore(cut)


def test_a_flipped_feature_byte_is_found_refused_and_repaired(tmp_path):
    path = tmp_path / "s.h5"
    feats = _toy_store(path, n=3000, dim=256)  # 1024 rows per chunk: rows 1024-2047 are the second chunk
    _flip(path, _chunk_offset(path, "l1/avg/features", 1) + 4096)
    r = verify_store(path)
    assert not r["ok"] and r["damaged"] == [{"group": "l1/avg", "dataset": "features", "rows": [[1024, 2048]]}]
    assert "group l1/avg: dataset features: rows 1024-2047 damaged" in verify_text(r)
    store = FeatureStore(path)
    for read in (lambda: store.read("l1"), lambda: store.read_features("l1"),
                 lambda: list(store.iter_chunks("l1", rows=500)),
                 lambda: store.lookup("l1", "avg", [f"{1500:064x}"])):
        with pytest.raises(StoreDamagedError, match="group l1/avg, dataset features: rows? 1") as err:
            read()
        assert err.value.group == "l1/avg" and err.value.dataset == "features" and str(path) in str(err.value)
    # rows outside the damaged chunk still read
    assert len(next(iter(store.iter_chunks("l1", rows=1024)))) == 1024
    assert store.lookup("l1", "avg", [f"{5:064x}"])[f"{5:064x}"].tolist() == feats[5].tolist()

    out = repair_store(path)
    assert out["rows_dropped"] == {"l1/avg": 1024} and out["dropped"] == {"l1/avg": [[1024, 2048]]}
    assert "the same `cnncodes extract` again" in repair_text(out)
    after = verify_store(path)
    assert after["ok"] and after["groups"][0]["rows"] == 3000 - 1024
    c = FeatureStore(path).read("l1")
    kept = np.r_[0:1024, 2048:3000]
    np.testing.assert_array_equal(c.features, feats[kept])
    assert list(c.sha256) == [f"{i:064x}" for i in kept]
    assert FeatureStore(path).group_attrs("l1")["manifest_fingerprint"] == ""  # to be completed by extract
    assert repair_store(path)["repaired"] is False


def test_damage_in_small_datasets_and_run_records_is_found_too(tmp_path):
    path = tmp_path / "s.h5"
    _toy_store(path)
    for name in ("l1/avg/committed", "_updated"):
        broken = tmp_path / f"{name.replace('/', '_')}.h5"
        shutil.copy(path, broken)
        _flip(broken, _chunk_offset(broken, name) + 2)
        with pytest.raises(StoreDamagedError, match=name.rpartition("/")[2]):
            FeatureStore(broken).read("l1") if "committed" in name else FeatureStore(broken).provenance
        assert not verify_store(broken)["ok"]
        repair_store(broken)
        assert verify_store(broken)["ok"]


def test_old_stores_without_checksums_still_read_and_verify_says_unchecked(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "CHECKED", {})
    feats = _toy_store(tmp_path / "old.h5")
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureStore(tmp_path / "old.h5").read("l1").features, feats)
    r = verify_store(tmp_path / "old.h5")
    assert r["ok"] and r["unchecked"] == ["l1/avg"]
    assert "unchecked" in verify_text(r) and any("carry no checksums" in n for n in r["notes"])
    assert repair_store(tmp_path / "old.h5")["unchecked"] == ["l1/avg"]


_HOLD = textwrap.dedent("""
    import sys, time, h5py
    sys.path.insert(0, {root!r})
    from storage.files import FileLock
    lock = FileLock({lock!r}); lock.acquire()
    f = h5py.File({path!r}, "a", libver=("v110", "latest"))
    print("held", flush=True)
    time.sleep({hold})
    f.close(); lock.release()
""")


def test_a_reader_waits_for_a_writer_preparing_the_file_and_not_for_a_dead_one(tmp_path):
    path = tmp_path / "s.h5"
    feats = _toy_store(path)
    code = _HOLD.format(root=str(ROOT), lock=str(path) + ".lock", path=str(path), hold=1.5)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t = time.monotonic()
    np.testing.assert_array_equal(FeatureStore(path).read("l1").features, feats)  # waited for the writer
    assert 0.5 < time.monotonic() - t < 10
    holder.wait()
    # a writer killed while preparing the file leaves it flagged as open, without a lock: no waiting
    code = _HOLD.format(root=str(ROOT), lock=str(tmp_path / "other.lock"), path=str(path), hold=60)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    t = time.monotonic()
    with pytest.raises(StoreError, match="left open by a writer that stopped"):
        FeatureStore(path)
    assert time.monotonic() - t < 5
    # ... and the next writer recovers it, as the message says
    m = Manifest("/data", "folders", ["a", "b"], [Sample(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", i % 2, "train")
                                                  for i in range(40)])
    with StoreWriter(path, IDENT, [GroupSpec("l1", "avg", (3,))]) as w:
        assert w.recovered and w.plan(m).todo["l1/avg"] == []
    np.testing.assert_array_equal(FeatureStore(path).read("l1").features, feats)


@pytest.mark.slow
def test_repair_then_extract_gives_the_undamaged_store(tmp_path, texture_data, tiny_spec):
    from tasks.data.datasets import scan_dataset
    from tasks.extract import extract_to_store

    m = scan_dataset(texture_data)
    cuts = [(TINY_LAST, "avg"), (TINY_EARLY, "none")]  # the second: 9 rows per chunk
    good = tmp_path / "good.h5"
    extract_to_store(m, good, tiny_spec, cuts)
    damaged = tmp_path / "damaged.h5"
    shutil.copy(good, damaged)
    group = f"{TINY_EARLY}/none"
    _flip(damaged, _chunk_offset(damaged, f"{group}/features", 1) + 1000)

    cli = [sys.executable, "-m", "cnncodes.cli", "store"]
    env_run = dict(capture_output=True, text=True, cwd=ROOT, timeout=300)
    v = subprocess.run(cli + ["verify", str(damaged), "--json"], **env_run)
    assert v.returncode == 1
    found = json.loads(v.stdout)["damaged"]
    assert found == [{"group": group, "dataset": "features", "rows": [[9, 18]]}]
    with pytest.raises(StoreDamagedError, match=f"group {group}, dataset features: rows 9-17"):
        FeatureStore(damaged).read(TINY_EARLY, "none")
    r = subprocess.run(cli + ["repair", str(damaged)], **env_run)
    assert r.returncode == 0 and "dropped 9 damaged row(s)" in r.stdout, r.stdout + r.stderr

    again = extract_to_store(m, damaged, tiny_spec, cuts)
    assert again["computed"] == 9  # only the dropped rows went through the backbone again
    assert verify_store(damaged)["ok"]
    for layer, pooling in cuts:
        a, b = FeatureStore(damaged).read(layer, pooling), FeatureStore(good).read(layer, pooling)
        ia, ib = np.argsort(a.paths.astype(str)), np.argsort(b.paths.astype(str))
        assert (a.paths[ia] == b.paths[ib]).all() and (a.labels[ia] == b.labels[ib]).all()
        np.testing.assert_array_equal(a.features[ia], b.features[ib])


def test_a_writer_killed_while_rewriting_a_chunk_loses_only_that_chunks_rows(tmp_path):
    """A killed writer can leave the chunk it was rewriting half-written: its checksum fails. The next writer
    drops that chunk's rows (its run recomputes them) and keeps the others, instead of giving up on the store."""
    import subprocess
    import sys

    from conftest import ROOT

    path = tmp_path / "s.h5"
    feats = _toy_store(path, n=9000)
    offset = _chunk_offset(path, "l1/avg/features", 1)  # the second chunk of the features, torn below
    killed = ("import h5py, os, sys\n"
              "f = h5py.File(sys.argv[1], 'a', libver='latest'); f.swmr_mode = True; f.flush()\n"
              "with open(sys.argv[1], 'r+b') as fh:\n    fh.seek(int(sys.argv[2]) + 100); fh.write(b'torn')\n"
              "os._exit(0)  # killed: the file stays flagged open for writing")
    subprocess.run([sys.executable, "-c", killed, str(path), str(offset)], cwd=ROOT, check=True)
    spec = GroupSpec("l1", "avg", (3,))
    with StoreWriter(path, IDENT, [spec]) as w:
        assert w.recovered
    codes = FeatureStore(path).read("l1", "avg")
    assert 0 < len(codes) < 9000  # the torn chunk's rows went, the others stayed, exactly as written
    kept = np.array([int(p.split("/")[1].split(".")[0]) for p in codes.paths.astype(str)])
    np.testing.assert_array_equal(codes.features, feats[kept])
