"""Re-scans of a watched dataset touch only what changed, and give the manifest a full scan would give.

A stand-in journal (the changed paths, as the watcher would record them) drives :mod:`tasks.data.incremental`;
every scenario checks the incremental manifest against a full scan of the same files, sample by sample."""
from __future__ import annotations

import logging
import os
import shutil
import sys

import pytest
from PIL import Image

from storage.manifest import Manifest
from tasks.data import incremental
from tasks.data.incremental import ScanIndex, index_path_for, scan_to_manifest


class Journal:
    """What :class:`tasks.data.watcher.Journal` answers: the paths changed between two positions."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.id = "test-1"
        self.paths: list[str] = []

    def note(self, *paths):
        self.paths.extend(os.path.realpath(p) for p in paths)

    def sync(self) -> int:
        return len(self.paths)

    def changes(self, since, upto):
        return set(self.paths[since[1]:upto]) if since[0] == self.id else None


def _png(path, i: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (2, 2), (i % 256, (i // 256) % 256, 7)).save(path)
    return str(path)


@pytest.fixture
def watched(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for c in ("ants", "bees", "wasps"):
        for i in range(12):
            _png(data / c / f"{c}{i:02d}.png", hash((c, i)) % 60000)
    journal = Journal(data)
    monkeypatch.setattr(incremental, "find_journal", lambda d: journal if os.path.isdir(d) else None)
    return data, journal, tmp_path / "run" / "m.json"


def _scan(data, manifest, **kw):
    stats: dict = {}
    out = scan_to_manifest(data, manifest, 0.25, 0.25, 3, stats=stats, **kw)
    return out, stats


def _same_as_full(data, manifest, tmp_path, **kw):
    """The manifest at ``manifest`` (deltas applied) holds what a full scan of ``data`` gives."""
    got = Manifest.load(manifest)
    full_path = tmp_path / "full" / "m.json"
    shutil.rmtree(full_path.parent, ignore_errors=True)
    full_path.parent.mkdir()
    scan_to_manifest(data, full_path, 0.25, 0.25, 3, watch=False, **kw)
    want = Manifest.load(full_path)
    assert got.class_names == want.class_names
    assert sorted(got.samples, key=lambda s: s.path) == sorted(want.samples, key=lambda s: s.path)
    assert sorted((k.path, k.reason) for k in got.skipped) == sorted((k.path, k.reason) for k in want.skipped)
    assert got.fingerprint() == want.fingerprint()
    return got


def test_added_removed_changed_files_follow_the_full_scan(watched, tmp_path):
    data, journal, manifest = watched
    manifest.parent.mkdir()
    first, stats = _scan(data, manifest)
    assert not first["incremental"] and index_path_for(manifest).exists()
    assert stats["read"] == 36
    before = {s.path: s.split for s in Manifest.load(manifest).samples}

    added = [_png(data / "ants" / f"new{i}.png", 61000 + i) for i in range(9)]
    added += [_png(data / "bees" / f"new{i}.png", 62000 + i) for i in range(3)]
    os.remove(data / "wasps" / "wasps03.png")
    _png(data / "bees" / "bees05.png", 63000)  # new content, same path
    os.utime(data / "bees" / "bees06.png")  # touched only
    (data / "wasps" / "notes.txt").write_text("not an image")
    journal.note(*added, data / "wasps" / "wasps03.png", data / "bees" / "bees05.png", data / "bees" / "bees06.png",
                 data / "wasps" / "notes.txt")
    out, stats = _scan(data, manifest)
    assert out["incremental"]
    assert stats["read"] == 12 + 2 + 1  # the new, the rewritten, the touched and the text file: nothing else
    assert out["images"] == 36 + 12 - 1 and out["skipped"] == 1
    got = _same_as_full(data, manifest, tmp_path)
    moved = {s.path for s in got.samples if s.path in before and before[s.path] != s.split}
    assert moved and len(moved) <= 6  # growing a class moves only the files at its boundaries

    os.remove(data / "wasps" / "notes.txt")  # a skip goes away; an image becomes unreadable as an image
    (data / "ants" / "ants01.png").write_bytes(b"")
    journal.note(data / "wasps" / "notes.txt", data / "ants" / "ants01.png")
    out, _ = _scan(data, manifest)
    assert out["incremental"]
    _same_as_full(data, manifest, tmp_path)


def test_folders_that_appear_or_vanish_are_listed(watched, tmp_path):
    data, journal, manifest = watched
    manifest.parent.mkdir()
    _scan(data, manifest)
    for i in range(5):
        _png(data / "ants" / "more" / "deeper" / f"m{i}.png", 50000 + i)
    (data / "ants" / "more" / "notes.txt").write_text("not an image")
    journal.note(data / "ants" / "more")  # only the folder: its files were there before any watch
    out, stats = _scan(data, manifest)
    assert out["incremental"] and stats["read"] == 6 and out["images"] == 41 and out["skipped"] == 1
    _same_as_full(data, manifest, tmp_path)

    shutil.rmtree(data / "ants" / "more")
    journal.note(data / "ants" / "more")
    out, stats = _scan(data, manifest)
    assert out["incremental"] and stats["read"] == 0 and out["images"] == 36 and out["skipped"] == 0
    _same_as_full(data, manifest, tmp_path)


def test_nothing_changed_writes_nothing(watched):
    data, journal, manifest = watched
    manifest.parent.mkdir()
    _scan(data, manifest)
    files = (manifest, index_path_for(manifest), manifest.with_name("m.json.statcache"))
    before = [p.read_bytes() for p in files]
    out, stats = _scan(data, manifest)
    assert out["incremental"] and stats["read"] == 0 and out["images"] == 36
    assert [p.read_bytes() for p in files] == before

    journal.note(data / ".hidden", data / "ants" / ".DS_Store")  # never scanned: only the position moves
    out, stats = _scan(data, manifest)
    assert out["incremental"] and stats["read"] == 0 and out["images"] == 36
    got = Manifest.load(manifest)
    assert got.scan["offset"] == 2 and got.state == incremental.manifest_state(manifest) != out.get("fingerprint")


@pytest.mark.parametrize("change", ["new class", "copy", "restarted watcher", "seed", "torn manifest", "killed"])
def test_what_the_index_cannot_follow_is_scanned_whole(watched, tmp_path, change, caplog):
    data, journal, manifest = watched
    manifest.parent.mkdir()
    _scan(data, manifest)
    new = _png(data / "ants" / "new.png", 61234)
    journal.note(new)
    kw = {}
    if change == "new class":
        journal.note(_png(data / "hornets" / "h.png", 61235))
    elif change == "copy":
        shutil.copy(data / "bees" / "bees01.png", data / "ants" / "copy.png")
        journal.note(data / "ants" / "copy.png")
    elif change == "restarted watcher":
        journal.id = "test-2"
    elif change == "torn manifest":
        with open(manifest, "ab") as fh:
            fh.write(b'{"set": [')
    elif change == "killed":  # a scan killed after its manifest line, before its index
        real = ScanIndex.save

        def killed(self, path):
            raise KeyboardInterrupt

        ScanIndex.save = killed
        try:
            with pytest.raises(KeyboardInterrupt):
                _scan(data, manifest)
        finally:
            ScanIndex.save = real
    with caplog.at_level(logging.INFO, logger="cnncodes"):
        if change == "seed":
            out = scan_to_manifest(data, manifest, 0.25, 0.25, 4)
            kw = {}
        else:
            out, _ = _scan(data, manifest)
    assert not out["incremental"]
    assert "listing every file" in caplog.text
    if change == "seed":
        got = Manifest.load(manifest)
        full = tmp_path / "full.json"
        scan_to_manifest(data, full, 0.25, 0.25, 4, watch=False)
        assert got.fingerprint() == Manifest.load(full).fingerprint()
    else:
        _same_as_full(data, manifest, tmp_path, **kw)
    # and the scan after the full one is incremental again (but where copies keep it whole)
    journal.note(_png(data / "bees" / "later.png", 61300))
    again = scan_to_manifest(data, manifest, 0.25, 0.25, 4 if change == "seed" else 3)
    assert again["incremental"] == (change != "copy")


def test_split_folders_with_a_test_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            for i in range(4):
                _png(data / split / c / f"{split}{c}{i}.png", hash((split, c, i)) % 60000)
    journal = Journal(data)
    monkeypatch.setattr(incremental, "find_journal", lambda d: journal)
    manifest = tmp_path / "m.json"
    _scan(data, manifest)
    journal.note(_png(data / "test" / "b" / "new.png", 61000), _png(data / "train" / "a" / "new.png", 61001))
    os.remove(data / "val" / "a" / "vala0.png")
    journal.note(data / "val" / "a" / "vala0.png")
    out, _ = _scan(data, manifest)
    assert out["incremental"] and out["images"] == 25
    got = _same_as_full(data, manifest, tmp_path)
    assert {s.path: s.split for s in got.samples}["test/b/new.png"] == "test"


def test_the_manifest_chain_finds_an_edited_change(watched):
    data, journal, manifest = watched
    manifest.parent.mkdir()
    _scan(data, manifest)
    journal.note(_png(data / "ants" / "new.png", 61234))
    _scan(data, manifest)
    raw = manifest.read_bytes()
    manifest.write_bytes(raw.replace(b'"new.png"', b'"neu.png"').replace(b"ants/new.png", b"ants/neu.png"))
    from storage.errors import DatasetError

    with pytest.raises(DatasetError, match="does not match its checksum"):
        Manifest.load(manifest)


def test_stat_cache_chunks_override_and_a_torn_one_is_cut(tmp_path):
    from tasks.data import statcache

    path = tmp_path / "c.statcache"
    key_a, key_b, key_b2 = (1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)
    statcache.write(path, [("/d", ["a", "b"], [key_a, key_b], ["a" * 64, "b" * 64])], 0)
    assert statcache.append(path, [("/d", ["b"], [key_b2], ["c" * 64])]) == 1
    cache, status = statcache.StatCache.read(path)
    assert status == "used" and cache.files == 3
    assert cache.folder("/d") == {"a": (key_a, "a" * 64), "b": (key_b2, "c" * 64)}

    with open(path, "ab") as fh:
        fh.write(b'["/d", "x')  # a scan killed while appending
    cache, status = statcache.StatCache.read(path)
    assert status == "used" and cache.files == -1  # never "unchanged": the next full scan rewrites it
    assert cache.folder("/d")["b"] == (key_b2, "c" * 64)
    assert statcache.append(path, [("/e", ["z"], [key_a], ["!not an image"])]) == 1  # cuts the torn line first
    cache, _ = statcache.StatCache.read(path)
    assert cache.files == 4 and cache.folder("/e") == {"z": (key_a, "!not an image")}

    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"/e"', b'"/f"'))  # an edited chunk: it is left out
    cache, _ = statcache.StatCache.read(path)
    assert cache.files == -1 and cache.folder("/f") == {} and cache.folder("/d")["a"] == (key_a, "a" * 64)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watcher needs Linux's inotify")
def test_with_a_real_watcher(tmp_path, monkeypatch):
    from tasks.data import watcher

    monkeypatch.setenv("CNNCODES_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(10):
            _png(data / c / f"{c}{i}.png", hash((c, i)) % 60000)
    manifest = tmp_path / "m.json"
    watcher.start(data)
    try:
        first, _ = _scan(data, manifest)
        assert not first["incremental"] and index_path_for(manifest).exists()
        _png(data / "a" / "new.png", 61000)
        for i in range(3):
            _png(data / "b" / "sub" / f"s{i}.png", 61100 + i)
        os.remove(data / "a" / "a3.png")
        out, stats = _scan(data, manifest)
        assert out["incremental"] and stats["read"] == 4 and out["images"] == 23
        _same_as_full(data, manifest, tmp_path)
    finally:
        watcher.stop(data)
    out, _ = _scan(data, manifest)  # no watcher: the full listing, which gives the same manifest
    assert not out["incremental"] and out["images"] == 23


def test_scans_into_one_manifest_take_turns(watched, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    data, journal, manifest = watched
    manifest.parent.mkdir()
    _scan(data, manifest)
    journal.note(*[_png(data / "bees" / f"n{i}.png", 64000 + i) for i in range(6)])
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: scan_to_manifest(data, manifest, 0.25, 0.25, 3), range(4)))
    assert all(o["incremental"] for o in outs) and {o["images"] for o in outs} == {42}
    assert sum(o["files_read"] for o in outs) == 6  # the first one read them; the others found nothing new
    _same_as_full(data, manifest, tmp_path)
