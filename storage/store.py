"""HDF5 feature stores: CNN codes with their provenance.

Layout of one store (one file per dataset, backbone and weights)::

    /                       attrs: format, backbone, backbone_args, weights, weights_digest,
                                   input_size, preprocessing, resize, precision, class_names,
                                   dataset, created, updated, versions, ...
    /<layer>/<pooling>/     one group per cut point and pooling; attrs: layer, pooling,
                            feature_shape, dtype, manifest_fingerprint, created, updated
        features  (N, *feature_shape)  float32 or float16, chunked by rows
        path      (N,)  S512     image path relative to the dataset root (UTF-8)
        sha256    (N,)  S64      sha256 of the image file's bytes
        label     (N,)  int32    index into the root's class_names
        split     (N,)  S8       train / val / test
        committed (1,)  int64    rows [0, committed) are complete; later rows are not to be trusted
        state     (1,)  S64      fingerprint of the manifest the group was completed for ("" while not)
    /_updated  (1,)  S32   time of the last finished run;  /_skipped (n,) S1024  files skipped, JSON [path, reason]

Writing follows the single-writer / multiple-reader (SWMR) protocol of HDF5:
every group and dataset a run needs is created first, then the file switches
to SWMR mode and rows are only appended; what a run records at its end goes
into datasets made for it (attributes cannot change in SWMR mode, and reopening
the file outside SWMR would need readers to let go of it). No variable-length
strings: HDF5's global heap is not safe for concurrent readers. After each batch the data is flushed
and *then* ``committed`` is advanced, so a reader, or a run resumed after a
SIGKILL, never trusts a half-written batch. A lock file enforces one writer.

This module imports neither TensorFlow nor Prefect.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from .errors import StoreError, StoreLockedError, StoreMismatchError
from .manifest import Manifest

STORE_FORMAT = "cnncodes-store/1"
LIBVER = ("v110", "latest")  # v110 is the oldest format with SWMR; readable by HDF5 >= 1.10
POOLINGS = ("avg", "max", "flatten", "none")
DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "gzip", "lzf")
ROW_DATASETS = ("features", "path", "sha256", "label", "split")
PATH_BYTES = 512
SKIP_BYTES = 1024

# Root attributes that identify what produced the features: a run whose values
# differ must not write into this store.
IDENTITY_KEYS = ("backbone", "backbone_args", "weights", "init_seed", "weights_digest", "input_size",
                 "preprocessing", "resize", "precision")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def group_name(layer: str, pooling: str) -> str:
    return f"{layer}/{pooling}"


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) or value is None:
        return json.dumps(value, sort_keys=True)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "[{n" and value not in ("",):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _normalise(d: dict[str, Any]) -> dict[str, Any]:
    """The form values take after a round trip through the file (tuples become lists, ...)."""
    return {k: _decode(_encode(v)) for k, v in d.items()}


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _decode(v) for k, v in obj.attrs.items()}


def _paths(raw: np.ndarray) -> np.ndarray:
    """Fixed-length UTF-8 bytes -> an object array of str (``tolist`` drops the padding in C)."""
    if raw.dtype.kind != "S":
        return np.asarray([p.decode("utf-8") if isinstance(p, bytes) else p for p in raw], dtype=object)
    return np.fromiter(map(bytes.decode, raw.tolist()), dtype=object, count=len(raw))


def _read_selected(ds: h5py.Dataset, n: int, sel: np.ndarray) -> np.ndarray:
    """Rows ``sel`` (a boolean mask over the first ``n``): one direct read when most rows are wanted,
    contiguous runs otherwise."""
    if sel.all() or sel.mean() > 0.5:
        out = np.empty((n, *ds.shape[1:]), ds.dtype)
        if n:
            ds.read_direct(out, np.s_[0:n])
        return out if sel.all() else out[sel]
    return _read_rows(ds, np.flatnonzero(sel))


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """Rows ``rows`` (sorted) of ``ds``, read as contiguous runs: far faster than point selection."""
    out = np.empty((len(rows), *ds.shape[1:]), ds.dtype)
    if not len(rows):
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    pos = 0
    for run in np.split(rows, breaks):
        for start in range(0, len(run), block):
            part = run[start:start + block]
            out[pos:pos + len(part)] = ds[int(part[0]):int(part[-1]) + 1]
            pos += len(part)
    return out


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


@dataclass
class Codes:
    """Rows read from one group of a store."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    sha256: np.ndarray
    class_names: list[str]
    layer: str
    pooling: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _open_read(path: Path) -> h5py.File:
    """Open for reading alongside a writer (SWMR), retrying while a writer prepares the file."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return h5py.File(path, "r", libver=LIBVER, swmr=True)
        except FileNotFoundError:
            raise StoreError(f"no feature store at {path}. Run `cnncodes extract` to create one.") from None
        except OSError as exc:
            # Only a lock held by a writer that is preparing the file is worth waiting for.
            busy = "lock" in str(exc).lower() or "already open" in str(exc).lower()
            if not busy or time.monotonic() > deadline:
                raise StoreError(f"cannot open feature store {path}: {exc}. Is it an HDF5 file written by "
                                 "cnncodes? `cnncodes extract` creates one.") from exc
            time.sleep(0.2)


class FeatureStore:
    """Read access to a feature store. Safe while an extraction is writing it.

    >>> store = FeatureStore("stores/flowers.h5")            # doctest: +SKIP
    >>> store.groups()                                        # doctest: +SKIP
    >>> codes = store.read("conv_pw_13_relu", "avg", split="train")  # doctest: +SKIP
    """

    def __new__(cls, path: str | os.PathLike):
        # An index of shards (written by a sharded extraction) opens as a ShardedStore.
        if cls is FeatureStore and Path(path).exists():
            from .sharded import ShardedStore, is_index

            if is_index(path):
                return super().__new__(ShardedStore)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no feature store at {self.path}. Run `cnncodes extract` to create one.")
        with _open_read(self.path) as f:
            if _decode(f.attrs.get("format")) != STORE_FORMAT:
                raise StoreError(f"{self.path} is not a cnncodes feature store (format attribute is "
                                 f"{_decode(f.attrs.get('format'))!r}, expected {STORE_FORMAT!r}).")

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    @property
    def provenance(self) -> dict[str, Any]:
        with _open_read(self.path) as f:
            return {**_attrs(f), **_run_state(f)}

    @property
    def class_names(self) -> list[str]:
        return list(self.provenance.get("class_names") or [])

    def groups(self) -> list[dict[str, Any]]:
        """Every layer group with its committed row count and attributes."""
        out = []
        with _open_read(self.path) as f:
            for layer in _layers(f):
                for pooling in sorted(f[layer].keys()):
                    g = f[layer][pooling]
                    info = _attrs(g)
                    info["rows"] = int(g["committed"][0])
                    info["manifest_fingerprint"] = _fingerprint_of(g)
                    info["group"] = group_name(layer, pooling)
                    out.append(info)
        return out

    def _resolve(self, f: h5py.File, layer: str, pooling: str | None) -> h5py.Group:
        if layer not in f or layer.startswith("_"):
            have = ", ".join(_layers(f)) or "none"
            raise StoreError(f"layer {layer!r} is not in store {self.path} (layers there: {have}). "
                             f"Extract it with `cnncodes extract ... --layer {layer}`.")
        poolings = sorted(f[layer].keys())
        if pooling is None:
            if len(poolings) != 1:
                raise StoreError(f"layer {layer!r} of {self.path} is stored with poolings {poolings}; name one.")
            pooling = poolings[0]
        if pooling not in f[layer]:
            raise StoreError(f"layer {layer!r} of {self.path} has no {pooling!r} pooling (it has {poolings}).")
        return f[layer][pooling]

    def read(self, layer: str, pooling: str | None = None, split: str | Sequence[str] | None = None,
             classes: str | int | Sequence[str | int] | None = None) -> Codes:
        """Committed rows of one group, optionally only some splits and/or classes (names or indices).

        Rows a writer has appended but not committed yet are never returned."""
        with _open_read(self.path) as f:
            g = self._resolve(f, layer, pooling)
            g["committed"].refresh()
            n = int(g["committed"][0])
            for name in ROW_DATASETS:
                g[name].refresh()
            names = list(_decode(f.attrs.get("class_names")) or [])
            splits = g["split"][:n].astype(str)
            labels = g["label"][:n].astype(np.int64)
            sel = np.ones(n, bool)
            if split is not None:
                sel &= np.isin(splits, [split] if isinstance(split, str) else list(split))
            if classes is not None:
                sel &= np.isin(labels, self._class_indices(classes, names))
            feats = _read_selected(g["features"], n, sel)
            return Codes(
                features=feats, labels=labels[sel],
                paths=_paths(g["path"][:n][sel]),
                splits=splits[sel], sha256=g["sha256"][:n][sel].astype(str), class_names=names,
                layer=str(_decode(g.attrs["layer"])), pooling=str(_decode(g.attrs["pooling"])),
            )

    def read_features(self, layer: str, pooling: str | None = None, split: str | Sequence[str] | None = None,
                      classes: str | int | Sequence[str | int] | None = None) -> np.ndarray:
        """Only the committed feature rows (filtered like :meth:`read`): the fastest way to an array."""
        with _open_read(self.path) as f:
            g = self._resolve(f, layer, pooling)
            g["committed"].refresh()
            n = int(g["committed"][0])
            g["features"].refresh()
            sel = np.ones(n, bool)
            if split is not None:
                g["split"].refresh()
                sel &= np.isin(g["split"][:n].astype(str), [split] if isinstance(split, str) else list(split))
            if classes is not None:
                g["label"].refresh()
                names = list(_decode(f.attrs.get("class_names")) or [])
                sel &= np.isin(g["label"][:n], self._class_indices(classes, names))
            return _read_selected(g["features"], n, sel)

    def _class_indices(self, classes, names: list[str]) -> list[int]:
        wanted = [classes] if isinstance(classes, (str, int)) else list(classes)
        out = []
        for c in wanted:
            if isinstance(c, str):
                if c not in names:
                    raise StoreError(f"class {c!r} is not in store {self.path} (classes: {', '.join(names)}).")
                out.append(names.index(c))
            else:
                out.append(int(c))
        return out

    def to_dataframe(self, layer: str, pooling: str | None = None, split: str | Sequence[str] | None = None,
                     classes: str | int | Sequence[str | int] | None = None):
        """A pandas DataFrame: ``path, label, class, split, sha256`` then one column per feature
        (``f0000``, ``f0001``, ...; spatial maps are flattened)."""
        import pandas as pd

        c = self.read(layer, pooling, split, classes)
        X = c.features.reshape(len(c), -1)
        width = max(4, len(str(max(X.shape[1] - 1, 0))))
        meta = pd.DataFrame({"path": c.paths, "label": c.labels,
                             "class": [c.class_names[i] if 0 <= i < len(c.class_names) else None for i in c.labels],
                             "split": c.splits, "sha256": c.sha256})
        feats = pd.DataFrame(X, columns=[f"f{i:0{width}d}" for i in range(X.shape[1])])
        return pd.concat([meta, feats], axis=1)

    def iter_chunks(self, layer: str, pooling: str | None = None, split: str | Sequence[str] | None = None,
                    rows: int = 8192) -> Iterator[Codes]:
        """Committed rows of one group, ``rows`` at a time (for stores larger than memory).
        The file is opened once per pass; each chunk is read and filtered on its own."""
        wanted = None if split is None else ([split] if isinstance(split, str) else list(split))
        with _open_read(self.path) as f:
            g = self._resolve(f, layer, pooling)
            n = int(g["committed"][0])
            names = list(_decode(f.attrs.get("class_names")) or [])
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                splits = g["split"][start:stop].astype(str)
                sel = np.ones(stop - start, bool) if wanted is None else np.isin(splits, wanted)
                if not sel.any():
                    continue
                block = g["features"][start:stop]
                yield Codes(features=block if wanted is None else block[sel],
                            labels=g["label"][start:stop][sel].astype(np.int64),
                            paths=_paths(g["path"][start:stop][sel]),
                            splits=splits[sel], sha256=g["sha256"][start:stop][sel].astype(str),
                            class_names=names, layer=str(_decode(g.attrs["layer"])),
                            pooling=str(_decode(g.attrs["pooling"])))

    def lookup(self, layer: str, pooling: str | None, sha256: Sequence[str]) -> dict[str, np.ndarray]:
        """Codes of the images with these content hashes, where the group has them: ``{sha256: codes}``."""
        wanted = set(sha256)
        with _open_read(self.path) as f:
            g = self._resolve(f, layer, pooling)
            n = int(g["committed"][0])
            hashes = g["sha256"][:n].astype(str)
            rows = np.flatnonzero(np.isin(hashes, list(wanted)))
            if not len(rows):
                return {}
            feats = g["features"][np.sort(rows)] if len(rows) else np.zeros((0,))
            return {hashes[r]: feats[i] for i, r in enumerate(np.sort(rows))}

    def group_attrs(self, layer: str, pooling: str | None = None) -> dict[str, Any]:
        with _open_read(self.path) as f:
            g = self._resolve(f, layer, pooling)
            out = _attrs(g)
            out["rows"] = int(g["committed"][0])
            out["manifest_fingerprint"] = _fingerprint_of(g)
            return out


# --------------------------------------------------------------------------- writing


class _Lock:
    """An exclusive, non-blocking lock on ``<store>.lock``; the kernel drops it if the process dies."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self.fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"feature store {self.path.with_suffix('')} is being written by {holder}. "
                    "Wait for that run to finish (readers are fine, writers are one at a time), "
                    "or use another --store.") from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename} since {now_iso()}")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def _encode_paths(paths: Sequence[str]) -> np.ndarray:
    raw = [p.encode("utf-8") for p in paths]
    long = [p for p in raw if len(p) > PATH_BYTES]
    if long:
        raise StoreError(f"image path {long[0].decode()!r} is {len(long[0])} bytes long; a store keeps paths of "
                         f"up to {PATH_BYTES} bytes (relative to the dataset root). Shorten the folder names.")
    return np.asarray(raw, dtype=f"S{PATH_BYTES}")


