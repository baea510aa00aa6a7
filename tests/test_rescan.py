"""Re-scans cost what changed (issue 16): the stat cache of tasks.data.statcache, used by scan_dataset.

Each test counts the files a scan opens under the data folder (``open`` is wrapped: hashing and
sniffing both go through it), so "reads no file contents" is observed, not assumed. Files made by a
test are seconds old at most, which the racy-file rule (a file changed within 2 s of a scan is read
again next time) would treat as possibly changed; so most tests set that margin to 0, and one test
checks the rule itself with the real margin.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from storage.manifest import Manifest
from tasks.data import statcache
from tasks.data.datasets import cache_path_for, scan_dataset
from tasks.data.synthetic import make_image


@pytest.fixture
def no_racy_margin(monkeypatch):
    monkeypatch.setattr(statcache, "RACY_MARGIN_NS", 0)


@pytest.fixture
def data(tmp_path, no_racy_margin):
    """Two classes of small PNGs, one PNG without an extension (sniffed), one text file (not an image)."""
    root = tmp_path / "data"
    for c, cls in enumerate(("cats", "dogs")):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(6):
            make_image("rings", (10, 12), 10 * c + i).save(root / cls / f"{cls}_{i}.png")
        make_image("checks", (10, 12), 50 + c).save(root / cls / "sub" / "deep.png")
    make_image("stripes", (10, 12), 99).save(root / "cats" / "no_extension", format="PNG")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


class Reads:
    """Paths under ``root`` opened through ``open`` while active."""

    def __init__(self, monkeypatch, root: Path):
        self.paths: list[str] = []
        real_open, prefix = builtins.open, str(root.resolve())

        def counting_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)).startswith(prefix):
                self.paths.append(os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", counting_open)

    def take(self) -> list[str]:
        out, self.paths = sorted(os.path.basename(p) for p in self.paths), []
        return out


def scan(data, cache, **kw) -> tuple[Manifest, dict]:
    stats: dict = {}
    return scan_dataset(data, seed=1, cache=cache, stats=stats, **kw), stats


def test_an_unchanged_tree_is_not_read_again_and_gives_the_same_manifest(data, tmp_path, monkeypatch):
    cache = tmp_path / "out" / "m.manifest.json.statcache"
    reads = Reads(monkeypatch, data)
    first, s1 = scan(data, cache)
    assert "no_extension" in reads.take() and s1["read"] == 16 and s1["sniffed"] == 2 and s1["cache"] == "missing"
    assert cache.is_file() and s1["recorded"] == 16
    again, s2 = scan(data, cache)
    assert reads.take() == [] and s2["read"] == 0 and s2["reused"] == 16 and s2["sniffed"] == 0
    assert s2["cache"] == "used" and not s2["cache_rewritten"]
    full = scan_dataset(data, seed=1)  # no cache at all
    assert again == first == full and again.fingerprint() == full.fingerprint()
    assert {k.path: k.reason for k in again.skipped} == {k.path: k.reason for k in full.skipped}
    assert "dogs/notes.txt" in {k.path for k in again.skipped}  # the cached "not an image" verdict, not re-sniffed
    assert "cats/no_extension" in {s.path for s in again.samples}


def test_touched_new_and_deleted_files(data, tmp_path, monkeypatch):
    cache = tmp_path / "m.statcache"
    first, _ = scan(data, cache)
    touched = data / "cats" / "cats_1.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))  # mtime only: same bytes
    shutil.copy(data / "dogs" / "dogs_0.png", data / "dogs" / "sub" / "new.png")
    make_image("blobs", (10, 12), 7).save(data / "cats" / "brand_new.png")
    (data / "dogs" / "dogs_5.png").unlink()
    reads = Reads(monkeypatch, data)
    m, s = scan(data, cache)
    assert reads.take() == ["brand_new.png", "cats_1.png", "new.png"] and s["read"] == 3 and s["reused"] == 14
    paths = {x.path for x in m.samples}
    assert {"cats/brand_new.png", "dogs/sub/new.png"} <= paths and "dogs/dogs_5.png" not in paths
    assert m == scan_dataset(data, seed=1)  # the same manifest as a full scan
    h = {x.path: x.sha256 for x in m.samples}
    assert h["cats/cats_1.png"] == {x.path: x.sha256 for x in first.samples}["cats/cats_1.png"]
    assert h["dogs/sub/new.png"] == h["dogs/dogs_0.png"]
    reads.take()
    again, s = scan(data, cache)  # the rewritten cache knows the new files and forgot the deleted one
    assert reads.take() == [] and s["reused"] == 17 and again == m


def test_content_replaced_with_the_old_size_and_mtime_is_caught_by_ctime(data, tmp_path, monkeypatch):
    cache = tmp_path / "m.statcache"
    first, _ = scan(data, cache)
    target = data / "cats" / "cats_2.png"
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-20] ^= 0xFF  # same size
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    reads = Reads(monkeypatch, data)
    m, s = scan(data, cache)
    assert reads.take() == ["cats_2.png"] and s["read"] == 1
    assert m.fingerprint() != first.fingerprint() and m == scan_dataset(data, seed=1)


def test_rehash_reads_everything_and_catches_what_the_stat_cannot_see(data, tmp_path, monkeypatch):
    """A change the stat does not show (offline edit, clock set back, bit rot) is simulated by a cache whose
    record for one file holds another hash: a cached scan trusts the record without opening the file, which
    proves that it does not; ``rehash=True`` reads every file and finds the real hash."""
    cache = tmp_path / "m.statcache"
    first, _ = scan(data, cache)
    wrong = "0" * 64
    folder = str(data.resolve() / "cats")
    recs = statcache.StatCache.read(cache)[0].folder(folder)
    recs["cats_3.png"] = (recs["cats_3.png"][0], wrong)
    statcache.write(cache, [(folder, list(recs), [k for k, _ in recs.values()], [v for _, v in recs.values()])],
                    started_ns=0)  # a cache of the cats folder only, with one wrong record
    reads = Reads(monkeypatch, data)
    trusted, s = scan(data, cache)
    assert {x.path: x.sha256 for x in trusted.samples}["cats/cats_3.png"] == wrong
    assert "cats_3.png" not in reads.take() and s["reused"] == len(recs)
    rehashed, s = scan(data, cache, rehash=True)
    assert len(reads.take()) == 17 and s["read"] == 16 and s["cache"] == "rehash"  # no_extension: sniff, hash
    assert rehashed == first
    assert scan(data, cache)[0] == first and reads.take() == []  # the cache rehash wrote is right


def _rewrite(cache: Path, lines: list[bytes]) -> None:
    """Write the header and records ``lines[:-2]`` with a trailer whose checksum matches them."""
    body = b"\n".join(lines[:-2]) + b"\n"
    trailer = json.loads(lines[-2])
    trailer["sha256"] = hashlib.sha256(body).hexdigest()
    cache.write_bytes(body + json.dumps(trailer).encode() + b"\n")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "version", "folder record"])
def test_a_damaged_cache_is_ignored_with_a_warning_and_rebuilt(data, tmp_path, monkeypatch, caplog, damage):
    cache = tmp_path / "m.statcache"
    first, _ = scan(data, cache)
    raw = cache.read_bytes()
    lines = raw.split(b"\n")
    if damage == "truncate":
        cache.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        cache.write_bytes(raw[:40] + bytes([raw[40] ^ 1]) + raw[41:])
    elif damage == "garbage":
        cache.write_bytes(os.urandom(300))
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "version":  # a consistent file of another format version
        head = json.loads(lines[0])
        lines[0] = json.dumps({**head, "version": 99}).encode()
        _rewrite(cache, lines)
    else:  # a folder's record damaged and the checksum made to match: caught when the folder is decoded
        rec = json.loads(lines[1])
        rec[2] = "!!not base64"
        lines[1] = json.dumps(rec).encode()
        _rewrite(cache, lines)
    reads = Reads(monkeypatch, data)
    with caplog.at_level(logging.WARNING, logger="cnncodes"):
        m, s = scan(data, cache)
    assert m == first
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "stat cache" in r.getMessage()]
    assert warned, caplog.text
    if damage == "folder record":
        assert s["cache"] == "used" and s["read"] == 7 and "read again" in warned[0]  # the cats folder's files
    else:
        assert s["cache"].startswith("ignored") and s["read"] == 16 and "hashed again" in warned[0]
        assert "nothing to do unless this repeats" in warned[0]
    reads.take()
    again, s = scan(data, cache)  # rebuilt
    assert reads.take() == [] and s["reused"] == 16 and again == first


def test_a_file_changed_within_the_racy_margin_is_read_again(tmp_path, monkeypatch):
    """git's racy-clean problem: a file whose mtime/ctime is not older than the scan's start minus the margin
    could change again within one timestamp tick without its stat changing, so it is not recorded."""
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            make_image("rings", (8, 8), i).save(data / cls / f"{i}.png")
    cache = tmp_path / "m.statcache"
    _, s = scan(data, cache)  # every file was written just now: within the real 2 s margin
    assert s["recorded"] == 0
    reads = Reads(monkeypatch, data)
    _, s = scan(data, cache)
    assert len(reads.take()) == 6 and s["read"] == 6
    past = statcache.RACY_MARGIN_NS
    monkeypatch.setattr(statcache, "RACY_MARGIN_NS", 0)  # as if the files were older than the margin
    _, s = scan(data, cache)
    assert s["recorded"] == 6 and len(reads.take()) == 6 and past == 2_000_000_000
    _, s = scan(data, cache)
    assert reads.take() == [] and s["reused"] == 6


def test_changed_image_rules_sniff_files_without_an_extension_again(data, tmp_path, monkeypatch):
    cache = tmp_path / "m.statcache"
    first, _ = scan(data, cache)
    monkeypatch.setattr(statcache, "media_rules", lambda: "another-pillow")
    reads = Reads(monkeypatch, data)
    m, s = scan(data, cache)
    assert reads.take() == ["no_extension", "no_extension", "notes.txt"] and s["sniffed"] == 2 and m == first


def test_csv_layout_uses_the_cache_too(data, tmp_path, monkeypatch):
    rows = ["path,label"] + [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    listing = data / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    cache = tmp_path / "m.statcache"
    first, _ = scan(listing, cache)
    reads = Reads(monkeypatch, data)
    m, s = scan(listing, cache)
    assert reads.take() == ["list.csv"] and s["read"] == 0 and m == first == scan_dataset(listing, seed=1)


def test_a_fifo_is_skipped_with_a_reason_instead_of_blocking_the_scan(data, no_racy_margin):
    if not hasattr(os, "mkfifo"):  # pragma: no cover
        pytest.skip("no FIFOs here")
    os.mkfifo(data / "cats" / "pipe.png")
    m = scan_dataset(data)
    assert "not a regular file" in {k.path: k.reason for k in m.skipped}["cats/pipe.png"]


def test_the_prefect_task_keeps_the_cache_beside_the_manifest(data, tmp_path, monkeypatch):
    from tasks.prefect_tasks import scan_dataset as scan_task

    manifest = tmp_path / "runs" / "x.manifest.json"
    first = scan_task.fn(str(data), str(manifest), 0.2, 0.15, 0)
    assert cache_path_for(manifest) == tmp_path / "runs" / "x.manifest.json.statcache"
    assert cache_path_for(manifest).is_file() and first["files_read"] == 16 and first["files_reused"] == 0
    reads = Reads(monkeypatch, data)
    again = scan_task.fn(str(data), str(manifest), 0.2, 0.15, 0)
    assert reads.take() == [] and again["files_read"] == 0 and again["fingerprint"] == first["fingerprint"]
    forced = scan_task.fn(str(data), str(manifest), 0.2, 0.15, 0, None, True)
    assert forced["files_read"] == 16 and forced["fingerprint"] == first["fingerprint"]
    assert Manifest.load(manifest).fingerprint() == first["fingerprint"]


def test_rehash_is_a_split_setting_and_a_cli_option():
    from cnncodes.cli import build_parser
    from cnncodes.options import settings_from
    from tasks.settings import SplitConfig

    for command in ("extract", "fine-tune", "transfer"):
        args = build_parser().parse_args([command, "data", "--rehash"] + (["--layer", "x"] * (command == "extract")))
        assert settings_from(args, "split", SplitConfig).rehash is True
    assert SplitConfig().rehash is False


def test_an_unwritable_cache_folder_only_costs_speed(data, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="cnncodes"):
        m, s = scan(data, blocker / "m.statcache")  # its folder is a file
    assert m == scan_dataset(data, seed=1) and s["read"] == 16
    assert "could not write the stat cache" in caplog.text
