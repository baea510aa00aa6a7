"""Writing feature stores: :class:`StoreWriter`, the single writer of a store for one extraction run.

It follows the SWMR protocol described in :mod:`storage.format`: everything is created first, then
rows are only appended, each batch flushed before ``committed`` vouches for it; ``<store>.lock``
(:class:`~storage.files.FileLock`) keeps writers to one at a time. This module imports neither
TensorFlow nor Prefect.
"""
from __future__ import annotations

import json
import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from .errors import StoreError, StoreFullError, StoreLockedError, StoreMismatchError
from .files import FileLock, FileLockBusy, atomic_path
from .format import (IDENTITY_KEYS, LABEL_DTYPE, LIBVER, PATH_DTYPE, ROW_DATASETS, SHA_DTYPE, SKIP_BYTES, SKIP_DTYPE,
                     SKIPPED, SPLIT_DTYPE, STORE_FORMAT, UPDATED, UPDATED_DTYPE, decode, decode_paths,
                     encode_paths, group_fingerprint, group_name, layer_names, normalise, now_iso, open_file,
                     open_swmr, read_rows, checked, damaged_rows, set_attrs, decode_attrs,
                     superblock, clear_open_flags, SWMR_WRITE_FLAG)
from .manifest import Manifest


CHECKED = {"fletcher32": True}  # the checksum filter on every dataset of a new store


