"""HDF5 feature stores: CNN codes with their provenance.

:func:`open_store` opens a store for reading, whichever kind it is: one file
(:class:`~storage.reader.FeatureStore`) or the index of a sharded store
(:class:`~storage.sharded.ShardedStore`). The pieces live in their own modules:

* :mod:`storage.format` - the file layout (documented there, with the SWMR protocol), attribute
  encoding, the group fingerprint and the shard index;
* :mod:`storage.reader` - :class:`FeatureStore` and :class:`Codes`;
* :mod:`storage.sharded` - :class:`ShardedStore`;
* :mod:`storage.writer` - :class:`StoreWriter`, :class:`GroupSpec` and :func:`store_is_current`.

Their public names are importable from here too. This module imports neither TensorFlow nor Prefect.
"""
from __future__ import annotations

import os

from .format import (COMPRESSIONS, DTYPES, IDENTITY_KEYS, LIBVER, POOLINGS, ROW_DATASETS, STORE_FORMAT, group_name,
                     is_index)
from .reader import Codes, FeatureStore, StoreReader
from .sharded import ShardedStore
from .writer import GroupSpec, Plan, StoreWriter, store_is_current

__all__ = [
    "COMPRESSIONS", "DTYPES", "IDENTITY_KEYS", "LIBVER", "POOLINGS", "ROW_DATASETS", "STORE_FORMAT", "Codes",
    "FeatureStore", "GroupSpec", "Plan", "ShardedStore", "StoreReader", "StoreWriter", "group_name", "open_store",
    "store_is_current",
]


def open_store(path: str | os.PathLike) -> StoreReader:
    """Open the feature store at ``path`` for reading: a :class:`ShardedStore` for the index of a sharded
    store, a :class:`FeatureStore` otherwise (StoreError when there is no store there).

    >>> store = open_store("stores/flowers.h5")                        # doctest: +SKIP
    >>> codes = store.read("conv_pw_13_relu", "avg", split="train")    # doctest: +SKIP
    """
    if os.path.isfile(path) and is_index(path):
        return ShardedStore(path)
    return FeatureStore(path)
