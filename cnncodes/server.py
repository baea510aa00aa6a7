"""The Prefect API the commands talk to: a long-lived local server, or a temporary one started early.

* ``cnncodes server start`` runs ``prefect server start`` in the background (host 127.0.0.1, port
  4200 unless told otherwise) and records its URL in ``$CNNCODES_HOME/server.json`` (default
  ``~/.cnncodes``). Every later ``cnncodes`` command finds it there and uses it: no server to start,
  and every run shows in its UI. ``stop`` and ``status`` do what they say.
* Without one (and without ``PREFECT_API_URL``), a flow command starts Prefect's temporary server
  itself, in a background thread as the command begins, so that it comes up while TensorFlow
  imports instead of after.

Only the standard library is imported here at module level: ``cnncodes --help`` stays fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_PORT = 4200


def home() -> Path:
    return Path(os.environ.get("CNNCODES_HOME") or Path.home() / ".cnncodes")


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
        deadline = time.monotonic() + timeout
        while not healthy(api) and time.monotonic() < deadline:
            time.sleep(0.25)
        if not healthy(api):
            raise RuntimeError(f"the Prefect server did not come up on port {port} within {timeout:g} s "
                               f"(prefect said: {(proc.stdout + proc.stderr).strip()[-400:] or 'nothing'}). "
                               "Is the port taken? Try `cnncodes server start --port 4300`.")
        info = {"api_url": api, "ui_url": f"http://127.0.0.1:{port}", "started": True}
    state_file().parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps({"api_url": info["api_url"], "ui_url": info["ui_url"]}))
    os.replace(tmp, state_file())
    return info


def stop() -> dict[str, Any]:
    """Stop the server ``start`` started and forget it."""
    rec = recorded()
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
            "running": bool(url and healthy(url)), "ui_url": (rec or {}).get("ui_url")}


class Warmup:
    """The Prefect API for this command, made ready while the caller does other work (imports).

    ``PREFECT_API_URL`` set: nothing to do. A running ``cnncodes server``: its URL is exported for
    this process. Otherwise Prefect's temporary server starts in a background thread; :meth:`wait`
    joins it before the first flow run (Prefect's own start would otherwise find it half-started)."""

    def __init__(self) -> None:
        self.mode = "env"
        self.owned = False  # whether this command started the temporary server (and so stops it)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if os.environ.get("PREFECT_API_URL"):
            return
        rec = recorded()
        if rec and healthy(rec["api_url"], timeout=0.3):
            os.environ["PREFECT_API_URL"] = rec["api_url"]
            self.mode = "server"
            return
        self.mode = "temporary"
        self._thread = threading.Thread(target=self._start_temporary, name="prefect-api", daemon=True)
        self._thread.start()

    def _start_temporary(self) -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
            if not server.running:  # one that runs already (a test harness's) is not ours to stop
                server.start()
                self.owned = True
        except BaseException as exc:  # reported by wait(); Prefect then tries again itself
            self.error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.error is not None:  # leave no half-started server behind: Prefect starts its own
                from prefect.server.api.server import SubprocessASGIServer

                SubprocessASGIServer().stop()
