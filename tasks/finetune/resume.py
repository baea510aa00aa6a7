"""What a resumed phase starts from and remembers of its epochs before the kill.

A phase's backup is ``keras.callbacks.BackupAndRestore``'s folder (``backup-<phase>/``): after each epoch the
model's weights with the optimizer's state (``latest.weights.h5``, the previous epoch's kept beside it), then
``training_metadata.json`` with the number of finished epochs; at the start of the next ``fit`` it loads them
back. :func:`backup_epoch` reads that number before the ``fit``, so that the flow's own bookkeeping (where
the training data's epochs start, the rows of the history, the epochs before the kill) agrees with it.

The epochs before the kill keep their say: the best monitored value (so the best-weights checkpoint is not
overwritten by a worse epoch) and early stopping's state (best value, epochs without improvement, and the
best weights, read back from ``best.weights.h5``). Keras' ``ModelCheckpoint`` and ``EarlyStopping`` start
afresh at every ``fit``; a phase resumed from its backup would otherwise judge its first epoch against
nothing, overwrite the best checkpoint with it, and restore the best of the resumed epochs only. The epochs
before the kill are read from the phase's CSV log (``CSVLogger`` appends a row per finished epoch; rows at
or past the backup's epoch belong to epochs that run again and are ignored).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# what keras.callbacks.BackupAndRestore writes after the weights, once an epoch is backed up: {"epoch": N, ...}
METADATA = "training_metadata.json"


def backup_epoch(backup_dir: str | Path) -> int:
    """The number of finished epochs that the ``BackupAndRestore`` folder ``backup_dir`` holds, from which the
    phase's ``fit`` resumes; 0 where there is no folder. A folder it could not resume from correctly is removed,
    said in the log, and the phase trains from its first epoch: one without ``training_metadata.json`` (the
    first backup, interrupted before it was complete), one whose metadata does not read (interrupted while it
    was written), and one in the format of earlier cnncodes versions (their own ``.npz`` backup, which
    ``BackupAndRestore`` would take for an epoch count without weights)."""
    folder = Path(backup_dir)
    if not folder.is_dir():
        return 0
    why = ""
    try:
        meta = json.loads((folder / METADATA).read_text())
        epoch = int(meta["epoch"])
        if "state" in meta:
            why = "it is in the format of an earlier cnncodes version, which this one does not read"
    except FileNotFoundError:
        why = "its first epoch's backup was not complete"
    except (ValueError, TypeError, KeyError):
        why = f"its {METADATA} does not read"
    if not why:
        return epoch
    log.warning("%s: %s; removed, this phase trains from its first epoch", folder, why)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def prior_values(csv_path: str | Path, start_epoch: int, monitor: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of ``monitor`` for the epochs before ``start_epoch`` in a CSVLogger file (the
    last row of an epoch that was logged twice), in epoch order; [] when there is none."""
    path = Path(csv_path)
    if start_epoch <= 0 or not path.is_file():
        return []
    values: dict[int, float] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                epoch, value = int(row["epoch"]), float(row[monitor])
            except (KeyError, TypeError, ValueError):
                continue
            if 0 <= epoch < start_epoch and math.isfinite(value):
                values[epoch] = value
    return sorted(values.items())


def maximised(monitor: str) -> bool:
    """Whether a larger ``monitor`` is better (Keras' "auto" mode: losses and errors are minimised)."""
    return not any(k in monitor for k in ("loss", "error"))


def best_prior(values: list[tuple[int, float]], monitor: str) -> float | None:
    if not values:
        return None
    pick = max if maximised(monitor) else min
    return pick(v for _, v in values)


def resumable_early_stopping(keras: Any, prior: list[tuple[int, float]], best_weights: str | Path | None,
                             **kwargs: Any):
    """A ``keras.callbacks.EarlyStopping(**kwargs)`` that, when training begins, replays ``prior`` (the
    epochs before a resume) and takes the best weights from the file ``best_weights`` (what the
    best-weights checkpoint wrote at the best of them)."""

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if not prior:
                return
            restore, self.restore_best_weights = self.restore_best_weights, False
            try:
                for epoch, value in prior:
                    self.on_epoch_end(epoch, {self.monitor: value})
            finally:
                self.restore_best_weights = restore
            self.stopped_epoch = 0
            self.model.stop_training = False
            if restore and best_weights is not None and Path(best_weights).is_file():
                current = self.model.get_weights()
                self.model.load_weights(str(best_weights))
                self.best_weights = self.model.get_weights()
                self.model.set_weights(current)

    return ResumableEarlyStopping(**kwargs)
