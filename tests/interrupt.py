"""A kill after N epochs, for the tests of resuming a fine-tuning run, in this process.

``with interrupt_after(n): fine_tune(...)`` raises :class:`Interrupted` at the end of the n-th epoch that
fine-tuning trains (counted over its phases and, for an ensemble, its networks), after every callback of that
epoch has run, the backup included: where a kill between two epochs leaves a run. It goes through the flow's
public seam, ``tasks.finetune.training.phase_callbacks``, which gets one more callback, last; nothing in the
product knows about it. Imported by the tests and by the scripts they run on other Keras backends."""
from __future__ import annotations

import contextlib
from typing import Iterator


class Interrupted(Exception):
    """Stands for the kill."""


@contextlib.contextmanager
def interrupt_after(epochs: int) -> Iterator[None]:
    from tasks import runtime
    from tasks.finetune import training

    keras = runtime.keras()
    made = training.phase_callbacks
    ended = [0]

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ended[0] += 1
            if ended[0] == epochs:
                raise Interrupted(f"interrupted after {epochs} epochs")

    training.phase_callbacks = lambda *args, **kwargs: [*made(*args, **kwargs), Kill()]
    try:
        yield
    finally:
        training.phase_callbacks = made
