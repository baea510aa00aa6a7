"""The warm runner: commands start in a process whose imports are already done.

A ``cnncodes`` command spends most of a short run importing (Prefect, scikit-learn, matplotlib, the
flows: about 3 s on 2 cores, against about 1 s of work for ``train-linear`` on a small store). ``cnncodes
server start`` therefore also starts this runner beside the Prefect server: a process that has
imported all of that once and waits on a Unix socket. A command finds it and hands over its arguments,
working directory, environment, umask and its own stdin, stdout and stderr (passed as file
descriptors, so progress bars and colours reach the terminal as before); the runner forks a child
that runs the command exactly as the ``cnncodes`` program would, and the command's process only waits,
forwards Ctrl-C (SIGINT), SIGTERM and SIGHUP to the child, and exits with the child's status.

It is only a shortcut: where it is not running, or cannot take a command, the command runs in its own
process as before, and nothing differs but time. It cannot take a command (and says why in the
``CNNCODES_RUNNER=require`` mode used by tests) when

* the environment variables read at import time differ from the runner's (``PREFECT_*``,
  ``CNNCODES_*``, ``KERAS_*``, ``TF_*``, thread counts, ``PYTHON*``, ...: see :data:`IMPORT_TIME_ENV`);
* cnncodes' source files or the installed packages changed since the runner imported them (it then
  restarts itself);
* the caller is another user (the socket is in a directory only its owner may enter, and the runner
  checks the peer's uid), or the platform has no ``fork`` or Unix sockets (Windows).

``CNNCODES_RUNNER=0`` runs every command in its own process; ``server`` commands always do. The
command's side (handing over, waiting, forwarding signals) is :mod:`cnncodes.handoff`; this module is
the runner's side, run as ``python -m cnncodes.runner`` by ``cnncodes server start``.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tasks import internals
from cnncodes.handoff import PACKAGES, import_time_env, recv_message, send_message, socket_path

# What commands import, once. Never TensorFlow: a fork of a process that started its threads would copy
# them half-alive; commands that need it import it in their own child.
PRELOAD = ("h5py", "joblib", "matplotlib.figure", "prefect", "prefect.client.orchestration", "prefect.flows",
           "sklearn.decomposition", "sklearn.linear_model", "sklearn.model_selection", "sklearn.svm",
           "cnncodes.cli", "flows", "flows.predict", "flows.sweep", "flows.train_linear", "tasks.prefect_tasks")


def _preload() -> None:
    import importlib

    import matplotlib

    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)


def _code_state() -> dict[str, int]:
    """mtime_ns of every loaded module file of the project and of the folders packages install into."""
    state: dict[str, int] = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and (name.split(".")[0] in PACKAGES or name == "__main__"):  # __main__: this module, run by -m
            try:
                state[f] = os.stat(f).st_mtime_ns
            except OSError:
                state[f] = -1
    import site

    for d in site.getsitepackages():
        try:
            state[d] = os.stat(d).st_mtime_ns
        except OSError:
            pass
    return state


def _changed(state: dict[str, int]) -> str | None:
    for f, mtime in state.items():
        try:
            now = os.stat(f).st_mtime_ns
        except OSError:
            now = -1
        if now != mtime:
            return f
    return None


def serve(path: Path | None = None) -> None:
    """Preload, then fork a child per command until SIGTERM (``cnncodes server stop``)."""
    from cnncodes.server import recorded

    path = Path(path or socket_path())
    started = dict(os.environ)
    # Prefect reads its API's address once, when imported: the recorded server's, for every child
    api = os.environ.get("PREFECT_API_URL") or (recorded() or {}).get("api_url")
    if api:
        os.environ["PREFECT_API_URL"] = api
    _preload()
    if not internals.can_end_early():
        raise SystemExit("this Python or Prefect lacks what the warm runner needs to end a command as the program "
                         "does (tasks/internals.py): not started; commands run in their own process.")
    frameworks = any(m in sys.modules for m in ("tensorflow", "keras", "jax", "torch"))
    started_env = import_time_env(started, frameworks)
    state = _code_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.stat().st_uid != os.getuid():
        raise SystemExit(f"{path.parent} belongs to another user: the runner will not listen there. Set "
                         "CNNCODES_HOME to a folder of your own.")
    os.chmod(path.parent, 0o700)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system
    stop = threading.Event()

    def on_term(_signum, _frame):
        stop.set()
        listener.close()
    signal.signal(signal.SIGTERM, on_term)
    if threading.active_count() > 1:  # a fork copies only this thread: the others' locks could stay taken
        print(f"warning: {threading.active_count() - 1} threads started while preloading", flush=True)
    print(f"cnncodes runner {os.getpid()} ready on {path}", flush=True)
    restart = None
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except OSError:
            break
        try:
            restart = _take(conn, listener, started_env, frameworks, state, api)
        except Exception as exc:  # noqa: BLE001  one bad request must not stop the runner
            print(f"request failed: {exc!r}", flush=True)
        finally:
            conn.close()
        if restart:
            break
    try:
        listener.close()
        path.unlink()
    except OSError:
        pass
    if restart:
        print(f"restarting: {restart} changed", flush=True)
        # the environment it was started with (not the API address it set for its own imports)
        os.execve(sys.executable, [sys.executable, "-m", "cnncodes.runner", "--socket", str(path)], started)


def _take(conn: socket.socket, listener: socket.socket, started_env: dict[str, str], frameworks: bool,
          state: dict[str, int], api: str | None) -> str | None:
    """Answer one command: refuse it (returns the changed file when the runner must restart), or fork
    the child that runs it."""
    conn.settimeout(10)
    request, fds = recv_message(conn, with_fds=3)
    try:
        uid = os.getuid()  # where the system cannot say, the socket's folder (only its owner may enter) must do
        if hasattr(socket, "SO_PEERCRED"):
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
        if uid != os.getuid():
            send_message(conn, {"run": False, "why": "the runner belongs to another user"})
            return None
        changed = _changed(state)
        if changed:
            send_message(conn, {"run": False, "why": f"{changed} changed since the runner started; it restarts"})
            return changed
        env = request["env"]
        theirs = import_time_env(env, frameworks)
        if theirs != started_env:
            diff = sorted(k for k in set(theirs) | set(started_env) if theirs.get(k) != started_env.get(k))
            send_message(conn, {"run": False,
                                "why": "environment differs from the runner's: " + ", ".join(diff[:8])})
            return None
        from cnncodes.server import healthy, recorded

        now = env.get("PREFECT_API_URL") or (recorded() or {}).get("api_url")
        if now != api or (api and not healthy(api, timeout=0.5)):
            send_message(conn, {"run": False, "why": f"the Prefect API the runner was started for ({api}) is not "
                                                     f"the one to use now ({now}) or does not answer"})
            return None
        if len(fds) != 3:
            send_message(conn, {"run": False, "why": "stdin, stdout and stderr were not passed"})
            return None
        pid = os.fork()
        if pid == 0:  # the child: never returns
            listener.close()
            _child(conn, request, fds)
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _child(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses are waited for as usual
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        fds.clear()
        # sys.stdout and sys.stderr (and the logging handlers that hold them) write to fds 1 and 2, now
        # the caller's: only their buffering is set again, as Python sets it for a terminal or a file
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        sys.stderr.reconfigure(line_buffering=True)
        if os.isatty(2):
            _logging_for_this_terminal()
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        sys.argv = ["cnncodes", *request["argv"]]
        conn.settimeout(None)
        send_message(conn, {"run": True, "pid": os.getpid()})
        _stop_with_caller(conn)
        from cnncodes import cli

        cli.apply_env_defaults()
        code = cli.run_program(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # Ctrl-C before the command's own handling began
        sys.stderr.write("interrupted: every committed batch is kept; run the same command again to resume.\n")
        code = 130
    except BaseException:  # noqa: BLE001  a traceback, as the program would print it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            # done: the caller, once it has the status, closes the socket, which the watcher must not
            # take for a caller killed mid-command
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.stdout.flush()
            sys.stderr.flush()
            send_message(conn, {"exit": code})
        except Exception:  # noqa: BLE001  the caller is gone
            pass
        os._exit(code)


def _logging_for_this_terminal() -> None:
    """Prefect's console handler decided at the runner's start, on its log file, that stderr has no
    colours; set its logging up again now that stderr is the caller's terminal (colours, as in a command
    run alone; about 0.1 s, so only for a terminal)."""
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)


def _stop_with_caller(conn: socket.socket) -> None:
    """Interrupt the command when its caller goes away (killed, even by SIGKILL): its socket closes."""
    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGINT)  # the command stops as on Ctrl-C: committed work is kept
        time.sleep(30)
        os._exit(130)
    threading.Thread(target=watch, name="cnncodes-runner-caller", daemon=True).start()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the cnncodes warm runner (started by `cnncodes server start`)")
    ap.add_argument("--socket", type=Path, default=None)
    serve(ap.parse_args().socket)
