"""Scan a dataset into its manifest at a cost that grows with what changed, not with the dataset.

A scan with its stat cache (:mod:`tasks.data.statcache`) reads only changed files, but still lists and
stats every file, draws every split and writes the whole manifest: at 200,000 files that floor is
seconds, at a million tens of seconds, however little changed. When a **watcher** runs for the data
folder (:mod:`tasks.data.watcher`, ``cnncodes watch start DATA``), the scan asks it instead which paths
changed since the last scan, and touches only those:

* the manifest records the watcher's journal position it is up to date with (``manifest.scan``);
* a **scan index** beside the manifest (``<manifest>.scanindex.npz``, :class:`ScanIndex`) holds, per sample,
  its class, its split's rank (the first 8 bytes of the seeded sha256 of its path that orders a class in
  :func:`~tasks.data.datasets.assign_splits`), its split and its content hash's first 8 bytes, sorted by
  class and rank, in NumPy arrays read in milliseconds;
* a re-scan syncs with the watcher, takes the changed paths from its journal, stats and reads only those
  (folders that appeared or vanished are listed), finds each in the index by its rank, and works out the
  split exactly as a full scan would: a class's split is positional in rank order, so adding or removing
  files moves only the few files at the moving boundaries;
* it appends the change to the manifest as one delta line (:meth:`storage.manifest.Manifest.append_delta`),
  the new files' records to the stat cache (:func:`tasks.data.statcache.append`), and rewrites the index.

The result is the manifest a full scan of the same files would write (the same samples, labels, splits
and skips; new samples come last). What the index cannot follow falls back to the full scan, which
writes everything anew, and the reason is logged: a layout other than class folders (or split folders
with a test folder), grouped or pinned splits, identical files (which must share a split), a class
folder added or removed, a class left empty, files of another media kind, a changed setting, a watcher
that was restarted or lost track (queue overflow), an index that does not match the manifest (a scan
killed between writing the two).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat as statmod
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage.files import FileLock, atomic_path
from storage.manifest import Manifest

from . import statcache
from .datasets import SPLIT_ALIASES, _is_hidden, _judge, _unused_reason, _walk, check_split_params, class_counts
from .media import content_kind, kind_from_extension

SUFFIX = ".scanindex.npz"
VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = ("train", "val", "test")
NEW = 255  # the split code of a row not placed yet

Progress = Callable[[int, int], None]
log = logging.getLogger("cnncodes")


def index_path_for(manifest_path: str | os.PathLike) -> Path:
    return Path(str(manifest_path) + SUFFIX)


def rank64(seed: int, rel: str) -> int:
    """The first 8 bytes of :func:`tasks.data.datasets._rank`: the same order, but for ties."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big")


