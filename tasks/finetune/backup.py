"""Backups of a training phase for resuming after a kill: the model's weights and the optimizer's state
(its iteration count included, so learning-rate schedules go on where they were) after each epoch.

Keras' ``BackupAndRestore`` did this before; it cost about 0.3 s of each 4-5 s epoch on 2 cores
(``model.save_weights`` walks the object graph and writes some 650 HDF5 nodes, and with
``double_checkpoint`` it copied the previous file first). Here one epoch's backup is:

* a snapshot of every variable's value, on the training thread (a copy in memory, a few tens of
  milliseconds for MobileNetV2 with its momentum);
* in a background thread, while the next epoch trains: one ``.npz`` file written under a temporary
  name, fsynced and renamed (``state-EPOCH.npz``), then ``training_metadata.json`` (``{"epoch": N,
  "state": "state-000N.npz", ...}``) replaced atomically the same way, then the older state file
  removed. The metadata file is the commit point: whenever the process is killed, it names a complete
  state file of a finished epoch (the last one whose backup had been committed), so a resumed run
  starts exactly after that epoch.

The thread's work is joined before the next snapshot is written and when training ends (also on an
exception), and an error in it is raised on the training thread. A backup directory left by Keras'
``BackupAndRestore`` (``latest.weights.h5``) is still read.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import CnncodesError
from storage.files import INCOMPLETE, atomic_path, atomic_write_json

from .. import runtime

METADATA = "training_metadata.json"
KERAS_WEIGHTS = "latest.weights.h5"  # what keras.callbacks.BackupAndRestore wrote


def _variables(model) -> list:
    opt = model.optimizer
    return list(model.weights) + (list(opt.variables) if opt is not None else [])


def restore(model, backup_dir: str | Path) -> int:
    """Load the weights and optimizer state backed up in ``backup_dir`` into a compiled ``model``;
    returns the number of epochs they are the result of (0: no backup, nothing loaded)."""
    backup_dir = Path(backup_dir)
    meta_path = backup_dir / METADATA
    if not meta_path.exists():
        return 0
    meta = json.loads(meta_path.read_text())
    epoch = int(meta.get("epoch", 0))
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables exist before they are loaded
    if "state" not in meta:  # a backup of keras.callbacks.BackupAndRestore
        model.load_weights(str(backup_dir / KERAS_WEIGHTS))
        return epoch
    variables = _variables(model)
    with np.load(backup_dir / meta["state"]) as state:
        values = [state[f"v{i}"] for i in range(len(state.files))]
    shapes = [tuple(v.shape) for v in variables]
    if len(values) != len(variables) or any(tuple(a.shape) != s for a, s in zip(values, shapes)):
        raise CnncodesError(f"the backup in {backup_dir} was made by a different network or optimizer "
                           f"({len(values)} variables, this one has {len(variables)}); remove the directory "
                           "to train this phase from its start.")
    for var, value in zip(variables, values):
        var.assign(value)
    return epoch


class EpochBackup:
    """``callback()`` backs the model up at each epoch's end into ``backup_dir`` (see the module's
    doc); ``wait()`` joins a backup still being written (also done when training ends)."""

    def __init__(self, backup_dir: str | Path):
        self.dir = Path(backup_dir)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save(self, model, epoch: int) -> None:
        """Back up ``model`` as having finished ``epoch`` epochs (the write ends in the background)."""
        self.wait()
        values = [np.copy(v.numpy()) for v in _variables(model)]  # copies: training goes on at once
        self._thread = threading.Thread(target=self._write, args=(values, epoch), name="cnncodes-backup",
                                        daemon=False)
        self._thread.start()

    def _write(self, values: list[np.ndarray], epoch: int) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"state-{epoch:04d}.npz"
            with atomic_path(self.dir / name, suffix=".npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **{f"v{i}": v for i, v in enumerate(values)})
            atomic_write_json(self.dir / METADATA, {"epoch": epoch, "state": name, "variables": len(values)})
            for old in [*self.dir.glob("state-*.npz"), *self.dir.glob(f".state-*{INCOMPLETE}*")]:
                if old.name != name:  # older states, and a write a kill interrupted
                    old.unlink(missing_ok=True)
            (self.dir / KERAS_WEIGHTS).unlink(missing_ok=True)
        except BaseException as exc:  # raised on the training thread by wait()
            self._error = exc

    def callback(self):
        keras = runtime.keras()
        outer = self

        class Backup(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                outer.save(self.model, epoch + 1)

            def on_train_end(self, logs=None):
                outer.wait()

        return Backup()

    def __enter__(self) -> "EpochBackup":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.wait()
        else:  # training failed: finish the backup, but the training error is the one to see
            try:
                self.wait()
            except Exception:
                pass
