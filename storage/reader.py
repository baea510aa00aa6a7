"""Reading feature stores: :class:`FeatureStore` reads one store file, safely while an extraction
writes it (the file layout and the SWMR protocol are described in :mod:`storage.format`).

:class:`StoreReader` is what every reader offers (:class:`~storage.sharded.ShardedStore` too);
:func:`storage.open_store` returns the right one for a path. This module imports neither
TensorFlow nor Prefect.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .errors import ParameterError, StoreDamagedError, StoreError
from .format import (INDEX_FORMAT, ROW_DATASETS, STORE_FORMAT, decode, decode_attrs, decode_paths, group_fingerprint,
                     group_name, layer_names, open_file, read_rows, run_state)

Splits = str | Sequence[str] | None
Classes = str | int | Sequence[str | int] | None
Seed = int | Sequence[int] | None

# A shuffled chunk (iter_chunks with shuffle_seed) draws its rows from at least this many blocks.
MIX_BLOCKS = 8


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

    def take(self, index: np.ndarray | slice) -> "Codes":
        """The rows ``index`` (positions or a slice), in that order."""
        return Codes(features=self.features[index], labels=self.labels[index], paths=self.paths[index],
                     splits=self.splits[index], sha256=self.sha256[index], class_names=self.class_names,
                     layer=self.layer, pooling=self.pooling)


def _read_selected(ds: h5py.Dataset, n: int, sel: np.ndarray) -> np.ndarray:
    """Rows ``sel`` (a boolean mask over the first ``n``): one direct read when most rows are wanted
    (HDF5 checks each chunk's Fletcher-32), then the unwanted rows squeezed out in place; contiguous
    runs otherwise."""
    if sel.all() or sel.mean() > 0.5:
        out = np.empty((n, *ds.shape[1:]), ds.dtype)
        if n:
            try:
                ds.read_direct(out, np.s_[0:n])
            except (OSError, RuntimeError):  # a chunk failed its checksum: read again, or name the rows
                out = read_rows(ds, 0, n)
        return out if sel.all() else _squeeze(out, sel)
    return _read_rows(ds, np.flatnonzero(sel))


def _squeeze(out: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """``out[sel]`` computed in ``out``'s own memory (each run of wanted rows moved forward): no second
    array of nearly the same size to allocate and fault in. Returns a view of ``out``'s first rows."""
    idx = np.flatnonzero(sel)
    if not len(idx):
        return out[:0]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    pos = 0
    for a, b in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(idx)]]).tolist()):
        src, k = int(idx[a]), b - a
        if src != pos:
            out[pos:pos + k] = out[src:src + k]  # forward: numpy buffers an overlap
        pos += k
    return out[:pos]


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


def _uncached(g: h5py.Group, name: str) -> h5py.Dataset:
    """Dataset ``name`` of ``g`` opened without a chunk cache: a read then takes only the bytes of the rows
    it asks for (an uncompressed chunk is not loaded whole), which suits reads at random places."""
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(g.id, name.encode(), dapl=dapl))