def manifest_state(path: str | os.PathLike) -> str | None:
    """The :attr:`~storage.manifest.Manifest.state` of the manifest at ``path``, from its last line only;
    None when it cannot be told (no file, a torn last line, a manifest without a checksum)."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, end - 4096))
            tail = fh.read()
    except OSError:
        return None
    if not tail.endswith(b"\n"):
        return None
    line = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:-1].decode("ascii", "replace")
    if "\t" in line:
        return line.rpartition("\t")[2]
    if line.startswith('"sha256": "') and line.endswith('"}'):
        return line[11:-2]
    return None


@dataclass
class ScanIndex:
    """The samples of a manifest as arrays sorted by (label, rank); ``pid`` points into the path table
    (``offsets`` into ``blob``, UTF-8), which only grows between full scans."""

    meta: dict
    label: np.ndarray
    rank: np.ndarray
    split: np.ndarray
    sha: np.ndarray
    pid: np.ndarray
    offsets: np.ndarray
    blob: bytes
    skips: set[str]
    _starts: np.ndarray | None = None  # where each class's rows start (and the end), found once

    @classmethod
    def build(cls, manifest: Manifest) -> "ScanIndex | str":
        """The index of a freshly scanned manifest, or why a re-scan of it cannot be incremental."""
        if manifest.layout not in ("folders", "split-folders"):
            return f"the {manifest.layout} layout"
        if manifest.groups or manifest.group_by:
            return "a grouped split"
        if manifest.scan.get("pinned"):
            return "pinned splits"
        drawn = manifest.layout == "folders"
        if not drawn and manifest.split_fractions:
            return "a test split carved from val"
        seed = manifest.split_seed if drawn else 0
        samples = manifest.samples
        n = len(samples)
        paths = [s.path.encode() for s in samples]
        label = np.fromiter((s.label for s in samples), np.int32, n)
        rank = np.fromiter((rank64(seed, s.path) for s in samples), np.uint64, n)
        sha = np.fromiter((int(s.sha256[:16], 16) for s in samples), np.uint64, n)
        split = np.fromiter((SPLIT_CODES[s.split] for s in samples), np.uint8, n)
        if len(np.unique(sha)) < n:
            return "identical files (which must share a split)"
        order = np.lexsort((rank, label))
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(p) for p in paths], out=offsets[1:])
        meta = {"version": VERSION, "state": manifest.state, "scan": dict(manifest.scan), "root": manifest.root,
                "layout": manifest.layout, "classes": list(manifest.class_names), "media": manifest.media,
                "seed": seed, "fractions": dict(manifest.split_fractions)}
        idx = cls(meta=meta, label=label[order], rank=rank[order], split=split[order], sha=sha[order],
                  pid=order.astype(np.int64), offsets=offsets, blob=b"".join(paths),
                  skips={k.path for k in manifest.skipped})
        if idx._ties():
            return "two paths of a class whose split ranks share their first 8 bytes"
        if drawn:
            frac = manifest.split_fractions
            expected = idx._drawn(np.arange(len(manifest.class_names)), frac.get("val", 0.0), frac.get("test", 0.0))
            if not np.array_equal(expected, idx.split):
                return "splits that are not the drawn ones"
        elif any(SPLIT_ALIASES.get(s.path.split("/", 1)[0].lower()) != s.split for s in samples):
            return "splits that are not their folders'"
        return idx

    # -- lookups -------------------------------------------------------------
    def path(self, row: int) -> str:
        p = int(self.pid[row])
        return self.blob[self.offsets[p]:self.offsets[p + 1]].decode()

    def bounds(self, label: int) -> tuple[int, int]:
        if self._starts is None:
            self._starts = np.searchsorted(self.label, np.arange(len(self.meta["classes"]) + 1)).tolist()
        return self._starts[label], self._starts[label + 1]

    def find(self, label: int, rel: str, rank: int | None = None) -> int:
        """The row of ``rel`` (a file of class ``label``, whose :func:`rank64` is ``rank`` where known), or -1."""
        lo, hi = self.bounds(label)
        r = np.uint64(rank64(self.meta["seed"], rel) if rank is None else rank)
        i = lo + int(np.searchsorted(self.rank[lo:hi], r))
        return i if i < hi and self.rank[i] == r and self.path(i) == rel else -1

    def _ties(self) -> bool:
        same = (self.label[1:] == self.label[:-1]) & (self.rank[1:] == self.rank[:-1])
        return bool(same.any())

    def _drawn(self, labels: np.ndarray, val: float, test: float) -> np.ndarray:
        """The drawn split codes of the rows of ``labels`` (the whole array where every class is given)."""
        out = self.split.copy()
        for c in labels:
            lo, hi = self.bounds(int(c))
            n_test, n_val = class_counts(hi - lo, val, test)
            pos = np.arange(hi - lo)
            out[lo:hi] = np.where(pos < n_test, 2, np.where(pos < n_test + n_val, 1, 0))
        return out

    # -- files ---------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        meta = np.frombuffer(json.dumps(self.meta).encode(), np.uint8)
        skips = np.frombuffer("\0".join(sorted(self.skips)).encode(), np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=meta, label=self.label, rank=self.rank, split=self.split, sha=self.sha, pid=self.pid,
                     offsets=self.offsets, blob=np.frombuffer(self.blob, np.uint8), skips=skips)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScanIndex | None":
        try:
            with np.load(path) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("version") != VERSION:
                    return None
                skips = z["skips"].tobytes().decode()
                return cls(meta=meta, label=z["label"], rank=z["rank"], split=z["split"], sha=z["sha"], pid=z["pid"],
                           offsets=z["offsets"], blob=z["blob"].tobytes(), skips=set(skips.split("\0")) - {""})
        except (OSError, ValueError, KeyError, EOFError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("scan index %s ignored (%s): this scan lists every file and writes it again", path, exc)
            return None


def write_index(manifest: Manifest, manifest_path: str | os.PathLike) -> str | None:
    """After a full scan saved ``manifest``: write its index where its scan is watched (``manifest.scan``
    names a watcher), else remove a stale one. Returns why a re-scan will not be incremental, or None."""
    path = index_path_for(manifest_path)
    idx = ScanIndex.build(manifest) if manifest.scan.get("watch") else "no watcher"
    if isinstance(idx, str):
        path.unlink(missing_ok=True)
        return idx
    idx.save(path)
    return None


class Fallback(Exception):
    """Why this re-scan lists everything (the full scan)."""


def rescan(manifest_path: str | os.PathLike, journal: Any, record: dict, workers: int = 4,
           progress: Progress | None = None, stats: dict[str, Any] | None = None) -> dict:
    """Bring the manifest at ``manifest_path`` up to date from the changes ``journal`` (a
    :class:`tasks.data.watcher.Journal` of the data folder) recorded since its last scan; ``record`` is the
    scan record this scan would write (its settings). Returns the scan's summary; raises :class:`Fallback`
    with the reason when only a full scan can tell."""
    t0 = time.perf_counter()
    ipath = index_path_for(manifest_path)
    idx = ScanIndex.load(ipath)
    if idx is None:
        raise Fallback("no scan index")
    state = manifest_state(manifest_path)
    if state is None or state != idx.meta["state"]:
        raise Fallback("the manifest changed since its index was written")
    old = idx.meta["scan"]
    if {k: v for k, v in old.items() if k not in ("watch", "offset")} != \
            {k: v for k, v in record.items() if k not in ("watch", "offset")}:
        raise Fallback("the scan's settings changed")
    if old.get("watch") != journal.id or os.path.realpath(idx.meta["root"]) != journal.root:
        raise Fallback("the data folder's watcher was restarted since the last scan")
    upto = journal.sync()
    changed = journal.changes((old["watch"], old["offset"]), upto)
    if changed is None:
        raise Fallback("the watcher lost track of changes (its queue overflowed) since the last scan")
    t_sync = time.perf_counter()
    token = {**record, "watch": journal.id, "offset": upto}
    read = 0
    if changed:
        idx, read = _apply(idx, changed, token, manifest_path, workers, progress, stats)
    if stats is not None:
        stats.update(files=len(idx.label), reused=len(idx.label) - read, read=read, sniffed=0,
                     cache="journal", changed_paths=len(changed), incremental=True)
        stats.setdefault("seconds", {}).update(sync=round(t_sync - t0, 4), total=round(time.perf_counter() - t0, 4))
    return {"manifest": str(manifest_path), "images": len(idx.label), "classes": idx.meta["classes"],
            "layout": idx.meta["layout"], "skipped": len(idx.skips), "media": idx.meta["media"],
            "state": idx.meta["state"], "files_read": read, "files_reused": len(idx.label) - read,
            "incremental": True}


def _apply(idx: ScanIndex, changed: set[str], token: dict, manifest_path, workers: int,
           progress: Progress | None, stats: dict | None) -> tuple[ScanIndex, int]:
    """Apply ``changed`` (absolute paths) to the manifest, the index and the stat cache; returns the new index
    and how many files were read."""
    started = time.time_ns()
    t0 = time.perf_counter()
    meta = idx.meta
    root = meta["root"].rstrip(os.sep) + os.sep
    split_folders = meta["layout"] == "split-folders"
    depth = 2 if split_folders else 1
    label_of = {c: i for i, c in enumerate(meta["classes"])}
    cand: dict[str, tuple[int, str | None, Any]] = {}  # rel -> (label, given split, stat key before reading)
    gone: dict[str, int] = {}  # rel -> label: files or folders that are no longer there
    relist: dict[str, int] = {}  # folders to list again (they appeared, or their class folder changed)
    for p in changed:
        if not p.startswith(root):
            if p.rstrip(os.sep) == root.rstrip(os.sep):
                continue  # the data folder's own attributes
            raise Fallback(f"a change outside the data folder ({p})")
        rel = p[len(root):]
        parts = rel.split("/")
        if any(_is_hidden(x) for x in parts):
            continue
        if len(parts) <= depth - 1 or (split_folders and parts[0].lower() not in SPLIT_ALIASES):
            raise Fallback(f"a change at the top of the data folder ({rel})")
        label = label_of.get(parts[depth - 1])
        if label is None:
            raise Fallback(f"a folder that is not one of the classes changed ({rel})")
        split = SPLIT_ALIASES[parts[0].lower()] if split_folders else None
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if len(parts) == depth:
                raise Fallback(f"class folder {rel} was removed") from None
            gone[rel] = label
            continue
        if statmod.S_ISLNK(st.st_mode):
            raise Fallback(f"a symbolic link appeared ({rel})")
        if statmod.S_ISDIR(st.st_mode):
            relist[rel] = label
        else:
            cand[rel] = (label, split, statcache.stat_key(st))
    drop: set[int] = set()
    unskip: set[str] = set()
    folders: dict[int, set[str]] = {}  # per class, the folders whose known contents are to be looked at again
    for rel, label in gone.items():
        row = idx.find(label, rel)
        if row >= 0:
            drop.add(row)
        else:  # a skipped file, or a folder
            folders.setdefault(label, set()).add(rel)
            if rel in idx.skips:
                unskip.add(rel)
    for rel, label in relist.items():
        folders.setdefault(label, set()).add(rel)
    below = _below(idx, folders)
    skips_below = _below_paths(idx.skips, {rel for dirs in folders.values() for rel in dirs})
    for rel, label in gone.items():
        drop.update(below.get(rel, ()))
        unskip.update(skips_below.get(rel, ()))
    for rel, label in relist.items():  # a folder that appeared, or came back: reconcile it with the index
        loops: list[str] = []
        listed = {os.path.join(d, n)[len(root):]: key for d, n, key in _walk(root + rel, loops)}
        if loops:
            raise Fallback(f"a symbolic link loop under {rel}")
        known = set()
        for row in below.get(rel, ()):
            path = idx.path(row)
            known.add(path)
            if path not in listed:
                drop.add(row)
        for path in listed.keys() - known:
            cand.setdefault(path, (label, SPLIT_ALIASES[path.split("/", 1)[0].lower()] if split_folders else None,
                                   listed[path]))
        unskip.update(k for k in skips_below.get(rel, ()) if k not in listed)
    t_read = time.perf_counter()
    rels = list(cand)  # read as a scan reads files (sniffing those without an image extension), in threads
    verdicts = dict(zip(rels, _judge([(*os.path.split(root + rel), cand[rel][2]) for rel in rels], workers, progress)))
    t_index = time.perf_counter()
    media = meta["media"]
    sets: dict[str, list] = {}
    skips: dict[str, str] = {}
    new_rows: list[tuple[int, int, int, str, str]] = []  # label, rank, sha64, rel, split or ""
    changed_sha: dict[int, int] = {}
    for rel, verdict in verdicts.items():
        label, given, _ = cand[rel]
        rank = rank64(meta["seed"], rel)
        row = idx.find(label, rel, rank)
        if rel in idx.skips:
            unskip.add(rel)
        if isinstance(verdict, Exception):
            skips[rel] = _unused_reason(root + rel, verdict)
            if row >= 0:
                drop.add(row)
            continue
        if (kind_from_extension(rel) or content_kind(root + rel)) != media:
            raise Fallback(f"{rel} is not {'a sound recording' if media == 'audio' else 'an image'}, as the rest are")
        if row >= 0:
            changed_sha[row] = int(verdict[:16], 16)
            sets[rel] = [rel, verdict, label, SPLIT_NAMES[int(idx.split[row])]]
        else:
            new_rows.append((label, rank, int(verdict[:16], 16), rel, given or ""))
            sets[rel] = [rel, verdict, label, given]
    unskip -= set(skips)
    drop_paths = [idx.path(r) for r in sorted(drop)]
    # the new arrays: kept rows (with changed contents), then the new rows, sorted again
    keep = np.ones(len(idx.label), bool)
    keep[list(drop)] = False
    sha = idx.sha.copy()
    for row, h in changed_sha.items():
        sha[row] = h
    new_sha = np.array([h for _, _, h, _, _ in new_rows] + list(changed_sha.values()), np.uint64)
    if len(new_sha):
        leaving = np.sort(idx.sha[sorted(drop | set(changed_sha))])  # what dropped or changed files held
        known = np.sort(idx.sha)  # (sorting 8-byte keys costs milliseconds; a set of them would cost 100 times more)
        at = np.searchsorted(known, new_sha)
        hit = known[np.minimum(at, len(known) - 1)] == new_sha
        still = hit & (np.searchsorted(leaving, new_sha, "right") - np.searchsorted(leaving, new_sha, "left")
                       < np.searchsorted(known, new_sha, "right") - at)
        if len(np.unique(new_sha)) < len(new_sha) or still.any():
            raise Fallback("a new or changed file is identical to another file (copies must share a split)")
    base = len(idx.offsets) - 1
    enc = [rel.encode() for _, _, _, rel, _ in new_rows]
    offsets = np.concatenate([idx.offsets, idx.offsets[-1] + np.cumsum([len(e) for e in enc], dtype=np.int64)])
    label = np.concatenate([idx.label[keep], np.array([r[0] for r in new_rows], np.int32)])
    rank = np.concatenate([idx.rank[keep], np.array([r[1] for r in new_rows], np.uint64)])
    split = np.concatenate([idx.split[keep], np.array([SPLIT_CODES.get(r[4], NEW) for r in new_rows], np.uint8)])
    pid = np.concatenate([idx.pid[keep], np.arange(base, base + len(new_rows), dtype=np.int64)])
    sha = np.concatenate([sha[keep], np.array([r[2] for r in new_rows], np.uint64)])
    order = np.lexsort((rank, label))
    new = ScanIndex(meta=dict(meta), label=label[order], rank=rank[order], split=split[order], sha=sha[order],
                    pid=pid[order], offsets=offsets, blob=idx.blob + b"".join(enc),
                    skips=(idx.skips - unskip) | set(skips))
    if new._ties():
        raise Fallback("two paths of a class whose split ranks share their first 8 bytes")
    touched = np.unique(np.concatenate([idx.label[~keep], np.array([r[0] for r in new_rows], np.int32)]))
    for c in touched:
        lo, hi = new.bounds(int(c))
        if lo == hi:
            raise Fallback(f"class {meta['classes'][int(c)]} has no image left")
    moves = []
    if not split_folders:
        drawn = new._drawn(touched, meta["fractions"].get("val", 0.0), meta["fractions"].get("test", 0.0))
        for row in np.flatnonzero(drawn != new.split):
            path = new.path(int(row))
            if path in sets:
                sets[path][3] = SPLIT_NAMES[int(drawn[row])]
            else:
                moves.append([path, SPLIT_NAMES[int(drawn[row])]])
        new.split = drawn
    delta = {"set": list(sets.values()), "move": moves, "drop": drop_paths, "skip": sorted(skips.items()),
             "unskip": sorted(unskip), "scan": token}
    t_write = time.perf_counter()
    new.meta["state"] = Manifest.append_delta(manifest_path, meta["state"], delta)
    new.meta["scan"] = token
    new.save(index_path_for(manifest_path))
    _record(manifest_path, root, {rel: (cand[rel][2], v) for rel, v in verdicts.items()}, started)
    if stats is not None:
        stats.setdefault("seconds", {}).update(
            changed_paths=round(t_read - t0, 4), read=round(t_index - t_read, 4), index=round(t_write - t_index, 4),
            write=round(time.perf_counter() - t_write, 4))
    return new, len(verdicts)


def _ancestors(path: str):
    parts = path.split("/")
    for k in range(1, len(parts)):
        yield "/".join(parts[:k])


def _below(idx: ScanIndex, folders: dict[int, set[str]]) -> dict[str, list[int]]:
    """The rows under each folder of ``folders`` (per class): one pass over each class's paths."""
    out: dict[str, list[int]] = {}
    for label, dirs in folders.items():
        lo, hi = idx.bounds(label)
        for row in range(lo, hi):
            for a in _ancestors(idx.path(row)):
                if a in dirs:
                    out.setdefault(a, []).append(row)
    return out


