"""The feature store on its own: layout, reading while writing, bad files, no TensorFlow needed."""
from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from storage import FeatureStore, Manifest, Sample, StoreError, StoreMismatchError
from storage.store import GroupSpec, StoreWriter, store_is_current

IDENT = {"backbone": "toy", "weights": "none", "input_size": 8, "preprocessing": "none"}


def _manifest(n: int, root: str = "/data") -> Manifest:
    return Manifest(root, "folders", ["a", "b"],
                    [Sample(f"{'ab'[i % 2]}/{i}.jpg", f"{i:064x}", i % 2, "val" if i % 5 == 0 else "train")
                     for i in range(n)])


def _write(path, m: Manifest, feats: np.ndarray, spec=GroupSpec("l1", "avg", (3,)), batch=4, finish=True):
    with StoreWriter(path, IDENT, [spec]) as w:
        plan = w.plan(m)
        w.start_appending()
        todo = plan.todo[spec.name]
        for i in range(0, len(todo), batch):
            idx = todo[i:i + batch]
            s = [m.samples[j] for j in idx]
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s],
                     [x.split for x in s], feats[idx])
        if finish:
            w.finish(m)
    return plan


def test_round_trip_and_layout(tmp_path):
    m = _manifest(10)
    feats = np.random.default_rng(0).normal(size=(10, 3)).astype("f4")
    _write(tmp_path / "s.h5", m, feats)
    fs = FeatureStore(tmp_path / "s.h5")
    c = fs.read("l1")
    order = np.argsort([int(p.split("/")[1][:-4]) for p in c.paths])
    np.testing.assert_array_equal(c.features[order], feats)
    assert list(c.labels[order]) == [i % 2 for i in range(10)]
    assert fs.groups()[0]["rows"] == 10 and fs.groups()[0]["feature_shape"] == [3]
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert set(f["l1/avg"].keys()) == {"features", "path", "sha256", "label", "split", "committed", "state"}
        assert f["l1/avg/features"].chunks[0] >= 1 and f["l1/avg/features"].maxshape == (None, 3)
    assert store_is_current(tmp_path / "s.h5", IDENT, [("l1", "avg")], m.fingerprint())
    assert not store_is_current(tmp_path / "s.h5", IDENT, [("l1", "avg")], _manifest(11).fingerprint())
    assert not store_is_current(tmp_path / "s.h5", dict(IDENT, input_size=9), [("l1", "avg")], m.fingerprint())


def test_unfinished_batches_are_invisible_and_dropped_on_resume(tmp_path):
    m = _manifest(8)
    feats = np.arange(24, dtype="f4").reshape(8, 3)
    path = tmp_path / "s.h5"
    _write(path, m, feats, batch=4, finish=False)
    # Simulate a batch whose rows were written but never committed.
    with h5py.File(path, "a", libver=("v110", "latest")) as f:
        for name in ("features", "path", "sha256", "label", "split"):
            f[f"l1/avg/{name}"].resize(11, axis=0)
    assert len(FeatureStore(path).read("l1")) == 8
    plan = _write(path, _manifest(12), np.arange(36, dtype="f4").reshape(12, 3))
    assert plan.todo["l1/avg"] == [8, 9, 10, 11]
    c = FeatureStore(path).read("l1")
    assert len(c) == 12 and len(set(c.paths)) == 12