class _Rows:
    """The datasets of one open group that chunked reads take rows from."""

    def __init__(self, f: h5py.File, g: h5py.Group, cache: bool = True):
        g["committed"].refresh()
        self.n = int(read_rows(g["committed"], 0, 1)[0])
        cols = {name: (g[name] if cache else _uncached(g, name)) for name in ROW_DATASETS}
        for ds in cols.values():
            ds.refresh()
        self.features, self.label, self.path = cols["features"], cols["label"], cols["path"]
        self.split, self.sha256 = cols["split"], cols["sha256"]
        self.storage_rows = int((self.features.chunks or (max(self.n, 1),))[0])
        self.names = list(decode(f.attrs.get("class_names")) or [])
        self.layer, self.pooling = str(decode(g.attrs["layer"])), str(decode(g.attrs["pooling"]))

    def read(self, start: int, stop: int, wanted: list[str] | None) -> Codes | None:
        """Rows ``start:stop`` of the splits ``wanted`` (None: all); None when none is wanted."""
        splits = read_rows(self.split, start, stop).astype(str)
        sel = np.ones(stop - start, bool) if wanted is None else np.isin(splits, wanted)
        if not sel.any():
            return None
        feats = read_rows(self.features, start, stop)
        return Codes(features=feats if sel.all() else feats[sel],
                     labels=read_rows(self.label, start, stop)[sel].astype(np.int64),
                     paths=decode_paths(read_rows(self.path, start, stop)[sel]), splits=splits[sel],
                     sha256=read_rows(self.sha256, start, stop)[sel].astype(str), class_names=self.names,
                     layer=self.layer, pooling=self.pooling)

    def cut(self, rows: int, block_rows: int | None) -> int:
        """Cut the group into blocks of contiguous rows, none across two storage chunks of the features:
        whole storage chunks, or ``block_rows`` (default ``rows // MIX_BLOCKS``) when smaller. Returns how
        many; :meth:`block` gives each (those past the last row are empty)."""
        self.block_size = max(1, min(self.storage_rows, block_rows or rows // MIX_BLOCKS))
        self.per_chunk = -(-self.storage_rows // self.block_size)
        return -(-self.n // self.storage_rows) * self.per_chunk

    def block(self, j: int) -> tuple[int, int]:
        """Start and stop of block ``j`` (after :meth:`cut`)."""
        chunk, b = divmod(j, self.per_chunk)
        start = chunk * self.storage_rows + b * self.block_size
        return start, min(start + self.block_size, (chunk + 1) * self.storage_rows, self.n)


def block_shuffled_chunks(stores: Sequence["FeatureStore"], layer: str, pooling: str | None, split: Splits,
                          rows: int, seed: Seed, block_rows: int | None = None) -> Iterator[Codes]:
    """The committed rows of one group of ``stores`` (one store, or the shards of one) in a block-shuffled
    order: see :meth:`StoreReader.iter_chunks` with ``shuffle_seed``."""
    if rows < 1:
        raise ParameterError(f"rows must be a positive integer; got {rows!r}.")
    wanted = _wanted(split)
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        groups, first = [], [0]  # first: the number of the first block of each store
        for store in stores:
            f = stack.enter_context(store._reading())
            groups.append(_Rows(f, store.resolve_group(f, layer, pooling), cache=False))
            first.append(first[-1] + groups[-1].cut(rows, block_rows))
        order = np.arange(first[-1], dtype=np.uint32 if first[-1] < 2 ** 32 else np.int64)
        rng.shuffle(order)  # 4 bytes a block
        pending: list[Codes] = []
        have = 0
        for j in order:
            g = int(np.searchsorted(first, j, side="right")) - 1
            start, stop = groups[g].block(int(j) - first[g])
            part = groups[g].read(start, stop, wanted) if start < stop else None
            if part is None:
                continue
            pending.append(part)
            have += len(part)
            del part
            while have >= rows:
                chunk, pending = _deal(pending, rows, rng)
                have -= rows
                yield chunk
                del chunk
        if have:
            yield _deal(pending, have, rng)[0]


_COLUMNS = ("features", "labels", "paths", "splits", "sha256")


def _deal(parts: list[Codes], rows: int, rng: np.random.Generator) -> tuple[Codes, list[Codes]]:
    """``rows`` rows drawn at random from ``parts``, in random order, and the rows left (for the next chunk).
    Empties ``parts`` as it goes, so that the rows are in memory about once (no concatenation first)."""
    have = sum(len(p) for p in parts)
    slot = rng.permutation(have)  # where each row of the parts goes: the chunk (slot < rows), or back
    out = {name: np.empty((rows, *getattr(parts[0], name).shape[1:]),
                          np.result_type(*[getattr(p, name).dtype for p in parts])) for name in _COLUMNS}
    meta = {"class_names": parts[0].class_names, "layer": parts[0].layer, "pooling": parts[0].pooling}
    rest, at = [], 0
    while parts:
        part = parts.pop(0)
        to = slot[at:at + len(part)]
        at += len(part)
        here = to < rows
        every = bool(here.all())
        for name in _COLUMNS:
            values = getattr(part, name)
            out[name][to if every else to[here]] = values if every else values[here]
        if not every:
            rest.append(part.take(np.flatnonzero(~here)))
        del part
    return Codes(**out, **meta), rest


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
                    rows: int = 8192, shuffle_seed: Seed = None, block_rows: int | None = None) -> Iterator[Codes]:
        """Committed rows of one group, ``rows`` at a time (for stores larger than memory).

        ``shuffle_seed`` None (the default): in store order, each chunk the wanted rows of ``rows``
        consecutive store rows. Otherwise a *block shuffle*, for training by SGD on a store whose rows are
        sorted (an extraction from class folders writes them class by class): the group is cut into blocks
        of contiguous rows, none across two storage chunks of the features (whole storage chunks, or
        ``block_rows``, default ``rows // 8``, when smaller), the blocks are read in an order drawn from
        ``shuffle_seed`` (across every shard of a sharded store), and each chunk gathers ``rows`` rows (the
        last one fewer) from several blocks, in shuffled order. Every wanted row comes once per pass;
        the same seed gives the same chunks. Each block is read once (without the chunk cache, so an
        uncompressed block costs only its own bytes): when blocks are whole storage chunks (``rows`` of at
        least 8 storage chunks, e.g. the default 8192), a pass reads the group once; smaller blocks read a
        compressed storage chunk once per block. Memory: about ``rows`` rows plus one block."""

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
        For checks below this API (``storage.tools``, ``storage.verify``); rows past ``committed`` are not to be
        trusted."""
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
                    rows: int = 8192, shuffle_seed: Seed = None, block_rows: int | None = None) -> Iterator[Codes]:
        """Committed rows of one group, ``rows`` at a time (for stores larger than memory); with
        ``shuffle_seed``, block-shuffled (see :meth:`StoreReader.iter_chunks`).
        The file is opened once per pass; each chunk is read and filtered on its own."""
        if shuffle_seed is not None:
            yield from block_shuffled_chunks([self], layer, pooling, split, rows, shuffle_seed, block_rows)
            return
        wanted = _wanted(split)
        with self._reading() as f:
            group = _Rows(f, self.resolve_group(f, layer, pooling))
            for start in range(0, group.n, rows):
                part = group.read(start, min(group.n, start + rows), wanted)
                if part is not None:
                    yield part

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