def _below_paths(paths, dirs: set[str]) -> dict[str, list[str]]:
    """The paths of ``paths`` under each folder of ``dirs`` (skip entries of folders end with ``/``)."""
    out: dict[str, list[str]] = {}
    if dirs:
        for p in paths:
            for a in _ancestors(p.rstrip("/")):
                if a in dirs:
                    out.setdefault(a, []).append(p)
    return out


def _record(manifest_path, root: str, read: dict[str, tuple[Any, Any]], started: int) -> None:
    """Add the records of the files read (``rel -> (stat key taken before reading, verdict)``) to the stat
    cache, but for those that may still be changing (:func:`tasks.data.statcache.is_racy`)."""
    folders: dict[str, tuple[list, list, list]] = {}
    for rel, (key, verdict) in read.items():
        text = statcache.verdict_text(verdict)
        d, _, name = (root + rel).rpartition("/")
        if text is None or isinstance(key, OSError) or statcache.is_racy(key, started):
            continue
        names, keys, texts = folders.setdefault(d, ([], [], []))
        names.append(name)
        keys.append(key)
        texts.append(text)
    try:
        statcache.append(statcache.cache_path_for(manifest_path), [(d, *v) for d, v in folders.items()])
    except OSError as exc:
        log.warning("could not add to the stat cache beside %s (%s): a full scan will read those files again",
                    manifest_path, exc)