def test_a_store_with_the_sums_of_earlier_versions_reads_verifies_and_extends_as_any_other(tmp_path):
    """Groups written by earlier versions also hold ``sums``: (chunks, 2) uint64, the xxh3 of each chunk of
    features, for reads that skipped HDF5's Fletcher-32. Nothing reads it now: out of date or even damaged,
    it troubles no reader, no verify and no repair."""
    from storage.tools import repair_store
    from storage.verify import verify_store

    path = tmp_path / "old.h5"
    spec = GroupSpec("l1", "avg", (256,))  # 1024 rows per chunk: 3 chunks
    feats = np.random.default_rng(0).normal(size=(3200, 256)).astype("f4")
    _write(path, _manifest(3000), feats, spec=spec, batch=700)
    with h5py.File(path, "a", libver=("v110", "latest")) as f:  # as the earlier writer made it
        sums = f["l1/avg"].create_dataset("sums", shape=(0, 2), maxshape=(None, 2), chunks=(4096, 2), dtype="u8",
                                          fletcher32=True)
        sums.resize(3, axis=0)
        sums[:] = [[12345, 1024], [6789, 1024], [1, 952]]  # matching no chunk: out of date
    with h5py.File(path, "r") as f:
        at = f["l1/avg/sums"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:  # and damaged: its own Fletcher-32 fails
        fh.seek(at + 3)
        b = fh.read(1)
        fh.seek(at + 3)
        fh.write(bytes([b[0] ^ 0x44]))
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f["l1/avg/sums"][:]
    store = FeatureStore(path)
    np.testing.assert_array_equal(store.read_features("l1"), feats[:3000])
    np.testing.assert_array_equal(store.read("l1").features, feats[:3000])
    np.testing.assert_array_equal(np.concatenate([c.features for c in store.iter_chunks("l1", rows=500)]),
                                  feats[:3000])
    r = verify_store(path)
    assert r["ok"] and not r["problems"] and not r["notes"] and not r["damaged"], r
    assert repair_store(path)["repaired"] is False
    _write(path, _manifest(3200), feats, spec=spec, batch=150)  # a later run extends it
    np.testing.assert_array_equal(FeatureStore(path).read_features("l1"), feats)
    assert verify_store(path)["ok"]


def test_reader_sees_committed_rows_while_writer_appends(tmp_path):
    m = _manifest(12)
    path = tmp_path / "s.h5"
    spec = GroupSpec("l1", "avg", (3,))
    with StoreWriter(path, IDENT, [spec]) as w:
        w.plan(m)
        w.start_appending()
        seen = []
        for i in range(0, 12, 4):
            s = m.samples[i:i + 4]
            w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s],
                     [x.split for x in s], np.full((4, 3), i, "f4"))
            seen.append(len(FeatureStore(path).read("l1")))  # a reader opens the file mid-write
        w.finish(m)
    assert seen == [4, 8, 12]


def test_not_a_store_and_missing_store_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(tmp_path / "missing.h5")
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"this is not hdf5")
    t = time.monotonic()
    with pytest.raises(StoreError, match="cannot open feature store"):
        FeatureStore(bogus)
    assert time.monotonic() - t < 5  # refused at once, not retried as if locked
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not a cnncodes feature store"):
        FeatureStore(tmp_path / "other.h5")
    with pytest.raises(StoreMismatchError, match="not a cnncodes feature store"):
        with StoreWriter(tmp_path / "other.h5", IDENT, [GroupSpec("l1", "avg", (3,))]):
            pass


def test_unknown_group_errors_name_what_is_there(tmp_path):
    _write(tmp_path / "s.h5", _manifest(4), np.zeros((4, 3), "f4"))
    fs = FeatureStore(tmp_path / "s.h5")
    with pytest.raises(StoreError, match=r"layer 'l2' is not in store .*layers there: l1"):
        fs.read("l2")
    with pytest.raises(StoreError, match=r"has no 'max' pooling \(it has \['avg'\]\)"):
        fs.read("l1", "max")


WRITER = r"""
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from storage import Manifest, Sample
from storage.store import GroupSpec, StoreWriter
n, batch = 400, 8
m = Manifest("/data", "folders", ["a", "b"], [Sample(f"x/{{i}}.jpg", f"{{i:064x}}", i % 2, "train") for i in range(n)])
spec = GroupSpec("l1", "avg", (16,))
with StoreWriter({path!r}, {{"backbone": "toy"}}, [spec]) as w:
    w.plan(m)
    w.start_appending()
    print("appending", flush=True)
    for i in range(0, n, batch):
        s = m.samples[i:i + batch]
        # every value of row k is k: a reader can check each row it sees is whole and in place
        w.append(spec.name, [x.path for x in s], [x.sha256 for x in s], [x.label for x in s], [x.split for x in s],
                 np.repeat(np.arange(i, i + len(s), dtype="f4")[:, None], 16, axis=1))
        time.sleep(0.01)
    w.finish(m)
"""


