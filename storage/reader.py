"""Reading feature stores: :class:`FeatureStore` reads one store file, safely while an extraction
writes it (the file layout and the SWMR protocol are described in :mod:`storage.format`).

:class:`StoreReader` is what every reader offers (:class:`~storage.sharded.ShardedStore` too);
:func:`storage.open_store` returns the right one for a path. This module imports neither
TensorFlow nor Prefect.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .errors import StoreDamagedError, StoreError
from .format import (INDEX_FORMAT, ROW_DATASETS, STORE_FORMAT, decode, decode_attrs, decode_paths, group_fingerprint,
                     group_name, layer_names, open_file, read_rows, run_state)

Splits = str | Sequence[str] | None
Classes = str | int | Sequence[str | int] | None


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

    @classmethod
    def concat(cls, parts: Sequence["Codes"]) -> "Codes":
        """The rows of ``parts`` (of the same group) one after the other."""
        first = parts[0]
        return cls(features=np.concatenate([p.features for p in parts]),
                   labels=np.concatenate([p.labels for p in parts]),
                   paths=np.concatenate([p.paths for p in parts]),
                   splits=np.concatenate([p.splits for p in parts]),
                   sha256=np.concatenate([p.sha256 for p in parts]),
                   class_names=first.class_names, layer=first.layer, pooling=first.pooling)


def _read_selected(ds: h5py.Dataset, n: int, sel: np.ndarray) -> np.ndarray:
    """Rows ``sel`` (a boolean mask over the first ``n``): one direct read when most rows are wanted,
    contiguous runs otherwise."""
    if sel.all() or sel.mean() > 0.5:
        out = np.empty((n, *ds.shape[1:]), ds.dtype)
        if n:
            try:
                ds.read_direct(out, np.s_[0:n])
            except (OSError, RuntimeError):  # a chunk failed its checksum: read again, or name the rows
                out = read_rows(ds, 0, n)
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
            out[pos:pos + len(part)] = read_rows(ds, int(part[0]), int(part[-1]) + 1)
            pos += len(part)
    return out


@contextmanager
def damage_named(path: Path) -> Iterator[None]:
    """HDF5's errors inside a read (a damaged object header, chunk index...) as a StoreDamagedError naming
    the file; StoreErrors (which already name group, dataset and rows) pass through."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise StoreDamagedError(f"cannot read feature store {path}: {type(exc).__name__}: {exc}. The file is "
                                f"damaged: `cnncodes store verify {path}` says where; `cnncodes store repair "
                                f"{path}` drops damaged rows, or re-create the store with `cnncodes extract`.",
                                path=str(path)) from exc


def _wanted(split: Splits) -> list[str] | None:
    return None if split is None else ([split] if isinstance(split, str) else list(split))


class StoreReader(ABC):
    """Read access to a feature store, of one file or sharded; see :class:`FeatureStore`."""

    path: Path

    @property
    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """Root attributes (backbone, weights, class_names, ...) with ``updated`` and ``skipped``."""

    @property
    def class_names(self) -> list[str]:
        return list(self.provenance.get("class_names") or [])

    @abstractmethod
    def groups(self) -> list[dict[str, Any]]:
        """Every layer group with its committed row count and attributes."""

    @abstractmethod
    def read(self, layer: str, pooling: str | None = None, split: Splits = None, classes: Classes = None) -> Codes:
        """Committed rows of one group, optionally only some splits and/or classes (names or indices)."""

    @abstractmethod
    def read_features(self, layer: str, pooling: str | None = None, split: Splits = None,
                      classes: Classes = None) -> np.ndarray:
        """Only the committed feature rows (filtered like :meth:`read`)."""

    @abstractmethod
    def iter_chunks(self, layer: str, pooling: str | None = None, split: Splits = None,
                    rows: int = 8192) -> Iterator[Codes]:
        """Committed rows of one group, ``rows`` at a time (for stores larger than memory)."""

    @abstractmethod
    def lookup(self, layer: str, pooling: str | None, sha256: Sequence[str]) -> dict[str, np.ndarray]:
        """Codes of the images with these content hashes, where the group has them: ``{sha256: codes}``."""

    @abstractmethod
    def row_splits(self, layer: str, pooling: str | None = None) -> dict[str, str]:
        """The split of every committed row, by content hash (``{sha256: split}``), without features."""

    @abstractmethod
    def group_attrs(self, layer: str, pooling: str | None = None) -> dict[str, Any]:
        """One group's attributes with ``rows`` and ``manifest_fingerprint``."""

    def to_dataframe(self, layer: str, pooling: str | None = None, split: Splits = None, classes: Classes = None):
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