def scan_record(val_fraction: float, test_fraction: float, seed: int, pinned: bool, group_by: str | None) -> dict:
    """What a scan's result depends on besides the files: a re-scan may build on the last one only when
    these are equal."""
    return {"version": VERSION, "seed": seed, "val": float(val_fraction), "test": float(test_fraction),
            "group_by": group_by, "pinned": bool(pinned), "media": statcache.media_rules()}


def find_journal(data: str | os.PathLike) -> Any:
    """The journal of the watcher that watches the folder ``data``, or None (none runs, not a folder, not
    Linux)."""
    if not os.path.isdir(data):
        return None
    try:
        from .watcher import Journal

        return Journal.find(data)
    except (OSError, ImportError, ValueError) as exc:
        log.info("no watcher journal for %s (%s): the scan lists every file", data, exc)
        return None


def scan_to_manifest(data: str | os.PathLike, manifest_path: str | os.PathLike, val_fraction: float,
                     test_fraction: float, seed: int, *, pinned: dict[str, str] | None = None, rehash: bool = False,
                     group_by: str | None = None, workers: int = 4, progress: Progress | None = None,
                     stats: dict[str, Any] | None = None, watch: bool = True) -> dict:
    """Scan ``data`` into the manifest at ``manifest_path``, as the flows' ``scan-dataset`` task does, and
    return a summary (images, classes, layout, skipped, media, state, files_read, files_reused,
    incremental, and the manifest's fingerprint where a full scan computed it). Where a watcher runs for
    ``data`` (and ``watch``), a re-scan touches only what changed (see the module's docstring); otherwise,
    or when that cannot be followed, it is :func:`tasks.data.datasets.scan_dataset` with the stat cache
    beside the manifest, and the manifest is written whole."""
    check_split_params(val_fraction, test_fraction)
    # Two scans into one manifest (a scheduled run and a manual one) take turns: each builds on the last one's
    # manifest, index and cache, so neither may write while the other reads.
    with FileLock(str(manifest_path) + ".lock"):
        return _scan_locked(data, manifest_path, val_fraction, test_fraction, seed, pinned, rehash, group_by, workers,
                            progress, stats, watch)


