"""Every reliance on another library's private behaviour, in one place, each with a plain fallback.

cnncodes leans on five things its libraries do not promise. Each is used only through this module, is
checked by ``tests/test_internals.py`` (which fails, naming the library and the name, when a new version
changes it), and falls back to plain public behaviour when it is missing:

========================================  ==========================================  =========================
what                                      why                                         without it
========================================  ==========================================  =========================
Keras' ``seed_generator.python_random``   the same seed gives the same random weights  ``set_random_seed`` only:
                                          in a Dask worker as in the main process      other threads may shift it
Keras' ``config.keras_home()``            where Keras caches weights, for the message  ``KERAS_HOME`` or ~/.keras
                                          that says where to put them
Prefect's ``QueueService.drain_all``      a command's last logs reach the API before   the interpreter's normal
                                          the command ends without module teardown     exit (Prefect drains then)
``threading._shutdown``,                  the interpreter's exit work without its      the normal exit: seconds
``atexit._run_exitfuncs``                 module teardown (seconds with TensorFlow)    longer, same result
Prefect's ``PREFECT__SERVER_EPHEMERAL``   a command's temporary server runs as         Prefect's own temporary
and ``PREFECT__SERVER_FINAL``             Prefect's own temporary server would         server, in the command
========================================  ==========================================  =========================

Nothing here imports Keras or Prefect until asked to.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# The environment Prefect's own temporary server runs with (prefect.server.api.server), read by its app
# factory: tests/test_internals.py checks that the factory still reads them.
TEMPORARY_SERVER_ENV = {"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


@contextlib.contextmanager
def keras_python_random(seed: int) -> Iterator[bool]:
    """Within the block, Keras draws its initializers' seeds from a generator of its own seeded with
    ``seed``, not from Python's global ``random`` that other threads (Prefect, Dask) also consume.
    Yields False when this Keras has no such generator (then only ``keras.utils.set_random_seed`` holds)."""
    try:
        from keras.src.random import seed_generator
        shared = seed_generator.python_random
    except (ImportError, AttributeError):
        log.warning("this Keras has no keras.src.random.seed_generator.python_random: seeded random weights are "
                    "made with keras.utils.set_random_seed alone, and may differ between a worker and the main "
                    "process. Use a weights file for weights that must match.")
        yield False
        return
    seed_generator.python_random = random.Random(seed)
    try:
        yield True
    finally:
        seed_generator.python_random = shared


def keras_home() -> str:
    """The folder Keras caches weights in (read from KERAS_HOME when Keras was imported)."""
    try:
        from keras.src.backend import config

        return str(config.keras_home())
    except (ImportError, AttributeError):
        return os.environ.get("KERAS_HOME", str(Path.home() / ".keras"))


def drain_prefect_queues(timeout: float = 5) -> bool:
    """Send the logs and events Prefect still queues to its API (best effort, at most ``timeout`` s).
    True when done or when this process never imported Prefect; False when this Prefect has no
    ``QueueService.drain_all`` (then let the interpreter exit normally: Prefect drains at exit)."""
    if "prefect" not in sys.modules:
        return True
    try:
        from prefect._internal.concurrency.services import QueueService
    except ImportError:
        return False
    drain = getattr(QueueService, "drain_all", None)
    if not callable(drain):
        return False
    try:
        drain(timeout=timeout)
    except Exception:  # noqa: BLE001  best effort, as at a normal exit
        pass
    return True


def run_exit_work() -> bool:
    """What the interpreter does first at exit, now: join non-daemon threads (and run their exit hooks),
    then every ``atexit`` function. False, having done nothing, when this Python lacks either hook: the
    caller then ends the process the normal way."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if not callable(shutdown) or not callable(run_exitfuncs):
        return False
    shutdown()
    run_exitfuncs()
    return True


def can_end_early() -> bool:
    """Whether :func:`drain_prefect_queues` and :func:`run_exit_work` can do their work in this process
    (checked before relying on them, as the warm runner does at its start)."""
    import atexit
    import threading

    if not callable(getattr(threading, "_shutdown", None)) or not callable(getattr(atexit, "_run_exitfuncs", None)):
        return False
    if "prefect" not in sys.modules:
        return True
    try:
        from prefect._internal.concurrency.services import QueueService
    except ImportError:
        return False
    return callable(getattr(QueueService, "drain_all", None))
