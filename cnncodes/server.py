"""The Prefect API the commands talk to: a long-lived local server, or a temporary one started early.

* ``cnncodes server start`` runs ``prefect server start`` in the background (host 127.0.0.1, port
  4200 unless told otherwise) and records its URL in ``$CNNCODES_HOME/server.json`` (default
  ``~/.cnncodes``). Every later ``cnncodes`` command finds it there and uses it: no server to start,
  and every run shows in its UI. ``stop`` and ``status`` do what they say.
* Without one (and without ``PREFECT_API_URL``), a flow command starts Prefect's temporary server
  itself, as a separate process, the moment the command begins, so that it comes up on the other
  core while TensorFlow imports instead of after (:class:`Warmup`).

Only the standard library is imported here at module level: ``cnncodes --help`` stays fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cnncodes import handoff
from tasks import internals
from cnncodes.handoff import home  # where the server's record lives (re-exported)

DEFAULT_PORT = 4200


class ServerError(RuntimeError):
    """The local Prefect server cannot be started (or a temporary one did not come up); the message
    says why and what to do."""


def state_file() -> Path:
    return home() / "server.json"


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    """Whether the Prefect API at ``api_url`` (ending in /api) answers its health check."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def recorded() -> dict[str, Any] | None:
    try:
        data = json.loads(state_file().read_text())
        return data if isinstance(data, dict) and isinstance(data.get("api_url"), str) else None
    except (OSError, ValueError):
        return None


def _prefect(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, **kwargs)


def _clear_stale_pid_file() -> bool:
    """Remove Prefect's record of a background server (``$PREFECT_HOME/server.pid``) whose process is gone
    (killed, or the machine restarted), which makes ``prefect server start --background`` refuse to
    start; True when it was removed. A record of a live process is left alone."""
    pid_file = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect") / "server.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    if _alive(pid):  # alive (also another user's): not ours to judge
        return False
    pid_file.unlink(missing_ok=True)
    return True


def start(port: int = DEFAULT_PORT, timeout: float = 60.0) -> dict[str, Any]:
    """Start (or find) the long-lived local server; returns ``{"api_url", "ui_url", "started"}``."""
    api = f"http://127.0.0.1:{port}/api"
    if healthy(api):
        info = {"api_url": api, "ui_url": f"http://127.0.0.1:{port}", "started": False}
    else:
        env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        proc = _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port), "--background", env=env,
                        timeout=timeout)
        if "already running" in (proc.stdout + proc.stderr) and _clear_stale_pid_file():
            proc = _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port), "--background",
                            env=env, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not healthy(api) and time.monotonic() < deadline:
            time.sleep(0.25)
        if not healthy(api):
            raise ServerError(f"the Prefect server did not come up on port {port} within {timeout:g} s "
                               f"(prefect said: {(proc.stdout + proc.stderr).strip()[-400:] or 'nothing'}). "
                               "Is the port taken? Try `cnncodes server start --port 4300`.")
        info = {"api_url": api, "ui_url": f"http://127.0.0.1:{port}", "started": True}
    runner_pid = (recorded() or {}).get("runner_pid")  # a runner of this server may run on
    _record({"api_url": info["api_url"], "ui_url": info["ui_url"],
             **({"runner_pid": runner_pid} if runner_pid else {})})
    try:
        info["runner"] = start_runner()
    except ServerError as exc:  # the server is up: commands work, each in its own process
        info["runner"] = {**runner_status(), "error": str(exc)}
    return info


def _record(data: dict[str, Any]) -> None:
    from storage.files import atomic_write_json  # here: `cnncodes --help` imports only the standard library

    atomic_write_json(state_file(), data)


def _alive(pid: Any) -> bool:
    """Whether a process ``pid`` exists (another user's counts)."""
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True


def runner_status() -> dict[str, Any]:
    """The warm runner (:mod:`cnncodes.runner`): its pid, socket and whether it is up."""
    pid = (recorded() or {}).get("runner_pid")
    path = handoff.socket_path()
    return {"pid": pid, "socket": str(path), "running": bool(pid and _alive(pid) and path.exists()),
            "supported": handoff.supported()}


def start_runner(timeout: float = 60.0) -> dict[str, Any]:
    """Start the warm runner beside the recorded server (unless one runs, or this platform has no fork);
    waits until it is ready, so that the next command finds it. Its log: ``$CNNCODES_HOME/runner.log``."""
    st = runner_status()
    if st["running"] or not st["supported"] or handoff.turned_off():
        return st
    log = open(home() / "runner.log", "ab")  # noqa: SIM115  the runner's own, kept open by it
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cnncodes.runner"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=str(home()))
    finally:
        log.close()
    rec = recorded() or {}
    _record({**rec, "runner_pid": proc.pid})
    path = handoff.socket_path()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return runner_status()
        time.sleep(0.1)
    said = (home() / "runner.log").read_text(errors="replace")[-600:]
    why = f"exited with status {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:g} s"
    raise ServerError(f"the warm runner did not start ({why}): "
                      f"{said.strip() or 'its log is empty'}. Commands still run, each in its own process; "
                      "see $CNNCODES_HOME/runner.log, or set CNNCODES_RUNNER=0 to start the server without it.")