def _scan_locked(data, manifest_path, val_fraction, test_fraction, seed, pinned, rehash, group_by, workers, progress,
                 stats, watch) -> dict:
    from .datasets import cache_path_for, scan_dataset

    record = scan_record(val_fraction, test_fraction, seed, bool(pinned), group_by)
    journal = find_journal(data) if watch else None
    upto = None
    if journal is not None:
        from .watcher import WatchLost

        try:
            if not rehash:
                return rescan(manifest_path, journal, record, workers, progress, stats)
            log.info("--rehash: listing and reading every file of %s", data)
        except Fallback as why:
            log.info("listing every file of %s: %s", data, why)
        except WatchLost as exc:
            log.warning("the watcher of %s did not answer (%s): listing every file", data, exc)
            journal = None
        try:
            upto = journal.sync() if journal is not None else None
        except WatchLost:
            journal = None
    manifest = scan_dataset(data, val_fraction, test_fraction, seed, workers=workers, progress=progress,
                            pinned=pinned, cache=cache_path_for(manifest_path), rehash=rehash, stats=stats,
                            group_by=group_by)
    manifest.scan = {**record, "watch": journal.id, "offset": upto} if journal is not None else record
    fingerprint = manifest.fingerprint()
    manifest.save(manifest_path, fingerprint)
    why = write_index(manifest, manifest_path)
    if journal is not None and why:
        log.info("the next scan of %s will list every file again: %s", data, why)
    if stats is not None:
        stats["incremental"] = False
    return {"manifest": str(manifest_path), "images": len(manifest.samples), "classes": manifest.class_names,
            "layout": manifest.layout, "skipped": len(manifest.skipped), "media": manifest.media,
            "state": manifest.state, "fingerprint": fingerprint, "files_read": (stats or {}).get("read"),
            "files_reused": (stats or {}).get("reused"), "incremental": False}
