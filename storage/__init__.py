"""cnncodes storage: HDF5 feature stores and their manifests.

Needs only NumPy, h5py and the standard library (pandas and joblib for the
registry): an analyst can read a store without TensorFlow or Prefect.
"""
from .errors import (BackboneError, CnncodesError, DatasetError, ParameterError, StoreError,
                     StoreLockedError, StoreMismatchError)
from .manifest import Manifest, Sample, Skip
from .registry import ModelMismatchError, ModelRecord, ModelRegistry, RegistryError, TamperedModelError
from .store import POOLINGS, Codes, FeatureStore, GroupSpec, StoreWriter, group_name

__all__ = [
    "BackboneError", "CnncodesError", "Codes", "DatasetError", "FeatureStore", "GroupSpec", "Manifest",
    "ParameterError", "POOLINGS", "Sample", "Skip", "StoreError", "StoreLockedError", "StoreMismatchError",
    "StoreWriter", "group_name", "ModelRegistry", "ModelRecord", "RegistryError", "ModelMismatchError",
    "TamperedModelError",
]
