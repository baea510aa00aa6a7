"""The on-disk format of feature stores: layout, encoding, fingerprints and the shard index.

Every module that touches a store's bytes takes these names and helpers from here:
the reader (:mod:`storage.reader`), the writer (:mod:`storage.writer`), the sharded
reader (:mod:`storage.sharded`) and the tools (:mod:`storage.tools`).

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

Attributes hold str, int and float as they are; lists, dicts, tuples and None as JSON text
(:func:`encode` / :func:`decode`).

Writing follows the single-writer / multiple-reader (SWMR) protocol of HDF5:
every group and dataset a run needs is created first, then the file switches
to SWMR mode and rows are only appended; what a run records at its end goes
into datasets made for it (attributes cannot change in SWMR mode, and reopening
the file outside SWMR would need readers to let go of it). No variable-length
strings: HDF5's global heap is not safe for concurrent readers. After each batch the data is flushed
and *then* ``committed`` is advanced, so a reader, or a run resumed after a
SIGKILL, never trusts a half-written batch. A lock file (``<store>.lock``) enforces one writer.

A sharded store is a small HDF5 index file at the store's path (written by a sharded extraction)::

    /   attrs: format = "cnncodes-store-index/1", shards = JSON list of shard files relative
               to the index's folder, and the shards' provenance (backbone, weights, class_names, ...)

Each shard is an ordinary store with its own single writer. This module imports neither
TensorFlow nor Prefect.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .errors import StoreError
from .files import atomic_path, now_iso

STORE_FORMAT = "cnncodes-store/1"
INDEX_FORMAT = "cnncodes-store-index/1"
LIBVER = ("v110", "latest")  # v110 is the oldest format with SWMR; readable by HDF5 >= 1.10
POOLINGS = ("avg", "max", "flatten", "none")
DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "gzip", "lzf")
ROW_DATASETS = ("features", "path", "sha256", "label", "split")
PATH_BYTES = 512
SKIP_BYTES = 1024
PATH_DTYPE = f"S{PATH_BYTES}"
SHA_DTYPE = "S64"
LABEL_DTYPE = "i4"
SPLIT_DTYPE = "S8"
SKIP_DTYPE = f"S{SKIP_BYTES}"
UPDATED_DTYPE = "S32"
UPDATED, SKIPPED = "_updated", "_skipped"  # root datasets a run writes at its end

# Root attributes that identify what produced the features: a run whose values
# differ must not write into this store.
IDENTITY_KEYS = ("backbone", "backbone_args", "weights", "init_seed", "weights_digest", "input_size",
                 "preprocessing", "resize", "precision")

__all__ = [
    "COMPRESSIONS", "DTYPES", "IDENTITY_KEYS", "INDEX_FORMAT", "LIBVER", "POOLINGS", "ROW_DATASETS", "STORE_FORMAT",
    "decode", "decode_attrs", "decode_paths", "encode", "encode_paths", "group_fingerprint", "group_name",
    "is_index", "layer_names", "normalise", "now_iso", "open_file", "read_index", "run_state", "write_index",
]


# --------------------------------------------------------------------------- names and encoding


def group_name(layer: str, pooling: str) -> str:
    return f"{layer}/{pooling}"


def encode(value: Any) -> Any:
    """An attribute value as stored: lists, dicts, tuples and None as JSON text, the rest as is."""
    if isinstance(value, (dict, list, tuple)) or value is None:
        return json.dumps(value, sort_keys=True)
    return value


def decode(value: Any) -> Any:
    """An attribute value as read: bytes as text, NumPy scalars as Python ones, JSON text parsed."""
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


def normalise(d: dict[str, Any]) -> dict[str, Any]:
    """The form values take after a round trip through the file (tuples become lists, ...)."""
    return {k: decode(encode(v)) for k, v in d.items()}


def decode_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    """All attributes of a file, group or dataset, decoded."""
    return {k: decode(v) for k, v in obj.attrs.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def encode_paths(paths: Sequence[str]) -> np.ndarray:
    """Image paths as fixed-length UTF-8; StoreError naming the first one that does not fit."""
    raw = [p.encode("utf-8") for p in paths]
    long = [p for p in raw if len(p) > PATH_BYTES]
    if long:
        raise StoreError(f"image path {long[0].decode()!r} is {len(long[0])} bytes long; a store keeps paths of "
                         f"up to {PATH_BYTES} bytes (relative to the dataset root). Shorten the folder names.")
    return np.asarray(raw, dtype=PATH_DTYPE)


def decode_paths(raw: np.ndarray) -> np.ndarray:
    """Fixed-length UTF-8 bytes -> an object array of str (``tolist`` drops the padding in C)."""
    if raw.dtype.kind != "S":
        return np.asarray([p.decode("utf-8") if isinstance(p, bytes) else p for p in raw], dtype=object)
    return np.fromiter(map(bytes.decode, raw.tolist()), dtype=object, count=len(raw))


# --------------------------------------------------------------------------- reading the layout


def open_file(path: str | os.PathLike) -> h5py.File:
    """Open a store file for reading alongside a writer (SWMR), retrying while a writer prepares it."""
    path = Path(path)
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


def layer_names(f: h5py.File) -> list[str]:
    """The layers of a store: root names not starting with '_' (those are run records)."""
    return sorted(k for k in f.keys() if not k.startswith("_"))


def group_fingerprint(g: h5py.Group) -> str:
    """The manifest fingerprint a group was completed for ("" while not): the ``state`` dataset,
    or the ``manifest_fingerprint`` attribute of stores written before it existed."""
    st = g.get("state")
    if isinstance(st, h5py.Dataset) and st.shape and st.shape[0]:
        return _text(st[0])
    return str(decode(g.attrs.get("manifest_fingerprint")) or "")


def run_state(f: h5py.File) -> dict[str, Any]:
    """What the last finished run recorded: ``updated`` (time) and ``skipped`` ([path, reason] pairs),
    where the store has them."""
    out: dict[str, Any] = {}
    upd = f.get(UPDATED)
    if isinstance(upd, h5py.Dataset) and upd.shape and upd.shape[0]:
        out["updated"] = _text(upd[0])
    sk = f.get(SKIPPED)
    if isinstance(sk, h5py.Dataset):
        out["skipped"] = [_skip_entry(x) for x in sk[:]]
    return out


def _skip_entry(raw: Any) -> Any:
    text = _text(raw)
    try:
        return json.loads(text)
    except ValueError:  # cut at SKIP_BYTES: keep the text
        return text


# --------------------------------------------------------------------------- the shard index


def write_index(path: str | os.PathLike, shards: Sequence[str | os.PathLike], attrs: dict[str, Any]) -> Path:
    """Write the index at ``path`` (atomically) listing ``shards`` relative to it, with ``attrs``."""
    path = Path(path)
    rel = [os.path.relpath(Path(s).resolve(), path.resolve().parent) for s in shards]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = INDEX_FORMAT
            f.attrs["shards"] = json.dumps(rel)
            for k, v in attrs.items():
                f.attrs[k] = encode(v)
    return path


def is_index(path: str | os.PathLike) -> bool:
    """True when ``path`` is the index of a sharded store."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == INDEX_FORMAT
    except OSError:
        return False


def read_index(path: str | os.PathLike) -> list[Path]:
    """The shard files an index lists, resolved (OSError, KeyError or ValueError when unreadable)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        rel = json.loads(f.attrs["shards"])
    return [(path.parent / r).resolve() for r in rel]
