"""The fast checked read of features (storage/sums.py): xxh3 sums per chunk, beside HDF5's Fletcher-32.

Each test can fail: the fast path must be taken (spied on), return exactly the checked path's values,
never return a damaged chunk (Fletcher-32 still decides), survive stale or damaged sums, resumed runs
and repairs, and verify must say when the sums are out of date."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from storage import FeatureStore, Manifest, Sample
from storage import sums as sums_module
from storage import reader as reader_module
from storage.errors import StoreDamagedError
from storage.store import GroupSpec, StoreWriter
from storage.tools import repair_store, repair_text, verify_store

IDENT = {"backbone": "toy", "weights": "none", "input_size": 8, "preprocessing": "none"}


def _manifest(n):
    return Manifest("/data", "folders", ["a", "b"],
                    [Sample(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", i % 2, "train" if i % 5 else "val")
                     for i in range(n)])


def _store(path, n=3000, dim=256, batch=700, dtype="float32"):
    """n rows of dim features (1024 rows per chunk at dim 256), appended in batches that straddle chunks."""
    m = _manifest(n)
    spec = GroupSpec("l1", "avg", (dim,), dtype=dtype)
    feats = np.random.default_rng(1).normal(size=(n, dim)).astype(dtype)
    with StoreWriter(path, IDENT, [spec]) as w:
        w.plan(m)
        w.start_appending()
        for i in range(0, n, batch):
            s = m.samples[i:i + batch]
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s],
                     [x.split for x in s], feats[i:i + batch])
        w.finish(m)
    return feats


@pytest.fixture
def spy(monkeypatch):
    """Counts fast reads that returned data, and chunks the fast path had to re-read the checked way."""
    seen = {"fast": 0, "rereads": 0}
    fast, slow = sums_module.read_summed, sums_module.read_rows

    def read_summed(g, n):
        out = fast(g, n)
        seen["fast"] += out is not None
        return out

    def read_rows(ds, start=0, stop=None):
        if ds.name.endswith("/features"):
            seen["rereads"] += 1
        return slow(ds, start, stop)

    monkeypatch.setattr(reader_module, "read_summed", read_summed)
    monkeypatch.setattr(sums_module, "read_rows", read_rows)
    return seen


def _sums(path):
    with h5py.File(path, "r") as f:
        return f["l1/avg/sums"][:], int(f["l1/avg/features"].chunks[0])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reads_take_the_fast_path_and_equal_the_checked_read(tmp_path, spy, dtype):
    path = tmp_path / "s.h5"
    feats = _store(path, dtype=dtype)
    spy.update(fast=0, rereads=0)  # (writing reads back the head of a chunk a batch continues)
    sums, per = _sums(path)
    assert sums.shape == (-(-3000 // per), 2) and sums[:, 1].tolist() == [min(per, 3000 - c * per)
                                                                          for c in range(len(sums))]
    store = FeatureStore(path)
    x = store.read_features("l1")
    assert spy == {"fast": 1, "rereads": 0}
    np.testing.assert_array_equal(x, feats)
    with h5py.File(path, "r") as f:  # the checked (Fletcher-32) read of the same rows
        np.testing.assert_array_equal(f["l1/avg/features"][:], x)
    c = store.read("l1", split="train")  # 80% of the rows: one fast read, then the selection
    assert spy["fast"] == 2 and spy["rereads"] == 0
    np.testing.assert_array_equal(c.features, feats[[i for i in range(3000) if i % 5]])


def test_a_damaged_chunk_is_never_returned_by_the_fast_path(tmp_path, spy):
    path = tmp_path / "s.h5"
    _store(path)
    with h5py.File(path, "r") as f:
        info = f["l1/avg/features"].id.get_chunk_info(1)
    with open(path, "r+b") as fh:  # one byte of rows 1024-2047
        fh.seek(info.byte_offset + 777)
        b = fh.read(1)
        fh.seek(info.byte_offset + 777)
        fh.write(bytes([b[0] ^ 0x21]))
    with pytest.raises(StoreDamagedError, match="rows 1024-2047") as err:
        FeatureStore(path).read_features("l1")
    assert err.value.dataset == "features" and spy["rereads"] >= 1  # found by xxh3, refused by Fletcher-32


def test_stale_or_damaged_sums_cost_speed_not_correctness_and_repair_rebuilds_them(tmp_path, spy):
    path = tmp_path / "s.h5"
    feats = _store(path)
    with h5py.File(path, "a") as f:  # a wrong sum for chunk 2 (a valid Fletcher-32: not damage, staleness)
        f["l1/avg/sums"][2, 0] = np.uint64(12345)
    spy.update(fast=0, rereads=0)
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)
    assert spy == {"fast": 1, "rereads": 1}  # only that chunk was read again the checked way
    r = verify_store(path)
    assert not r["ok"] and any("sums of rows 2048-2999 do not match" in p for p in r["problems"]), r["problems"]
    out = repair_store(path)
    assert out["repaired"] and out["sums_rebuilt"] == ["l1/avg"] and out["rows_dropped"] == {}
    assert "xxh3 sums rebuilt" in repair_text(out)
    assert verify_store(path)["ok"]
    spy.update(fast=0, rereads=0)
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)
    assert spy == {"fast": 1, "rereads": 0}
    assert FeatureStore(path).group_attrs("l1")["manifest_fingerprint"] != ""  # no row changed: still complete

    with h5py.File(path, "r") as f:  # now damage the sums themselves
        info = f["l1/avg/sums"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 3)
        b = fh.read(1)
        fh.seek(info.byte_offset + 3)
        fh.write(bytes([b[0] ^ 0x44]))
    spy.update(fast=0, rereads=0)
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)  # the checked way
    assert spy["fast"] == 0
    r = verify_store(path)
    assert not r["ok"] and {"group": "l1/avg", "dataset": "sums", "rows": None} in r["damaged"]
    assert repair_store(path)["sums_rebuilt"] == ["l1/avg"] and verify_store(path)["ok"]


def test_rows_of_an_unfinished_batch_are_dropped_and_the_last_sum_redone(tmp_path, spy):
    path = tmp_path / "s.h5"
    feats = _store(path, n=1500)
    with h5py.File(path, "a") as f:  # a killed run: 300 rows written, sums updated, committed not advanced
        g = f["l1/avg"]
        for ds in ("features", "path", "sha256", "label", "split"):
            g[ds].resize(1800, axis=0)
        g["features"][1500:] = 7.0
        sums_module.update_sums(g, 1500, g["features"][1500:1800])
    m = _manifest(1500)
    with StoreWriter(path, IDENT, [GroupSpec("l1", "avg", (256,))]) as w:  # the next run drops them
        assert not w.plan(m).union()
    sums, per = _sums(path)
    assert sums[-1, 1] == 1500 - per
    spy.update(fast=0, rereads=0)
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)
    assert spy == {"fast": 1, "rereads": 0}
    assert verify_store(path)["ok"]


def test_a_group_without_sums_reads_the_checked_way_until_repair_adds_them(tmp_path, spy):
    path = tmp_path / "s.h5"
    feats = _store(path, n=500)
    with h5py.File(path, "a") as f:
        del f["l1/avg/sums"]
    spy.update(fast=0, rereads=0)
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)
    r = verify_store(path)
    assert spy["fast"] == 0 and r["ok"] and any("no xxh3 sums" in n for n in r["notes"]), r["notes"]
    assert repair_store(path)["sums_rebuilt"] == ["l1/avg"]  # repair adds them; no row changes
    spy.update(fast=0, rereads=0)
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)
    assert spy == {"fast": 1, "rereads": 0} and not verify_store(path)["notes"]


def test_chunked_reads_take_the_fast_path_where_it_reads_little_more(tmp_path, spy, monkeypatch):
    path = tmp_path / "s.h5"
    feats = _store(path, n=3000, dim=4096, batch=450)  # 64 rows per storage chunk
    fast = sums_module.read_summed
    ranges = []

    def summed(g, n, start=0, stop=None):
        out = fast(g, n, start, stop)
        ranges.append((start, stop, out is not None))
        return out

    monkeypatch.setattr(reader_module, "read_summed", summed)
    spy.update(fast=0, rereads=0)
    store = FeatureStore(path)
    parts = list(store.iter_chunks("l1", rows=500))  # ranges that start and end inside storage chunks
    np.testing.assert_array_equal(np.concatenate([p.features for p in parts]), feats)
    assert [r[:2] for r in ranges] == [(a, min(a + 500, 3000)) for a in range(0, 3000, 500)]
    assert all(r[2] for r in ranges) and spy["rereads"] == 0
    ranges.clear()
    parts = list(store.iter_chunks("l1", rows=512, shuffle_seed=3, block_rows=64))  # whole storage chunks
    got = np.concatenate([p.features for p in parts])
    order = np.argsort([int(h, 16) for p in parts for h in p.sha256])
    np.testing.assert_array_equal(got[order], feats)
    assert ranges and all(r[2] for r in ranges) and spy["rereads"] == 0
    ranges.clear()
    list(store.iter_chunks("l1", rows=64, block_rows=16, shuffle_seed=3))  # blocks inside chunks: checked way
    assert not ranges

    with h5py.File(path, "r") as f:
        info = f["l1/avg/features"].id.get_chunk_info(20)  # rows 1280-1343
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        b = fh.read(1)
        fh.seek(info.byte_offset + 5)
        fh.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(StoreDamagedError, match="rows 1280-1343"):
        list(store.iter_chunks("l1", rows=500))