def test_reading_during_an_extraction_in_another_process(tmp_path):
    """An analyst's reads never see half-written rows, never block the writer and never break the file."""
    import subprocess
    import sys

    from conftest import ROOT

    path = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "appending"
    seen = []
    while proc.poll() is None:
        c = FeatureStore(path).read("l1", "avg")
        rows = np.array([int(p.split("/")[1][:-4]) for p in c.paths])
        assert len(c) % 8 == 0                                   # whole batches only
        assert np.array_equal(rows, np.arange(len(c)))           # in order, no gaps
        assert np.array_equal(c.features, np.repeat(rows[:, None].astype("f4"), 16, axis=1))
        seen.append(len(c))
    assert proc.wait() == 0
    assert len(set(seen)) > 3 and max(seen) <= 400                # the reader saw the store grow
    assert len(FeatureStore(path).read("l1", "avg")) == 400
    with h5py.File(path, "r") as f:                               # and the file closed cleanly
        assert int(f["l1/avg/committed"][0]) == 400


def test_read_features_equals_read_and_filters(tmp_path):
    from test_linear import make_store

    fs = FeatureStore(make_store(tmp_path / "s.h5"))
    full = fs.read("signal", "avg")
    np.testing.assert_array_equal(fs.read_features("signal", "avg"), full.features)
    val = fs.read("signal", "avg", split="val", classes=["cat", "fox"])
    assert set(val.splits) == {"val"} and set(val.labels) == {0, 2}
    np.testing.assert_array_equal(fs.read_features("signal", "avg", split="val", classes=["cat", "fox"]), val.features)
    df = fs.to_dataframe("signal", "avg", split="test")
    assert list(df.columns[:5]) == ["path", "label", "class", "split", "sha256"] and df.shape[1] == 5 + 32
    np.testing.assert_array_equal(df.iloc[:, 5:].to_numpy(), fs.read("signal", "avg", split="test").features)
    with pytest.raises(StoreError, match="class 'wolf' is not in store"):
        fs.read("signal", "avg", classes=["wolf"])


def _sharded(tmp_path):
    """Two shard stores (rows 0-5 and 6-9) and an index presenting them as one store."""
    from storage.format import write_index

    m = _manifest(10)
    feats = np.arange(30, dtype="f4").reshape(10, 3)
    halves = [list(range(6)), list(range(6, 10))]
    paths = []
    for i, rows in enumerate(halves):
        part = Manifest(m.root, m.layout, m.class_names, [m.samples[j] for j in rows])
        paths.append(tmp_path / "s.h5.shards" / f"{i}.h5")
        _write(paths[-1], part, feats[rows])
    write_index(tmp_path / "s.h5", paths, {"backbone": "toy", "class_names": ["a", "b"]})
    return tmp_path / "s.h5", paths, feats


def test_open_store_reads_a_sharded_index_as_one_store_and_feature_store_refuses_it(tmp_path):
    from storage import ShardedStore, StoreReader, open_store
    from storage.format import is_index, read_index

    index, paths, feats = _sharded(tmp_path)
    assert is_index(index) and not is_index(paths[0]) and read_index(index) == [p.resolve() for p in paths]
    store = open_store(index)
    assert isinstance(store, ShardedStore) and isinstance(store, StoreReader) and len(store.shards) == 2
    assert type(open_store(paths[0])) is FeatureStore
    c = store.read("l1", "avg")
    np.testing.assert_array_equal(c.features, feats)
    np.testing.assert_array_equal(store.read_features("l1", split="val"), feats[[0, 5]])
    assert store.groups()[0]["rows"] == 10 and store.group_attrs("l1")["rows"] == 10
    assert store.class_names == ["a", "b"] and len(store.to_dataframe("l1")) == 10
    assert sum(len(x) for x in store.iter_chunks("l1", rows=3)) == 10
    assert set(store.lookup("l1", "avg", [f"{i:064x}" for i in (1, 8)])) == {f"{i:064x}" for i in (1, 8)}
    with pytest.raises(StoreError, match=r"is the index of a sharded store; open it with storage.open_store"):
        FeatureStore(index)
    with pytest.raises(StoreError, match="no feature store at"):
        open_store(tmp_path / "missing.h5")


