"""What a resumed phase remembers of its epochs before the kill: the best monitored value (so the
best-weights checkpoint is not overwritten by a worse epoch) and early stopping's state (best value,
epochs without improvement, and the best weights, read back from ``best.weights.h5``).

Keras' ``ModelCheckpoint`` and ``EarlyStopping`` start afresh at every ``fit``; a phase resumed from its
backup would otherwise judge its first epoch against nothing, overwrite the best checkpoint with it, and
restore the best of the resumed epochs only. The epochs before the kill are read from the phase's CSV
log (``CSVLogger`` appends a row per finished epoch; rows at or past the backup's epoch belong to
epochs that run again and are ignored).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


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
