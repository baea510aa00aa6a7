"""The warm runner (`cnncodes server start` starts it): commands run in a child of a process whose imports
are done, with the caller's arguments, directory, environment and terminal, and its exit status; where it
cannot take a command, the command runs in its own process with the same result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from cnncodes import handoff

pytestmark = pytest.mark.skipif(not handoff.supported(), reason="the runner needs fork and Unix sockets")
CNNCODES = [sys.executable, "-m", "cnncodes.program"]  # what the program runs


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture
def warm(tmp_path):
    """A runner of its own (no Prefect server: the commands used here run no flow)."""
    env = dict(os.environ, CNNCODES_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               CNNCODES_PROGRESS="0", **handoff.ENV_DEFAULTS)
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "home").mkdir()
    log = open(tmp_path / "runner.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "cnncodes.runner"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sock = tmp_path / "home" / "run" / "runner.sock"
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "runner.log").read_text()
        time.sleep(0.1)
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"  # only its owner may reach it
    yield env, proc, tmp_path
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    assert not sock.exists()  # a stopped runner takes its socket away


def _run(args, env, cwd, **kw):
    return subprocess.run(CNNCODES + list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
                          **kw)


def test_a_command_in_the_runner_is_the_command_run_alone(warm):
    from test_linear import make_store

    env, proc, tmp = warm
    make_store(tmp / "work" / "s.h5")
    inside = _run(["store", "info", "s.h5", "--json"], dict(env, CNNCODES_RUNNER="require"), tmp / "work")
    alone = _run(["store", "info", "s.h5", "--json"], dict(env, CNNCODES_RUNNER="0"), tmp / "work")
    assert inside.returncode == alone.returncode == 0, inside.stderr + alone.stderr
    assert json.loads(inside.stdout) == json.loads(alone.stdout)  # relative path: the caller's directory
    # errors: the same message and exit status
    bad = _run(["store", "info", "missing.h5"], dict(env, CNNCODES_RUNNER="require"), tmp / "work")
    bad_alone = _run(["store", "info", "missing.h5"], dict(env, CNNCODES_RUNNER="0"), tmp / "work")
    assert bad.returncode == bad_alone.returncode == 2
    assert bad.stderr == bad_alone.stderr and "missing.h5" in bad.stderr
    out = _run(["store", "info", "s.h5", "--json"], dict(env, CNNCODES_RUNNER="require"), tmp / "work")
    assert out.returncode == 0 and proc.poll() is None  # the runner serves on


def test_a_command_it_cannot_take_runs_alone_and_require_says_why(warm):
    env, proc, tmp = warm
    other = dict(env, PREFECT_HOME=str(tmp / "elsewhere"))  # read when Prefect is imported: must match
    required = _run(["backbones", "--json"], dict(other, CNNCODES_RUNNER="require"), tmp)
    assert required.returncode == 2 and "environment differs" in required.stderr
    assert "PREFECT_HOME" in required.stderr
    elsewhere = _run(["backbones", "--json"], dict(env, CNNCODES_RUNNER="require",  # not the runner's API
                                                    PREFECT_API_URL="http://127.0.0.1:9/api"), tmp)
    assert elsewhere.returncode == 2 and "Prefect API the runner was started for" in elsewhere.stderr
    fallback = _run(["backbones", "--json"], other, tmp)
    assert fallback.returncode == 0 and json.loads(fallback.stdout)  # ran alone, same answer
    # variables read only while a command runs need not match
    assert _run(["backbones", "--json"], dict(env, CNNCODES_RUNNER="require", CNNCODES_PROGRESS="1",
                                              TF_CPP_MIN_LOG_LEVEL="3"), tmp).returncode == 0


def test_changed_code_is_never_run_stale_the_runner_restarts(warm):
    env, proc, tmp = warm
    module = ROOT / "cnncodes" / "options.py"  # imported by the runner
    before = module.stat()
    try:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        stale = _run(["backbones", "--json"], dict(env, CNNCODES_RUNNER="require"), tmp)
        assert stale.returncode == 2 and "options.py changed" in stale.stderr
        sock = tmp / "home" / "run" / "runner.sock"
        deadline = time.monotonic() + 120
        while True:  # the same process, restarted: it serves again once its imports are done
            again = _run(["backbones", "--json"], dict(env, CNNCODES_RUNNER="require"), tmp)
            if again.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert again.returncode == 0, again.stderr
        assert proc.poll() is None and sock.exists()
        assert "restarting" in (tmp / "runner.log").read_text()
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))


def _new_children(pid: int, before: set[int], deadline_s: float = 60) -> list[int]:
    """The runner's children that were not there before (a child of the last command may still be exiting)."""
    deadline = time.monotonic() + deadline_s
    while not (kids := [k for k in _children(pid) if k not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kids


def test_ctrl_c_reaches_the_command_and_a_dead_command_or_caller_is_handled(warm):
    env, proc, tmp = warm
    req = dict(env, CNNCODES_RUNNER="require")
    # Ctrl-C: the caller forwards SIGINT; the command stops as it would alone (status 130)
    caller = subprocess.Popen(CNNCODES + ["layers", "mobilenet_v2", "--weights", "none"], env=req, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children(proc.pid), "the runner started no child"
    time.sleep(1)  # the child has told the caller it runs the command (a child killed before that: the
    caller.send_signal(signal.SIGINT)  # caller runs the command itself, or fails under require)
    _, err = caller.communicate(timeout=120)
    assert caller.returncode == 130 and "interrupted" in err
    # a command killed outright: the caller says so, status 1
    before = set(_children(proc.pid))
    caller = subprocess.Popen(CNNCODES + ["layers", "mobilenet_v2", "--weights", "none"], env=req, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = _new_children(proc.pid, before)
    time.sleep(1)
    os.kill(kids[0], signal.SIGKILL)
    _, err = caller.communicate(timeout=120)
    assert caller.returncode == 1 and "ended without an exit status" in err
    # a caller killed outright: its command does not run on alone
    before = set(_children(proc.pid))
    caller = subprocess.Popen(CNNCODES + ["layers", "mobilenet_v2", "--weights", "none"], env=req, cwd=tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = _new_children(proc.pid, before)
    time.sleep(1)
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 90
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{k}").exists() for k in kids)
    assert proc.poll() is None
