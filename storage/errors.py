"""The project's exceptions.

Each one is raised at a boundary (a parameter, a dataset, a store) with a
message that says what was wrong and what to do. The CLI prints the message,
not a traceback, and exits non-zero. They live in ``storage`` because it is the
bottom layer: ``tasks`` and ``flows`` import them from here.
"""
from __future__ import annotations


class CnncodesError(Exception):
    """Base class: an error the user can act on; its message says how."""


class ParameterError(CnncodesError, ValueError):
    """A parameter is out of its allowed range or of the wrong kind."""


class DatasetError(CnncodesError):
    """The dataset cannot be used as given (layout, labels, no images...)."""


class BackboneError(CnncodesError):
    """A backbone, layer, weights or input size cannot be used."""


class StoreError(CnncodesError):
    """A feature store cannot be opened, read or written."""


class StoreMismatchError(StoreError):
    """Features of another backbone, weights or preprocessing would be mixed."""


class StoreLockedError(StoreError):
    """Another process is writing to the same store."""


class StoreFullError(StoreError):
    """The disk holding a store has no room for the next rows (checked before HDF5 writes them)."""


class StoreDamagedError(StoreError):
    """Rows or structures of a store file cannot be read back as written (a checksum failed, the file
    was cut or overwritten). ``path``, ``group``, ``dataset`` and ``rows`` ([start, stop) ranges) say
    where, as far as known."""

    def __init__(self, message: str, path: str = "", group: str = "", dataset: str = "",
                 rows: list[tuple[int, int]] | None = None):
        super().__init__(message)
        self.path = path
        self.group = group
        self.dataset = dataset
        self.rows = list(rows or [])
