"""Sharded feature stores: several store files presented as one.

When extraction runs on several workers (Dask, several GPUs or machines), each shard of the dataset
is written to its own store file by its own single writer, with all of a store's guarantees
(incremental, crash-safe, never mixed). A small index file at the store's path lists the shards
(:func:`storage.format.write_index`); :func:`storage.open_store` opens it as a :class:`ShardedStore`,
which reads like one store.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import StoreError
from .format import read_index
from .reader import Classes, Codes, FeatureStore, Seed, Splits, StoreReader, block_shuffled_chunks


class ShardedStore(StoreReader):
    """The shards of an index, read as one store (rows in shard order)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.shard_paths = read_index(self.path)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise StoreError(f"cannot read the shard index {self.path}: {type(exc).__name__}: {exc}. It is damaged "
                             "or not an index: re-run the sharded extraction to write it again.") from exc
        missing = [str(p) for p in self.shard_paths if not p.exists()]
        if missing:
            raise StoreError(f"sharded store {self.path} lists shards that are missing: {missing[:3]}. Re-run the "
                             "extraction with the same --shards to rebuild them.")
        self.shards = [FeatureStore(p) for p in self.shard_paths]

    def __repr__(self) -> str:
        return f"ShardedStore({str(self.path)!r}, shards={len(self.shards)})"

    @property
    def provenance(self) -> dict[str, Any]:
        prov = dict(self.shards[0].provenance)
        prov["shards"] = [str(p) for p in self.shard_paths]
        prov["skipped"] = [s for shard in self.shards for s in (shard.provenance.get("skipped") or [])]
        return prov

    def groups(self) -> list[dict[str, Any]]:
        per = [shard.groups() for shard in self.shards]
        out = []
        for i, g in enumerate(per[0]):
            merged = dict(g)
            merged["rows"] = sum(p[i]["rows"] for p in per if i < len(p))
            merged["shards"] = len(per)
            out.append(merged)
        return out

    def read(self, layer: str, pooling: str | None = None, split: Splits = None, classes: Classes = None) -> Codes:
        return Codes.concat([s.read(layer, pooling, split, classes) for s in self.shards])

    def read_features(self, layer: str, pooling: str | None = None, split: Splits = None,
                      classes: Classes = None) -> np.ndarray:
        return np.concatenate([s.read_features(layer, pooling, split, classes) for s in self.shards])

    def iter_chunks(self, layer: str, pooling: str | None = None, split: Splits = None,
                    rows: int = 8192, shuffle_seed: Seed = None, block_rows: int | None = None) -> Iterator[Codes]:
        """Shard after shard; with ``shuffle_seed``, the blocks of every shard in one shuffled order
        (see :meth:`StoreReader.iter_chunks`)."""
        if shuffle_seed is not None:
            yield from block_shuffled_chunks(self.shards, layer, pooling, split, rows, shuffle_seed, block_rows)
            return
        for s in self.shards:
            yield from s.iter_chunks(layer, pooling, split, rows)

    def row_splits(self, layer: str, pooling: str | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.shards:
            out.update(s.row_splits(layer, pooling))
        return out

    def lookup(self, layer: str, pooling: str | None, sha256: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s in self.shards:
            out.update(s.lookup(layer, pooling, sha256))
        return out

    def group_attrs(self, layer: str, pooling: str | None = None) -> dict[str, Any]:
        attrs = [s.group_attrs(layer, pooling) for s in self.shards]
        out = dict(attrs[0])
        out["rows"] = sum(a["rows"] for a in attrs)
        fps = {a.get("manifest_fingerprint") for a in attrs}
        out["manifest_fingerprint"] = attrs[0].get("manifest_fingerprint") if len(fps) == 1 else ""
        out["shard_fingerprints"] = [a.get("manifest_fingerprint") for a in attrs]
        return out