def _create_group(f: h5py.File, spec: GroupSpec) -> h5py.Group:
    g = f.require_group(spec.name)
    row_bytes = int(np.prod(spec.feature_shape)) * np.dtype(spec.dtype).itemsize
    rows = _chunk_rows(row_bytes)
    comp = {"compression": spec.compression} if spec.compression else {}
    g.create_dataset("features", shape=(0, *spec.feature_shape), maxshape=(None, *spec.feature_shape),
                     chunks=(rows, *spec.feature_shape), dtype=spec.dtype, **comp)
    # Not compressed: inflating 512 bytes a row cost more than reading them (benchmarks/store.py).
    g.create_dataset("path", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=f"S{PATH_BYTES}")
    g.create_dataset("sha256", shape=(0,), maxshape=(None,), chunks=(4096,), dtype="S64")
    g.create_dataset("label", shape=(0,), maxshape=(None,), chunks=(4096,), dtype="i4")
    g.create_dataset("split", shape=(0,), maxshape=(None,), chunks=(4096,), dtype="S8")
    g.create_dataset("committed", data=np.zeros(1, dtype="i8"))
    g.create_dataset("state", data=np.array([b""], dtype="S64"))
    g.attrs.update({"layer": spec.layer, "pooling": spec.pooling,
                    "feature_shape": _encode(list(spec.feature_shape)), "dtype": spec.dtype,
                    "compression": _encode(spec.compression), "created": now_iso()})
    return g