def stop_runner() -> bool:
    """Stop the warm runner (SIGTERM; a command it is running goes on to its end)."""
    import signal

    pid = (recorded() or {}).get("runner_pid")
    if not pid or not _alive(pid):
        return False
    try:
        os.kill(int(pid), signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        try:  # it is our child when this process started it (tests): reap it
            os.waitpid(int(pid), os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return True


def stop() -> dict[str, Any]:
    """Stop the server ``start`` started and forget it."""
    rec = recorded()
    stop_runner()
    proc = _prefect("server", "stop", timeout=60)
    try:
        state_file().unlink()
    except FileNotFoundError:
        pass
    return {"stopped": rec is not None or proc.returncode == 0, "api_url": (rec or {}).get("api_url"),
            "message": (proc.stdout + proc.stderr).strip()[-400:]}


def status() -> dict[str, Any]:
    env_url = os.environ.get("PREFECT_API_URL")
    rec = recorded()
    url = env_url or (rec or {}).get("api_url")
    return {"api_url": url, "source": "PREFECT_API_URL" if env_url else "cnncodes server" if rec else None,
            "running": bool(url and healthy(url)), "ui_url": (rec or {}).get("ui_url"), "runner": runner_status()}


def _dies_with_parent():
    """On Linux, a function for ``Popen(preexec_fn=...)`` that has the child sent SIGTERM when this process
    dies, however it dies (a killed command leaves no temporary server behind); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    term = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(1, term)  # PR_SET_PDEATHSIG

    return preexec


class Warmup:
    """The Prefect API for this command, made ready while the caller does other work (imports).

    ``PREFECT_API_URL`` set: nothing to do. A running ``cnncodes server``: its URL is exported for
    this process. Otherwise the same temporary server Prefect would start (uvicorn serving Prefect's
    API app, without its UI, on the local database) is started at once as a separate process, and its
    URL exported: it imports and migrates on the other core while this process imports TensorFlow and
    the flow, and this process never imports Prefect's server code (seconds of work it would otherwise
    do itself, under the GIL). :meth:`wait` waits for its health check before the first flow run;
    :meth:`close` tells it to stop without waiting for it."""

    def __init__(self) -> None:
        self.mode = "env"
        self.owned = False  # whether this command started the temporary server (and so stops it)
        self.api_url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log: Any = None
        if os.environ.get("PREFECT_API_URL"):
            return
        rec = recorded()
        if rec and healthy(rec["api_url"], timeout=0.3):
            os.environ["PREFECT_API_URL"] = rec["api_url"]
            self.mode = "server"
            return
        self.mode = "temporary"
        self._start_temporary()

    def _start_temporary(self) -> None:
        import atexit
        import importlib.util
        import socket
        import tempfile

        spec = importlib.util.find_spec("prefect")  # where Prefect is, without importing it
        if spec is None or not spec.submodule_search_locations:
            return  # no Prefect: the flow's import says so
        with socket.socket() as sock:  # a free port, as the OS hands them out
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, PREFECT_UI_ENABLED="0", **internals.TEMPORARY_SERVER_ENV)
        self._log = tempfile.TemporaryFile()
        app_dir = Path(list(spec.submodule_search_locations)[0]).parent
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            preexec_fn=_dies_with_parent())
        self.api_url = f"http://127.0.0.1:{port}/api"
        os.environ["PREFECT_API_URL"] = self.api_url
        self.owned = True
        atexit.register(self.close)

    def wait(self, timeout: float | None = None) -> None:
        """Return once the temporary server answers; ServerError saying why when it cannot."""
        if self._proc is None or self.api_url is None:
            return
        limit = float(timeout or os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 90)
        deadline = time.monotonic() + limit
        while not healthy(self.api_url, timeout=1.0):
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                said = ""
                if self._log is not None:
                    self._log.seek(0)
                    said = self._log.read().decode("utf-8", "replace").strip()[-600:]
                self.close()
                why = f"exited with status {code}" if code is not None else f"did not answer within {limit:g} s"
                raise ServerError(f"the temporary Prefect server this command started {why}"
                                   f"{': ' + said if said else ''}. Start a lasting one with `cnncodes server "
                                   "start` (its log says what is wrong), or set PREFECT_API_URL to a running one.")
            time.sleep(0.05)

    def close(self) -> None:
        """Tell the temporary server to stop (without waiting for it); nothing for other modes."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.owned and os.environ.get("PREFECT_API_URL") == self.api_url:
            os.environ.pop("PREFECT_API_URL", None)
        self.owned = False

