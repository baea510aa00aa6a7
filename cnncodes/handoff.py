"""Handing a command to the warm runner (:mod:`cnncodes.runner`), or running it here.

The ``cnncodes`` program starts here. Where ``cnncodes server start`` left a warm runner, the command's
arguments, working directory, environment, umask and terminal (stdin, stdout and stderr as file
descriptors) go to it over a Unix socket; this process then only waits for the exit status and forwards
Ctrl-C (SIGINT), SIGTERM and SIGHUP to the child that runs the command. Where there is no runner, or it
hands the command back, the command runs in this process (:func:`cnncodes.cli.main`), as before.

``CNNCODES_RUNNER=0`` runs every command here; ``CNNCODES_RUNNER=require`` makes a command the runner
hands back fail, with the reason (for tests and benchmarks). Only the standard library is imported:
the waiting process stays small.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Sequence

# Environment variables that the runner's imports may have read: a command whose values differ runs in
# its own process. (Variables read only while a command runs need not match: the child gets the
# command's whole environment.)
IMPORT_TIME_ENV = ("PREFECT_", "CNNCODES_", "OMP_", "MKL_", "OPENBLAS_", "BLIS_", "NUMEXPR_", "MPL", "PYTHON",
                   "VIRTUAL_ENV", "DASK_", "HDF5_", "LANG", "LC_", "HOME", "TMPDIR", "TZ")
# Read by TensorFlow, Keras, JAX and PyTorch when they are imported: in a command's child, after its environment
# is in place (the runner never imports them), so they need not match.
FRAMEWORK_ENV = ("TF_", "KERAS_", "CUDA_", "XLA_", "JAX_", "NVIDIA_", "TORCH", "PYTORCH_")
# Read while a command runs; PREFECT_API_URL is compared on its own (the runner checks that the API it
# was started for is the one the command would use, and answers).
RUNTIME_ONLY = ("CNNCODES_RUNNER", "CNNCODES_PROGRESS", "PREFECT_API_URL")
# What the cnncodes program sets where the user did not (cnncodes.cli.apply_env_defaults), so that the
# environment a command sends compares with the runner's, which the program started.
ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
PACKAGES = ("cnncodes", "tasks", "flows", "storage")  # the project's code: changed files restart the runner
NOT_VIA_RUNNER = ("server",)  # commands that run in their own process always
_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 4 << 20


class RunnerRefused(Exception):
    """The runner could not take the command (the reason is the message)."""


def home() -> Path:
    """``$CNNCODES_HOME``, default ``~/.cnncodes``: the server's record, the runner's socket and log."""
    return Path(os.environ.get("CNNCODES_HOME") or Path.home() / ".cnncodes")


def socket_path() -> Path:
    """The runner's socket: ``$CNNCODES_HOME/run/runner.sock`` (a folder only its owner may enter), or a
    short path under the temporary folder where that one is too long for a Unix socket."""
    path = home() / "run" / "runner.sock"
    if len(os.fsencode(path)) > 100:
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:12]
        path = Path(os.environ.get("TMPDIR") or "/tmp") / f"cnncodes-{os.getuid()}-{digest}" / "runner.sock"
    return path


def import_time_env(env: dict[str, str], frameworks: bool = False) -> dict[str, str]:
    """The variables of ``env`` that the runner's imports may have read (and TensorFlow's, Keras's and
    JAX's, where ``frameworks``: a runner that imported one of them)."""
    prefixes = IMPORT_TIME_ENV + (FRAMEWORK_ENV if frameworks else ())
    return {k: v for k, v in sorted(env.items()) if k.startswith(prefixes) and k not in RUNTIME_ONLY}


def turned_off() -> bool:
    """``CNNCODES_RUNNER`` is 0, off, no or false: every command runs in its own process."""
    return os.environ.get("CNNCODES_RUNNER", "").lower() in ("0", "off", "no", "false")


def supported() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


# --------------------------------------------------------------------------- messages
def send_message(conn: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(conn, [_HEADER.pack(len(data)) + data], list(fds))
    else:
        conn.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise EOFError("connection closed")
        buf += part
    return buf


def recv_message(conn: socket.socket, with_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    if with_fds:
        first, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, with_fds)
        if not first:
            raise EOFError("connection closed")
        head = first + _recv_exact(conn, _HEADER.size - len(first))
    else:
        head = _recv_exact(conn, _HEADER.size)
    (n,) = _HEADER.unpack(head)
    if n > _MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes refused")
    return json.loads(_recv_exact(conn, n)), fds


# --------------------------------------------------------------------------- the command's side
def try_run(argv: Sequence[str]) -> int | None:
    """Run ``argv`` in the warm runner and return its exit status; None where the command should run in
    this process instead (no runner, or one that cannot take it). ``CNNCODES_RUNNER=require`` makes that
    an error (exit status 2, the reason on stderr) instead."""
    if turned_off() or not supported():
        return None
    mode = os.environ.get("CNNCODES_RUNNER", "auto").lower()
    if argv and argv[0] in NOT_VIA_RUNNER or any(a in ("-h", "--help") for a in argv[:1]):
        return None
    try:
        return _run_in_runner(argv)
    except (OSError, EOFError, ValueError, RunnerRefused) as exc:
        if mode == "require":
            sys.stderr.write(f"cnncodes: the warm runner did not take the command: {exc}\n")
            return 2
        return None


def _run_in_runner(argv: Sequence[str]) -> int:
    path = socket_path()
    if not path.exists():
        raise RunnerRefused(f"no runner at {path} (`cnncodes server start` starts one)")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10)
        conn.connect(str(path))
        umask = os.umask(0)
        os.umask(umask)
        request = {"argv": list(argv), "cwd": os.getcwd(), "env": {**ENV_DEFAULTS, **os.environ}, "umask": umask}
        send_message(conn, request, fds=[0, 1, 2])
        reply, _ = recv_message(conn)
        if not reply.get("run"):
            raise RunnerRefused(reply.get("why") or "refused")
        pid = int(reply["pid"])
        conn.settimeout(None)
        forwarded = {}

        def forward(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            forwarded[sig] = signal.signal(sig, forward)
        try:
            while True:
                try:
                    done, _ = recv_message(conn)
                    return int(done.get("exit", 1))
                except InterruptedError:
                    continue
                except EOFError:
                    sys.stderr.write("cnncodes: the command's process ended without an exit status "
                                     "(killed?); whatever it committed is kept. Run the command again.\n")
                    return 1
        finally:
            for sig, old in forwarded.items():
                signal.signal(sig, old)
    finally:
        conn.close()