def test_store_tools_see_a_sharded_store_as_one(tmp_path):
    from storage.tools import export_group, list_store, store_info
    from storage.verify import verify_store

    index, paths, _ = _sharded(tmp_path)
    ls = list_store(index)
    assert ls["groups"][0]["rows"] == 10 and ls["shards"] == [str(p.resolve()) for p in paths]
    v = verify_store(index)
    assert v["ok"] and v["shards"] == [str(p.resolve()) for p in paths]
    for call in (lambda: store_info(index), lambda: export_group(index, "l1", out=tmp_path / "x.csv")):
        with pytest.raises(StoreError, match=r"index of a sharded store .* run it on each shard"):
            call()
    assert store_info(paths[0])["groups"][0]["rows"] == 6


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    from storage.files import atomic_path, atomic_write, atomic_write_json

    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"v": 1})
    assert target.read_text() == '{"v": 1}'
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == '{"v": 1}' and [p.name for p in target.parent.iterdir()] == ["a.json"]
    atomic_write(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"


def test_one_file_lock_for_the_store_writer_and_the_registry(tmp_path):
    from storage import FileLock, ModelRegistry, StoreLockedError
    from storage.files import FileLockBusy, lock_is_held
    from storage.format import writer_holds

    lock = FileLock(tmp_path / "x.lock")
    assert not lock_is_held(tmp_path / "x.lock") and not (tmp_path / "x.lock").exists()  # probed, never made
    with lock:
        assert "pid" in (tmp_path / "x.lock").read_text() and lock_is_held(tmp_path / "x.lock")
        other = FileLock(tmp_path / "x.lock")
        with pytest.raises(FileLockBusy):  # flock locks belong to the open file: a second one is refused
            other.acquire(blocking=False)
    assert not lock_is_held(tmp_path / "x.lock")
    other.acquire(blocking=False)
    other.release()
    with StoreWriter(tmp_path / "s.h5", IDENT, [GroupSpec("l1", "avg", (3,))]):
        assert writer_holds(tmp_path / "s.h5")  # the reader's probe finds the store writer's lock
        with pytest.raises(StoreLockedError, match="is being written by pid"):
            with StoreWriter(tmp_path / "s.h5", IDENT, [GroupSpec("l1", "avg", (3,))]):
                pass
    reg = ModelRegistry(tmp_path / "reg")
    rec = reg.save("m", {"w": 1}, {})
    reg.set_alias("m", "champion", rec.version)  # takes the registry's lock, a FileLock
    assert reg.aliases("m") == {"champion": 1}


def _class_sorted(path, n=200, dims=8192, compression=None) -> Manifest:
    """A store of ``n`` rows sorted by class (all of a, then all of b, as an extraction from class folders
    writes them), with rows wide enough (32 KiB) that a storage chunk of the features holds 32 rows;
    ``features[:, 0]`` is the row's number, which is also its content hash."""
    m = Manifest("/data", "folders", ["a", "b"],
                 [Sample(f"{'ab'[i >= n // 2]}/{i:04d}.jpg", f"{i:064x}", int(i >= n // 2),
                         "val" if i % 5 == 0 else "train") for i in range(n)])
    feats = np.zeros((n, dims), "f4")
    feats[:, 0] = np.arange(n)
    _write(path, m, feats, spec=GroupSpec("l1", "avg", (dims,), compression=compression), batch=50)
    return m


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_block_shuffled_chunks_mix_a_class_sorted_store_and_read_each_row_once(tmp_path, monkeypatch, compression):
    from storage import reader

    _class_sorted(tmp_path / "s.h5", compression=compression)
    fs = FeatureStore(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["l1/avg/features"].chunks[0] == 32
    train = fs.read("l1", split="train")
    assert len(train) == 160
    in_order = list(fs.iter_chunks("l1", split="train", rows=64))
    assert [sorted(set(c.labels)) for c in in_order] == [[0], [0, 1], [1], [1]]  # one class a chunk, but at the seam

    reads = []
    real_read = reader._Rows.read

    def spy(self, start, stop, wanted):
        reads.append((start, stop))
        return real_read(self, start, stop, wanted)

    monkeypatch.setattr(reader._Rows, "read", spy)
    for rows, block in ((64, 8), (256, 32), (40, 5)):  # blocks of rows // 8 store rows, at most a storage chunk
        reads.clear()
        chunks = list(fs.iter_chunks("l1", split="train", rows=rows, shuffle_seed=1))
        # each block read once, within one storage chunk, and together the whole group
        assert sorted(reads) == [(b, min(b + block, c + 32, 200)) for c in range(0, 200, 32)
                                 for b in range(c, min(c + 32, 200), block)], rows
        assert reads != sorted(reads)
        # every train row once; chunks of `rows` rows but the last; rows where their hashes say
        got = reader.Codes.concat(chunks)
        assert sorted(got.sha256) == sorted(train.sha256) and len(got) == 160
        assert [len(c) for c in chunks[:-1]] == [rows] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= rows
        assert (got.features[:, 0] == [int(h, 16) for h in got.sha256]).all()
        assert (got.labels == (got.features[:, 0] >= 100)).all() and set(got.splits) == {"train"}
        # both classes in every chunk, in no particular order within it
        assert all(set(c.labels) == {0, 1} for c in chunks), [np.bincount(c.labels) for c in chunks]
        assert all((np.diff(c.features[:, 0]) < 0).any() for c in chunks if len(c) > 1)
    again = [c.sha256 for c in fs.iter_chunks("l1", split="train", rows=64, shuffle_seed=1)]
    other = [c.sha256 for c in fs.iter_chunks("l1", split="train", rows=64, shuffle_seed=2)]
    first = [c.sha256 for c in fs.iter_chunks("l1", split="train", rows=64, shuffle_seed=1)]
    assert all((a == b).all() for a, b in zip(again, first)) and len(again) == len(first)
    assert not (other[0] == first[0]).all()
    everything = list(fs.iter_chunks("l1", rows=64, shuffle_seed=(3, 0)))  # no split: every row
    assert sum(len(c) for c in everything) == 200
    assert set(np.concatenate([c.splits for c in everything])) == {"val", "train"}


def test_block_shuffled_chunks_of_a_sharded_store_mix_the_shards(tmp_path):
    from storage import open_store

    index, _, feats = _sharded(tmp_path)  # rows 0-5 in one shard, 6-9 in the other
    store = open_store(index)
    chunks = list(store.iter_chunks("l1", rows=4, shuffle_seed=0, block_rows=1))
    got = np.concatenate([c.features for c in chunks])
    assert sorted(got[:, 0].tolist()) == feats[:, 0].tolist() and [len(c) for c in chunks] == [4, 4, 2]
    assert any(len({int(x) >= 18 for x in c.features[:, 0]}) == 2 for c in chunks)  # rows of both shards in one
    assert [c.sha256.tolist() for c in store.iter_chunks("l1", rows=4, shuffle_seed=0, block_rows=1)] == \
        [c.sha256.tolist() for c in chunks]
    train = list(store.iter_chunks("l1", split="train", rows=3, shuffle_seed=5))
    assert sorted(np.concatenate([c.sha256 for c in train])) == sorted(store.read("l1", split="train").sha256)