class FeatureStore(StoreReader):
    """Read access to one store file. Safe while an extraction is writing it.

    >>> store = FeatureStore("stores/flowers.h5")            # doctest: +SKIP
    >>> store.groups()                                        # doctest: +SKIP
    >>> codes = store.read("conv_pw_13_relu", "avg", split="train")  # doctest: +SKIP

    The index of a sharded store is refused: :func:`storage.open_store` opens either kind.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no feature store at {self.path}. Run `cnncodes extract` to create one.")
        with self._reading() as f:
            fmt = decode(f.attrs.get("format"))
        if fmt == INDEX_FORMAT:
            raise StoreError(f"{self.path} is the index of a sharded store; open it with "
                             "storage.open_store(path), which reads its shards as one store.")
        if fmt != STORE_FORMAT:
            raise StoreError(f"{self.path} is not a cnncodes feature store (format attribute is "
                             f"{fmt!r}, expected {STORE_FORMAT!r}).")

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    def open(self) -> h5py.File:
        """The HDF5 file, opened for reading alongside a writer (SWMR); close it (``with``) when done.
        For checks below this API (``storage.tools``); rows past ``committed`` are not to be trusted."""
        return open_file(self.path)

    @contextmanager
    def _reading(self) -> Iterator[h5py.File]:
        """:meth:`open` for this class's readers: damage inside the block is a StoreDamagedError."""
        with damage_named(self.path), open_file(self.path) as f:
            yield f

    @property
    def provenance(self) -> dict[str, Any]:
        with self._reading() as f:
            return {**decode_attrs(f), **run_state(f)}

    def groups(self) -> list[dict[str, Any]]:
        out = []
        with self._reading() as f:
            for layer in layer_names(f):
                for pooling in sorted(f[layer].keys()):
                    g = f[layer][pooling]
                    info = decode_attrs(g)
                    info["rows"] = int(read_rows(g["committed"], 0, 1)[0])
                    info["manifest_fingerprint"] = group_fingerprint(g)
                    info["group"] = group_name(layer, pooling)
                    out.append(info)
        return out

    def resolve_group(self, f: h5py.File, layer: str, pooling: str | None) -> h5py.Group:
        """The group of ``layer`` and ``pooling`` in the open file ``f`` (``pooling`` None: the layer's only
        one); StoreError naming what the store has otherwise."""
        if layer not in f or layer.startswith("_"):
            have = ", ".join(layer_names(f)) or "none"
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

    def read(self, layer: str, pooling: str | None = None, split: Splits = None, classes: Classes = None) -> Codes:
        """Committed rows of one group, optionally only some splits and/or classes (names or indices).

        Rows a writer has appended but not committed yet are never returned."""
        with self._reading() as f:
            g = self.resolve_group(f, layer, pooling)
            g["committed"].refresh()
            n = int(read_rows(g["committed"], 0, 1)[0])
            for name in ROW_DATASETS:
                g[name].refresh()
            names = list(decode(f.attrs.get("class_names")) or [])
            splits = read_rows(g["split"], 0, n).astype(str)
            labels = read_rows(g["label"], 0, n).astype(np.int64)
            sel = np.ones(n, bool)
            if split is not None:
                sel &= np.isin(splits, _wanted(split))
            if classes is not None:
                sel &= np.isin(labels, self.class_indices(classes, names))
            feats = _read_selected(g["features"], n, sel)
            return Codes(
                features=feats, labels=labels[sel],
                paths=decode_paths(read_rows(g["path"], 0, n)[sel]),
                splits=splits[sel], sha256=read_rows(g["sha256"], 0, n)[sel].astype(str), class_names=names,
                layer=str(decode(g.attrs["layer"])), pooling=str(decode(g.attrs["pooling"])),
            )

    def read_features(self, layer: str, pooling: str | None = None, split: Splits = None,
                      classes: Classes = None) -> np.ndarray:
        """Only the committed feature rows (filtered like :meth:`read`): the fastest way to an array."""
        with self._reading() as f:
            g = self.resolve_group(f, layer, pooling)
            g["committed"].refresh()
            n = int(read_rows(g["committed"], 0, 1)[0])
            g["features"].refresh()
            sel = np.ones(n, bool)
            if split is not None:
                g["split"].refresh()
                sel &= np.isin(read_rows(g["split"], 0, n).astype(str), _wanted(split))
            if classes is not None:
                g["label"].refresh()
                names = list(decode(f.attrs.get("class_names")) or [])
                sel &= np.isin(read_rows(g["label"], 0, n), self.class_indices(classes, names))
            return _read_selected(g["features"], n, sel)

    def class_indices(self, classes: Classes, names: list[str] | None = None) -> list[int]:
        """Label indices of ``classes`` (names of ``names``, default the store's, or indices)."""
        names = self.class_names if names is None else names
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

    def iter_chunks(self, layer: str, pooling: str | None = None, split: Splits = None,
                    rows: int = 8192) -> Iterator[Codes]:
        """Committed rows of one group, ``rows`` at a time (for stores larger than memory).
        The file is opened once per pass; each chunk is read and filtered on its own."""
        wanted = _wanted(split)
        with self._reading() as f:
            g = self.resolve_group(f, layer, pooling)
            n = int(read_rows(g["committed"], 0, 1)[0])
            names = list(decode(f.attrs.get("class_names")) or [])
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                splits = read_rows(g["split"], start, stop).astype(str)
                sel = np.ones(stop - start, bool) if wanted is None else np.isin(splits, wanted)
                if not sel.any():
                    continue
                block = read_rows(g["features"], start, stop)
                yield Codes(features=block if wanted is None else block[sel],
                            labels=read_rows(g["label"], start, stop)[sel].astype(np.int64),
                            paths=decode_paths(read_rows(g["path"], start, stop)[sel]),
                            splits=splits[sel], sha256=read_rows(g["sha256"], start, stop)[sel].astype(str),
                            class_names=names, layer=str(decode(g.attrs["layer"])),
                            pooling=str(decode(g.attrs["pooling"])))

    def row_splits(self, layer: str, pooling: str | None = None) -> dict[str, str]:
        with self._reading() as f:
            g = self.resolve_group(f, layer, pooling)
            n = int(read_rows(g["committed"], 0, 1)[0])
            return dict(zip(read_rows(g["sha256"], 0, n).astype(str).tolist(),
                            read_rows(g["split"], 0, n).astype(str).tolist()))

    def lookup(self, layer: str, pooling: str | None, sha256: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = set(sha256)
        with self._reading() as f:
            g = self.resolve_group(f, layer, pooling)
            n = int(read_rows(g["committed"], 0, 1)[0])
            hashes = read_rows(g["sha256"], 0, n).astype(str)
            rows = np.flatnonzero(np.isin(hashes, list(wanted)))
            if not len(rows):
                return {}
            feats = _read_rows(g["features"], np.sort(rows))
            return {hashes[r]: feats[i] for i, r in enumerate(np.sort(rows))}

    def group_attrs(self, layer: str, pooling: str | None = None) -> dict[str, Any]:
        with self._reading() as f:
            g = self.resolve_group(f, layer, pooling)
            out = decode_attrs(g)
            out["rows"] = int(read_rows(g["committed"], 0, 1)[0])
            out["manifest_fingerprint"] = group_fingerprint(g)
            return out