def _chunk_rows(row_bytes: int) -> int:
    """Rows per chunk: about 1 MiB per chunk, between 1 and 1024 rows."""
    return int(max(1, min(1024, (1 << 20) // max(1, row_bytes))))


@dataclass(frozen=True)
class GroupSpec:
    """One layer group to write: what it holds and how it is stored."""

    layer: str
    pooling: str
    feature_shape: tuple[int, ...]
    dtype: str = "float32"
    compression: str | None = None

    @property
    def name(self) -> str:
        return group_name(self.layer, self.pooling)


def _create_group(f: h5py.File, spec: GroupSpec) -> h5py.Group:
    g = f.require_group(spec.name)
    row_bytes = int(np.prod(spec.feature_shape)) * np.dtype(spec.dtype).itemsize
    rows = _chunk_rows(row_bytes)
    comp = {"compression": spec.compression} if spec.compression else {}
    # Every dataset carries HDF5's Fletcher-32 checksum per chunk (CHECKED): a damaged chunk is an
    # error when read, never wrong values (its cost on throughput: benchmarks/store.py).
    g.create_dataset("features", shape=(0, *spec.feature_shape), maxshape=(None, *spec.feature_shape),
                     chunks=(rows, *spec.feature_shape), dtype=spec.dtype, **comp, **CHECKED)
    # Not compressed: inflating 512 bytes a row cost more than reading them (benchmarks/store.py).
    g.create_dataset("path", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=PATH_DTYPE, **CHECKED)
    g.create_dataset("sha256", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=SHA_DTYPE, **CHECKED)
    g.create_dataset("label", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=LABEL_DTYPE, **CHECKED)
    g.create_dataset("split", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=SPLIT_DTYPE, **CHECKED)
    _one_value(g, "committed", np.zeros(1, dtype="i8"))
    _one_value(g, "state", np.array([b""], dtype=SHA_DTYPE))
    set_attrs(g, {"layer": spec.layer, "pooling": spec.pooling, "feature_shape": list(spec.feature_shape),
                  "dtype": spec.dtype, "compression": spec.compression, "created": now_iso()})
    return g


def _one_value(parent: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """A one-row dataset, chunked so that it can carry a checksum like the rest."""
    return parent.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=data.shape,
                                 **CHECKED)


def _ensure_run_datasets(f: h5py.File, only: str | None = None) -> None:
    """Root datasets a run writes at its end (created before SWMR mode, like everything else)."""
    if UPDATED not in f and only in (None, UPDATED):
        _one_value(f, UPDATED, np.array([now_iso().encode()], dtype=UPDATED_DTYPE))
    if SKIPPED not in f and only in (None, SKIPPED):
        f.create_dataset(SKIPPED, shape=(0,), maxshape=(None,), chunks=(256,), dtype=SKIP_DTYPE,
                         compression="gzip", compression_opts=1, **CHECKED)


def _copy_store(src: h5py.File, dst: h5py.File, keep: dict[str, np.ndarray] | None = None,
                chunk: int = 4096, fresh: Sequence[str] = ()) -> None:
    """Copy attributes and the committed rows of every group (or the rows in ``keep[group]``); the root
    datasets named in ``fresh`` (damaged ones) are made anew instead of copied."""
    set_attrs(dst, decode_attrs(src))
    for name in (UPDATED, SKIPPED):
        if name in fresh:
            _ensure_run_datasets(dst, only=name)
        elif name in src:
            s = src[name]
            if name == UPDATED:
                _one_value(dst, name, s[:])
            else:
                dst.create_dataset(name, data=s[:], maxshape=s.maxshape, chunks=s.chunks or True,
                                   compression=s.compression, **CHECKED)
    for layer in layer_names(src):
        for pooling in src[layer]:
            g = src[layer][pooling]
            name = group_name(layer, pooling)
            if keep is not None and name in keep:
                rows = np.asarray(keep[name], dtype=np.int64)
            else:
                rows = np.arange(int(g["committed"][0]))
            d = dst.require_group(name)
            set_attrs(d, decode_attrs(g))
            for ds in ROW_DATASETS:
                s = g[ds]
                out = d.create_dataset(ds, shape=(len(rows), *s.shape[1:]), maxshape=(None, *s.shape[1:]),
                                       chunks=s.chunks, dtype=s.dtype, compression=s.compression, **CHECKED)
                for start in range(0, len(rows), chunk):
                    part = rows[start:start + chunk]
                    if len(part) and np.all(np.diff(part) == 1):
                        out[start:start + len(part)] = s[int(part[0]):int(part[-1]) + 1]
                    elif len(part):
                        out[start:start + len(part)] = s[np.sort(part)]
            _one_value(d, "committed", np.array([len(rows)], dtype="i8"))
            # rows were dropped or changed: the group no longer matches any manifest until a run completes it
            _one_value(d, "state", np.array([b""] if keep is not None and name in keep
                                            else [group_fingerprint(g).encode()], dtype=SHA_DTYPE))


def _rewrite(path: Path, keep: dict[str, np.ndarray] | None = None, fresh: Sequence[str] = ()) -> None:
    """Rewrite ``path`` through a temporary file renamed into place: a crash leaves the old file. Refused
    (StoreFullError, nothing changed) where the disk has no room for the copy."""
    need, free = path.stat().st_size + METADATA_ROOM, shutil.disk_usage(path.parent).free
    if free < need:
        raise _no_room(path, free, need, "rewriting the store (to drop rows of files that changed or left the "
                       "dataset) needs", "for the copy", "The store was not changed.")
    with atomic_path(path) as tmp:
        with open_swmr(path) as src, h5py.File(tmp, "w", libver=LIBVER) as dst:
            _copy_store(src, dst, keep, fresh=fresh)


# room kept free beyond a batch's chunks, for the file's own structures (B-trees, heaps, flushes)
METADATA_ROOM = 1 << 20


def _no_room(path: Path, free: int, need: int, what: str, detail: str, kept: str) -> StoreFullError:
    """The error of a disk without room for the next write of the store at ``path``: how much, and what to do."""
    return StoreFullError(f"the disk holding {path} has {free / 2**20:.1f} MiB free, and {what} about "
                          f"{need / 2**20:.1f} MiB{' ' + detail if detail else ''}: free space there, or write the "
                          f"store elsewhere (--store, or --out), and run the same command again. {kept}")


def _acquire(lock: FileLock, path: Path) -> None:
    """Take a store's writer lock, or StoreLockedError naming its holder. Tried for half a second: a
    reader checking whether a writer is there holds the lock shared for an instant."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            lock.acquire(blocking=False)
            return
        except PermissionError as exc:
            raise StoreError(f"cannot write feature store {path}: {exc.strerror} on {exc.filename}. Give the user "
                             f"running cnncodes write permission on the folder {path.parent}, or write the store "
                             "elsewhere (--store, or --out).") from exc
        except FileLockBusy as busy:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise StoreLockedError(
                f"feature store {path} is being written by {busy.holder}. "
                "Wait for that run to finish (readers are fine, writers are one at a time), "
                "or use another --store.") from None


def repair_store(path: str | os.PathLike) -> dict[str, Any]:
    """Drop the rows of a store whose chunks fail their checksum, keeping every other row.

    Under the store's writer lock, each row dataset of each group is read chunk by chunk; the rows of
    damaged chunks (of any of the group's datasets) are dropped by rewriting the file (the old one stays
    until the new one is renamed into place) and the group is marked incomplete, so the next
    ``cnncodes extract`` of the same data recomputes exactly those rows. A group whose row counter is
    damaged loses all its rows. A file whose structure is damaged (it cannot be opened, or a group cannot)
    cannot be repaired this way: StoreError saying so. Returns what was dropped per group."""
    path = Path(path)
    lock = FileLock(path.with_name(path.name + ".lock"))
    _acquire(lock, path)
    try:
        return _drop_damaged_rows(path)
    finally:
        lock.release()


def _drop_damaged_rows(path: Path) -> dict[str, Any]:
    """:func:`repair_store`'s work, for a caller that holds the writer lock."""
    try:
        f = open_file(path, wait=0)
    except StoreError as exc:
        raise StoreError(f"cannot repair {path}: {exc} Its structure is damaged, which dropping rows cannot "
                         "mend: delete it and run `cnncodes extract` again (or restore a good copy).") from None
    keep: dict[str, np.ndarray] = {}
    dropped: dict[str, list[list[int]]] = {}
    lost: dict[str, int] = {}
    unchecked: list[str] = []
    fresh = []
    try:
        with f:
            if decode(f.attrs.get("format")) != STORE_FORMAT:
                raise StoreError(f"cannot repair {path}: it is not a cnncodes feature store.")
            for name in (UPDATED, SKIPPED):
                if isinstance(f.get(name), h5py.Dataset) and damaged_rows(f[name]):
                    fresh.append(name)
            for layer in layer_names(f):
                for pooling in sorted(f[layer].keys()):
                    name = group_name(layer, pooling)
                    g = f[name]
                    if not all(checked(g[ds]) for ds in (*ROW_DATASETS, "committed")):
                        unchecked.append(name)
                    if damaged_rows(g["committed"]):
                        n = None
                    else:
                        n = int(g["committed"][0])
                    if n is None:
                        keep[name] = np.zeros(0, np.int64)
                        lost[name] = min(int(g[ds].shape[0]) for ds in ROW_DATASETS)
                        dropped[name] = [[0, lost[name]]]
                        continue
                    bad = np.zeros(n, bool)
                    for ds in ROW_DATASETS:
                        for a, b in damaged_rows(g[ds], 0, n):
                            bad[a:b] = True
                    if damaged_rows(g["state"]):
                        keep[name] = np.arange(n)
                    if bad.any():
                        keep[name] = np.flatnonzero(~bad)
                        edges = np.flatnonzero(np.diff(np.concatenate([[0], bad.astype(np.int8), [0]])))
                        dropped[name] = [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]
                        lost[name] = int(bad.sum())
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot repair {path}: reading it failed ({type(exc).__name__}: {exc}). Its "
                         "structure is damaged, which dropping rows cannot mend: delete it and run "
                         "`cnncodes extract` again (or restore a good copy).") from exc
    if keep or fresh:
        _rewrite(path, keep, fresh=fresh)
    return {"store": str(path), "repaired": bool(keep or fresh), "dropped": dropped, "rows_dropped": lost,
            "groups_marked_incomplete": sorted(keep), "records_rewritten": fresh, "unchecked": unchecked}


@dataclass
class Plan:
    """What an extraction still has to do for each group."""

    todo: dict[str, list[int]]        # group -> manifest sample indices missing from it
    removed: dict[str, int]           # group -> rows dropped (gone or changed images)
    relabelled: dict[str, int]        # group -> rows whose label or split changed

    def union(self) -> list[int]:
        return sorted(set().union(*self.todo.values())) if self.todo else []


class StoreWriter:
    """The single writer of a store for one extraction run.

    Use as a context manager::

        with StoreWriter(path, identity, specs, meta) as w:
            plan = w.plan(manifest)
            w.start_appending()
            w.append(group, samples, features)   # per batch
            w.finish(manifest)

    On entry it takes the lock, repairs a file left open by a killed writer,
    refuses a store of another backbone/weights/preprocessing, creates the
    missing groups and drops rows past ``committed``.
    """

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], specs: Sequence[GroupSpec],
                 meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.identity = normalise({k: identity.get(k) for k in IDENTITY_KEYS})
        self.specs = list(specs)
        self.meta = dict(meta or {})
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self.f: h5py.File | None = None
        self.recovered = False
        self._swmr = False

    # -- entering ----------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        _acquire(self._lock, self.path)
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            finally:
                self.f = None
        self._lock.release()

    def _open_rw(self) -> h5py.File:
        try:
            return h5py.File(self.path, "a", libver=LIBVER)
        except OSError as exc:
            if "already open for write" not in str(exc):
                advice = (" Give the user running cnncodes write permission on it (chmod u+w), or write the store "
                          "elsewhere (--store, or --out)." if exc.errno == errno.EACCES else "")
                raise StoreError(f"cannot open feature store {self.path} for writing: {exc}.{advice}") from exc
        # A writer was killed while it had the file open: the file is flagged as open. Killed in SWMR mode,
        # it is readable as it is; killed before (while preparing), only once the flags are cleared (what
        # `h5clear -s` does; we hold the writer lock, so no writer has it open). Either way its committed
        # rows are copied into a fresh file (the old one stays until the rename), every chunk's checksum
        # checked on the way.
        if not superblock(self.path)["flags"] & SWMR_WRITE_FLAG:
            clear_open_flags(self.path)
        try:
            _rewrite(self.path)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            # a chunk the writer was rewriting when it was killed fails its checksum: its rows are dropped
            # (recomputed by this run), every other row is kept
            try:
                dropped = _drop_damaged_rows(self.path)["repaired"]
            except StoreError:
                dropped = False
            if not dropped:
                raise StoreError(f"feature store {self.path} was left open by a writer that was killed, and it "
                                 f"cannot be recovered ({type(exc).__name__}: {exc}). Delete it and run "
                                 "`cnncodes extract` again.") from exc
        self.recovered = True
        return h5py.File(self.path, "a", libver=LIBVER)

    def _prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Build the skeleton under a temporary name so a crash never leaves a half-made store.
            with atomic_path(self.path) as tmp, h5py.File(tmp, "w", libver=LIBVER) as f:
                set_attrs(f, {"format": STORE_FORMAT, "created": now_iso()})
                set_attrs(f, self.identity)
                for spec in self.specs:
                    _create_group(f, spec)
                _ensure_run_datasets(f)
        self.f = self._open_rw()
        self._check_identity()
        _ensure_run_datasets(self.f)
        for spec in self.specs:
            if spec.name in self.f:
                self._check_group(spec)
            else:
                _create_group(self.f, spec)
        # Rows past `committed` belong to a batch that never finished: drop them.
        for spec in self.specs:
            g = self.f[spec.name]
            n = int(g["committed"][0])
            for ds in ROW_DATASETS:
                if g[ds].shape[0] != n:
                    g[ds].resize(n, axis=0)
        self.f.flush()

    def _check_identity(self) -> None:
        f = self.f
        if decode(f.attrs.get("format")) != STORE_FORMAT:
            raise StoreMismatchError(f"{self.path} exists but is not a cnncodes feature store. "
                                     "Choose another --store path.")
        diffs = []
        for k in IDENTITY_KEYS:
            have, want = decode(f.attrs.get(k)), self.identity.get(k)
            if have != want and not (have in ("", None) and want in ("", None)):
                diffs.append(f"{k}: store has {have!r}, this run has {want!r}")
        if diffs:
            raise StoreMismatchError(
                f"feature store {self.path} holds features of another extraction, and features are never "
                f"mixed ({'; '.join(diffs)}). Use another --store path for this configuration "
                "(one store per dataset, backbone and weights), or delete the store to rebuild it.")

    def _check_group(self, spec: GroupSpec) -> None:
        g = self.f[spec.name]
        shape = tuple(decode(g.attrs["feature_shape"]))
        dtype = str(decode(g.attrs["dtype"]))
        if shape != tuple(spec.feature_shape) or dtype != spec.dtype:
            raise StoreMismatchError(
                f"group {spec.name} of {self.path} stores features of shape {shape} as {dtype}, "
                f"this run produces {tuple(spec.feature_shape)} as {spec.dtype}. Use the same --dtype "
                "and input size, or another --store.")

    # -- planning ----------------------------------------------------------
    def existing(self, name: str) -> tuple[list[str], list[str]]:
        g = self.f[name]
        n = int(read_rows(g["committed"], 0, 1)[0])
        return list(decode_paths(read_rows(g["path"], 0, n))), read_rows(g["sha256"], 0, n).astype(str).tolist()

    def plan(self, manifest: Manifest) -> Plan:
        """Decide per group what to compute; drop rows of removed or changed images; refresh labels."""
        index = {s.path: i for i, s in enumerate(manifest.samples)}
        keep: dict[str, np.ndarray] = {}
        todo: dict[str, list[int]] = {}
        removed: dict[str, int] = {}
        relabelled: dict[str, int] = {}
        for spec in self.specs:
            paths, hashes = self.existing(spec.name)
            kept_rows, have = [], set()
            for row, (p, h) in enumerate(zip(paths, hashes)):
                i = index.get(p)
                if i is not None and manifest.samples[i].sha256 == h and p not in have:
                    kept_rows.append(row)
                    have.add(p)
            removed[spec.name] = len(paths) - len(kept_rows)
            keep[spec.name] = np.asarray(kept_rows, dtype=np.int64)
            todo[spec.name] = [i for i, s in enumerate(manifest.samples) if s.path not in have]
        set_attrs(self.f, {"class_names": list(manifest.class_names)})
        if any(removed.values()):
            self.f.close()
            self.f = None
            _rewrite(self.path, keep)
            self.f = self._open_rw()
        for spec in self.specs:
            relabelled[spec.name] = self._relabel(spec.name, manifest, index)
        self.f.flush()
        return Plan(todo=todo, removed=removed, relabelled=relabelled)

    def _relabel(self, name: str, manifest: Manifest, index: dict[str, int]) -> int:
        g = self.f[name]
        n = int(g["committed"][0])
        if n == 0:
            return 0
        paths = list(decode_paths(g["path"][:n]))
        labels = np.array([manifest.samples[index[p]].label for p in paths], dtype=LABEL_DTYPE)
        splits = np.array([manifest.samples[index[p]].split.encode() for p in paths], dtype=SPLIT_DTYPE)
        changed = int(np.sum((labels != g["label"][:n]) | (splits != g["split"][:n])))
        if changed:
            g["label"][:n] = labels
            g["split"][:n] = splits
        return changed

    # -- appending ---------------------------------------------------------
    def start_appending(self) -> None:
        """Switch to SWMR: from here on, readers see each committed batch while we write."""
        for k, v in self.meta.items():
            set_attrs(self.f, {k: v})
        set_attrs(self.f, {"updated": now_iso()})
        self.f.flush()
        self.f.swmr_mode = True
        self._swmr = True

    def append(self, name: str, paths: Sequence[str], sha256: Sequence[str], labels: Sequence[int],
               splits: Sequence[str], features: np.ndarray) -> int:
        """Append one batch to a group and commit it; returns the group's committed row count."""
        g = self.f[name]
        n = int(g["committed"][0])
        k = len(paths)
        if features.shape[0] != k:
            raise StoreError(f"internal: {k} rows but {features.shape[0]} feature vectors for {name}")
        values = {
            "features": np.asarray(features, dtype=g["features"].dtype),
            "path": encode_paths(paths),
            "sha256": np.asarray([h.encode() for h in sha256], dtype=SHA_DTYPE),
            "label": np.asarray(labels, dtype=LABEL_DTYPE),
            "split": np.asarray([s.encode() for s in splits], dtype=SPLIT_DTYPE),
        }
        self._check_room(g, name, n, k)
        for ds, v in values.items():
            g[ds].resize(n + k, axis=0)
            g[ds][n:n + k] = v
        self.f.flush()  # the rows reach the file before the counter says they exist
        g["committed"][0] = n + k
        self.f.flush()
        return n + k

    def _check_room(self, g: h5py.Group, name: str, n: int, k: int) -> None:
        """StoreFullError when the disk cannot take ``k`` more rows after ``n``. HDF5 cannot recover from a
        disk that fills mid-write (the process dies in the library), so room is checked first: every chunk
        the rows start (a chunk takes its whole size on disk when first written) and :data:`METADATA_ROOM`
        for the file's own structures."""
        need = METADATA_ROOM
        for ds in ROW_DATASETS:
            d = g[ds]
            per = d.chunks[0] if d.chunks else max(k, 1)
            row = d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64))
            chunks = (n + k - 1) // per - (n - 1) // per if n else (k - 1) // per + 1
            need += chunks * per * row
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise _no_room(self.path, free, need, f"the next {k} rows of {name} need", "",
                           f"The {n} rows already committed are kept and not computed again.")

    def finish(self, manifest: Manifest, complete: bool = True) -> None:
        """Record that each group matches ``manifest`` (when complete), the time and the skipped files.
        Written into datasets, so the file stays in SWMR mode and readers are never locked out."""
        f = self.f
        for spec in self.specs:
            f[spec.name]["state"][0] = manifest.fingerprint().encode() if complete else b""
        skipped = [json.dumps([s.path, s.reason]).encode("utf-8")[:SKIP_BYTES] for s in manifest.skipped]
        f[SKIPPED].resize(len(skipped), axis=0)
        if skipped:
            f[SKIPPED][:] = np.asarray(skipped, dtype=SKIP_DTYPE)
        f[UPDATED][0] = now_iso().encode()
        f.flush()


def store_is_current(path: str | os.PathLike, identity: dict[str, Any], layers: Iterable[tuple[str, str]],
                     manifest_fingerprint: str, dtype: str | None = None) -> bool:
    """True when every (layer, pooling) group of the store was completed for this exact manifest
    and configuration (``weights_digest`` is not compared: it needs the model built)."""
    path = Path(path)
    identity = normalise(identity)
    if not path.exists():
        return False
    try:
        with open_file(path) as f:
            for k in IDENTITY_KEYS:
                if k == "weights_digest":
                    continue
                if decode(f.attrs.get(k)) != identity.get(k):
                    return False
            for layer, pooling in layers:
                name = group_name(layer, pooling)
                if name not in f or group_fingerprint(f[name]) != manifest_fingerprint:
                    return False
                if dtype is not None and decode(f[name].attrs.get("dtype")) != dtype:
                    return False
    except (StoreError, OSError, KeyError):
        return False
    return True
