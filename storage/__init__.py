"""cnncodes storage: HDF5 feature stores and their manifests.

Needs only NumPy, h5py and the standard library (pandas and joblib for the
registry): an analyst can read a store without TensorFlow or Prefect.
``open_store(path)`` opens any store (one file or sharded) for reading.
"""
from .errors import (BackboneError, CnncodesError, DatasetError, ParameterError, StoreDamagedError, StoreError,
                     StoreFullError, StoreLockedError, StoreMismatchError)
from .files import FileLock, atomic_path, atomic_write, atomic_write_json
from .manifest import Manifest, Sample, Skip
from .registry import ModelMismatchError, ModelRecord, ModelRegistry, RegistryError, TamperedModelError
from .store import (POOLINGS, Codes, FeatureStore, GroupSpec, ShardedStore, StoreReader, StoreWriter, group_name,
                    open_store)

__all__ = [
    "BackboneError", "CnncodesError", "Codes", "DatasetError", "FeatureStore", "FileLock", "GroupSpec", "Manifest",
    "ParameterError", "POOLINGS", "Sample", "ShardedStore", "Skip", "StoreDamagedError", "StoreError",
    "StoreFullError", "StoreLockedError", "StoreMismatchError", "StoreReader", "StoreWriter", "atomic_path", "atomic_write",
    "atomic_write_json", "group_name", "open_store", "ModelRegistry", "ModelRecord", "RegistryError",
    "ModelMismatchError", "TamperedModelError",
]
