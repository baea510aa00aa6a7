"""tasks/internals.py: the other libraries' private behaviour cnncodes leans on is still there and still does
what it is used for, and each has a plain fallback. A failure here after an upgrade names the library and
the name that changed: adapt tasks/internals.py (or drop the reliance), nothing else."""
from __future__ import annotations

import inspect
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tasks import internals


def test_keras_still_draws_initializer_seeds_from_its_python_random():
    import keras
    from keras.src.random import seed_generator

    assert callable(getattr(seed_generator, "python_random", None) and seed_generator.python_random.randint), \
        "Keras no longer draws seeds from keras.src.random.seed_generator.python_random: see tasks/internals.py"
    shared = seed_generator.python_random
    drawn = []
    for consume in (0, 5):
        with internals.keras_python_random(7) as private:
            assert private and seed_generator.python_random is not shared
            for _ in range(consume):  # another thread using Python's global random meanwhile
                random.random()
            drawn.append(keras.ops.convert_to_numpy(keras.initializers.GlorotUniform()((4, 4))))
        assert seed_generator.python_random is shared
    np.testing.assert_array_equal(drawn[0], drawn[1])
    with internals.keras_python_random(8):
        other = keras.ops.convert_to_numpy(keras.initializers.GlorotUniform()((4, 4)))
    assert not np.array_equal(drawn[0], other), "the seed no longer reaches Keras's initializers"


def test_without_keras_python_random_the_seed_is_set_the_public_way(monkeypatch, caplog):
    from keras.src.random import seed_generator

    monkeypatch.delattr(seed_generator, "python_random")
    with internals.keras_python_random(7) as private:
        assert private is False
    assert "set_random_seed alone" in caplog.text


def test_keras_home_is_where_keras_caches(monkeypatch, tmp_path):
    from keras.src.backend import config

    assert callable(config.keras_home), "Keras moved keras.src.backend.config.keras_home: see tasks/internals.py"
    assert internals.keras_home() == str(config.keras_home())
    monkeypatch.delattr(config, "keras_home")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert internals.keras_home() == str(tmp_path)


def test_prefect_queues_drain_through_queue_service(monkeypatch):
    import prefect  # noqa: F401  what a command has imported when it ends
    from prefect._internal.concurrency.services import QueueService

    assert callable(QueueService.drain_all), "Prefect moved QueueService.drain_all: see tasks/internals.py"
    assert "timeout" in inspect.signature(QueueService.drain_all).parameters
    assert internals.drain_prefect_queues(timeout=1) is True
    assert internals.can_end_early() is True
    monkeypatch.setattr(QueueService, "drain_all", None)  # (inherited: not deletable here)
    assert internals.drain_prefect_queues(timeout=1) is False
    assert internals.can_end_early() is False


def test_exit_work_runs_threads_and_atexit_hooks_before_an_early_exit(tmp_path):
    """What the program's fast exit relies on: the interpreter's own exit work, done now, then os._exit."""
    marks = tmp_path / "marks"
    script = textwrap.dedent(f"""
        import atexit, os, threading, time
        from tasks import internals
        def late():
            time.sleep(0.3)
            open({str(marks)!r}, "a").write("thread ")
        threading.Thread(target=late).start()
        atexit.register(lambda: open({str(marks)!r}, "a").write("atexit"))
        assert internals.run_exit_work()
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert marks.read_text() == "thread atexit"


def test_without_the_interpreters_exit_hooks_the_program_exits_the_normal_way(monkeypatch):
    import atexit
    import os

    from cnncodes import cli

    monkeypatch.delattr(atexit, "_run_exitfuncs")
    assert internals.run_exit_work() is False
    assert internals.can_end_early() is False
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("os._exit without the exit work"))
    with pytest.raises(SystemExit) as exited:
        cli._exit_fast(3)
    assert exited.value.code == 3


def test_prefects_app_factory_still_reads_the_temporary_server_settings():
    from prefect.server.api import server

    source = inspect.getsource(server.create_app)
    for key in internals.TEMPORARY_SERVER_ENV:
        assert f'"{key}"' in source, f"Prefect's create_app no longer reads {key}: see tasks/internals.py"