def _ensure_run_datasets(f: h5py.File) -> None:
    """Root datasets a run writes at its end (created before SWMR mode, like everything else)."""
    if "_updated" not in f:
        f.create_dataset("_updated", data=np.array([now_iso().encode()], dtype="S32"))
    if "_skipped" not in f:
        f.create_dataset("_skipped", shape=(0,), maxshape=(None,), chunks=(256,), dtype=f"S{SKIP_BYTES}",
                         compression="gzip", compression_opts=1)


def _layers(f: h5py.File) -> list[str]:
    return sorted(k for k in f.keys() if not k.startswith("_"))


def _run_state(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "_updated" in f:
        out["updated"] = f["_updated"][0].decode()
    if "_skipped" in f:
        out["skipped"] = [json.loads(x.decode("utf-8", "replace")) for x in f["_skipped"][:]]
    return out


def _fingerprint_of(g: h5py.Group) -> str:
    return g["state"][0].decode() if "state" in g else str(_decode(g.attrs.get("manifest_fingerprint")) or "")


def _copy_store(src: h5py.File, dst: h5py.File, keep: dict[str, np.ndarray] | None = None,
                chunk: int = 4096) -> None:
    """Copy attributes and the committed rows of every group (or the rows in ``keep[group]``)."""
    dst.attrs.update(dict(src.attrs))
    for name in ("_updated", "_skipped"):
        if name in src:
            s = src[name]
            dst.create_dataset(name, data=s[:], maxshape=s.maxshape, chunks=s.chunks, compression=s.compression)
    for layer in _layers(src):
        for pooling in src[layer]:
            g = src[layer][pooling]
            name = group_name(layer, pooling)
            n = int(g["committed"][0])
            rows = np.arange(n) if keep is None or name not in keep else np.asarray(keep[name], dtype=np.int64)
            d = dst.require_group(name)
            d.attrs.update(dict(g.attrs))
            for ds in ROW_DATASETS:
                s = g[ds]
                out = d.create_dataset(ds, shape=(len(rows), *s.shape[1:]), maxshape=(None, *s.shape[1:]),
                                       chunks=s.chunks, dtype=s.dtype, compression=s.compression)
                for start in range(0, len(rows), chunk):
                    part = rows[start:start + chunk]
                    if len(part) and np.all(np.diff(part) == 1):
                        out[start:start + len(part)] = s[int(part[0]):int(part[-1]) + 1]
                    elif len(part):
                        out[start:start + len(part)] = s[np.sort(part)]
            d.create_dataset("committed", data=np.array([len(rows)], dtype="i8"))
            # rows were dropped or changed: the group no longer matches any manifest until a run completes it
            d.create_dataset("state", data=np.array([b""] if keep is not None and name in keep
                                                     else [_fingerprint_of(g).encode()], dtype="S64"))


def _rewrite(path: Path, keep: dict[str, np.ndarray] | None = None) -> None:
    """Rewrite ``path`` through a temporary file renamed into place: a crash leaves the old file."""
    tmp = path.with_name(f".{path.name}.incomplete")
    with h5py.File(path, "r", libver=LIBVER, swmr=True) as src, h5py.File(tmp, "w", libver=LIBVER) as dst:
        _copy_store(src, dst, keep)
    os.replace(tmp, path)


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
        self.identity = _normalise({k: identity.get(k) for k in IDENTITY_KEYS})
        self.specs = list(specs)
        self.meta = dict(meta or {})
        self._lock = _Lock(self.path)
        self.f: h5py.File | None = None
        self.recovered = False
        self._swmr = False

    # -- entering ----------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        self._lock.acquire()
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
                raise StoreError(f"cannot open feature store {self.path} for writing: {exc}") from exc
        # A writer was killed while in SWMR mode: the file is readable but flagged as open.
        # Copy its committed rows into a fresh file (the old one stays until the rename).
        _rewrite(self.path)
        self.recovered = True
        return h5py.File(self.path, "a", libver=LIBVER)

    def _prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Build the skeleton under a temporary name so a crash never leaves a half-made store.
            tmp = self.path.with_name(f".{self.path.name}.incomplete")
            with h5py.File(tmp, "w", libver=LIBVER) as f:
                f.attrs.update({"format": STORE_FORMAT, "created": now_iso()})
                f.attrs.update({k: _encode(v) for k, v in self.identity.items()})
                for spec in self.specs:
                    _create_group(f, spec)
                _ensure_run_datasets(f)
            os.replace(tmp, self.path)
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
        if _decode(f.attrs.get("format")) != STORE_FORMAT:
            raise StoreMismatchError(f"{self.path} exists but is not a cnncodes feature store. "
                                     "Choose another --store path.")
        diffs = []
        for k in IDENTITY_KEYS:
            have, want = _decode(f.attrs.get(k)), self.identity.get(k)
            if have != want and not (have in ("", None) and want in ("", None)):
                diffs.append(f"{k}: store has {have!r}, this run has {want!r}")
        if diffs:
            raise StoreMismatchError(
                f"feature store {self.path} holds features of another extraction, and features are never "
                f"mixed ({'; '.join(diffs)}). Use another --store path for this configuration "
                "(one store per dataset, backbone and weights), or delete the store to rebuild it.")

    def _check_group(self, spec: GroupSpec) -> None:
        g = self.f[spec.name]
        shape = tuple(_decode(g.attrs["feature_shape"]))
        dtype = str(_decode(g.attrs["dtype"]))
        if shape != tuple(spec.feature_shape) or dtype != spec.dtype:
            raise StoreMismatchError(
                f"group {spec.name} of {self.path} stores features of shape {shape} as {dtype}, "
                f"this run produces {tuple(spec.feature_shape)} as {spec.dtype}. Use the same --dtype "
                "and input size, or another --store.")

    # -- planning ----------------------------------------------------------
    def existing(self, name: str) -> tuple[list[str], list[str]]:
        g = self.f[name]
        n = int(g["committed"][0])
        return list(_paths(g["path"][:n])), g["sha256"][:n].astype(str).tolist()

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
        self.f.attrs["class_names"] = _encode(list(manifest.class_names))
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
        paths = list(_paths(g["path"][:n]))
        labels = np.array([manifest.samples[index[p]].label for p in paths], dtype="i4")
        splits = np.array([manifest.samples[index[p]].split.encode() for p in paths], dtype="S8")
        changed = int(np.sum((labels != g["label"][:n]) | (splits != g["split"][:n])))
        if changed:
            g["label"][:n] = labels
            g["split"][:n] = splits
        return changed

    # -- appending ---------------------------------------------------------
    def start_appending(self) -> None:
        """Switch to SWMR: from here on, readers see each committed batch while we write."""
        for k, v in self.meta.items():
            self.f.attrs[k] = _encode(v)
        self.f.attrs["updated"] = now_iso()
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
            "path": _encode_paths(paths),
            "sha256": np.asarray([h.encode() for h in sha256], dtype="S64"),
            "label": np.asarray(labels, dtype="i4"),
            "split": np.asarray([s.encode() for s in splits], dtype="S8"),
        }
        for ds, v in values.items():
            g[ds].resize(n + k, axis=0)
            g[ds][n:n + k] = v
        self.f.flush()  # the rows reach the file before the counter says they exist
        g["committed"][0] = n + k
        self.f.flush()
        return n + k

    def finish(self, manifest: Manifest, complete: bool = True) -> None:
        """Record that each group matches ``manifest`` (when complete), the time and the skipped files.
        Written into datasets, so the file stays in SWMR mode and readers are never locked out."""
        f = self.f
        for spec in self.specs:
            f[spec.name]["state"][0] = manifest.fingerprint().encode() if complete else b""
        skipped = [json.dumps([s.path, s.reason]).encode("utf-8")[:SKIP_BYTES] for s in manifest.skipped]
        f["_skipped"].resize(len(skipped), axis=0)
        if skipped:
            f["_skipped"][:] = np.asarray(skipped, dtype=f"S{SKIP_BYTES}")
        f["_updated"][0] = now_iso().encode()
        f.flush()


def store_is_current(path: str | os.PathLike, identity: dict[str, Any], layers: Iterable[tuple[str, str]],
                     manifest_fingerprint: str, dtype: str | None = None) -> bool:
    """True when every (layer, pooling) group of the store was completed for this exact manifest
    and configuration (``weights_digest`` is not compared: it needs the model built)."""
    path = Path(path)
    identity = _normalise(identity)
    if not path.exists():
        return False
    try:
        with _open_read(path) as f:
            for k in IDENTITY_KEYS:
                if k == "weights_digest":
                    continue
                if _decode(f.attrs.get(k)) != identity.get(k):
                    return False
            for layer, pooling in layers:
                name = group_name(layer, pooling)
                if name not in f or _fingerprint_of(f[name]) != manifest_fingerprint:
                    return False
                if dtype is not None and _decode(f[name].attrs.get("dtype")) != dtype:
                    return False
    except (StoreError, OSError, KeyError):
        return False
    return True
