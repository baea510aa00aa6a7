"""`cnncodes server`: a long-lived local Prefect server every command finds; otherwise the temporary
server starts in the background while the command imports."""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import ROOT
from cnncodes import server


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    httpd = HTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}/api"
    httpd.shutdown()


def test_the_server_record_is_replaced_whole(tmp_path, monkeypatch):
    """server.json is written with the project's one atomic write: a reader finds the old record or the new."""
    monkeypatch.setenv("CNNCODES_HOME", str(tmp_path / "home"))
    server._record({"api_url": "http://127.0.0.1:1/api", "ui_url": "x"})
    server._record({"api_url": "http://127.0.0.1:2/api", "ui_url": "y", "runner_pid": 7})
    assert server.recorded() == {"api_url": "http://127.0.0.1:2/api", "ui_url": "y", "runner_pid": 7}
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["server.json"]  # no temporary file left


def test_warmup_uses_a_recorded_running_server_and_ignores_a_dead_one(tmp_path, monkeypatch, fake_api):
    monkeypatch.setenv("CNNCODES_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "unset")   # so that teardown restores the variable's absence,
    monkeypatch.delenv("PREFECT_API_URL")            # whatever Warmup sets in between
    started = []
    monkeypatch.setattr(server.Warmup, "_start_temporary", lambda self: started.append(1))
    (tmp_path / "server.json").write_text(json.dumps({"api_url": fake_api, "ui_url": "x"}))
    w = server.Warmup()
    assert w.mode == "server" and os.environ["PREFECT_API_URL"] == fake_api and not started
    st = server.status()
    assert st.pop("runner")["running"] is False  # no runner was started here
    assert st == {"api_url": fake_api, "source": "PREFECT_API_URL", "running": True, "ui_url": "x"}

    monkeypatch.delenv("PREFECT_API_URL")
    with socket.socket() as s:               # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    (tmp_path / "server.json").write_text(json.dumps({"api_url": dead}))
    w = server.Warmup()
    w.wait()
    assert w.mode == "temporary" and started == [1] and "PREFECT_API_URL" not in os.environ
    assert server.status()["running"] is False

    monkeypatch.setenv("PREFECT_API_URL", dead)  # the user's own setting always wins
    assert server.Warmup().mode == "env" and started == [1]


def test_server_status_command_without_a_server(tmp_path):
    env = dict(os.environ, CNNCODES_HOME=str(tmp_path))
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "cnncodes.cli", "server", "status", "--json"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    st = json.loads(out.stdout)
    assert out.returncode == 0 and st.pop("runner")["running"] is False
    assert st == {"api_url": None, "source": None, "running": False, "ui_url": None}


@pytest.mark.slow
def test_a_started_server_runs_every_later_command(tmp_path):
    """`server start` once; a later command's flow run is recorded by that server; `server stop`."""
    from test_linear import make_store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CNNCODES_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               CNNCODES_PROGRESS="0")
    env.pop("PREFECT_API_URL", None)
    cli = [sys.executable, "-m", "cnncodes.cli"]
    (tmp_path / "prefect").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid no process has now: Prefect's
    dead.wait()                                               # record of a server killed earlier
    (tmp_path / "prefect" / "server.pid").write_text(str(dead.pid))
    try:
        started = subprocess.run(cli + ["server", "start", "--port", str(port), "--json"], capture_output=True,
                                 text=True, env=env, cwd=ROOT, timeout=120)
        assert started.returncode == 0, started.stderr
        info = json.loads(started.stdout)
        assert info["api_url"] == f"http://127.0.0.1:{port}/api"
        assert info["runner"]["running"] == server.runner_status()["supported"]  # the warm runner beside it
        store = make_store(tmp_path / "s.h5")
        # in the warm runner (where this platform has one: require would fail the command otherwise)
        run_env = dict(env, CNNCODES_RUNNER="require" if info["runner"]["running"] else "0")
        run = subprocess.run(cli + ["sweep", str(store), "--out", str(tmp_path / "out")], capture_output=True,
                             text=True, env=run_env, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"http://127.0.0.1:{port}/runs/flow-run/" in run.stderr   # the run is on that server
        assert "Starting temporary server" not in run.stderr
    finally:
        stopped = subprocess.run(cli + ["server", "stop", "--json"], capture_output=True, text=True, env=env,
                                 cwd=ROOT, timeout=120)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"]
    assert not server.healthy(f"http://127.0.0.1:{port}/api")
    if info["runner"]["running"]:  # stopped with the server
        assert not os.path.exists(f"/proc/{info['runner']['pid']}") and not os.path.exists(info["runner"]["socket"])


def test_a_temporary_server_that_does_not_come_up_is_a_clear_error_and_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCODES_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "unset")
    monkeypatch.delenv("PREFECT_API_URL")
    w = server.Warmup()
    assert w.mode == "temporary" and w.owned and os.environ["PREFECT_API_URL"] == w.api_url
    proc = w._proc
    with pytest.raises(server.ServerError, match="did not answer within 0.001 s.*cnncodes server start"):
        w.wait(timeout=0.001)
    assert proc.wait(timeout=30) is not None          # told to stop
    assert "PREFECT_API_URL" not in os.environ and not w.owned


@pytest.mark.slow
def test_without_a_server_a_command_starts_a_temporary_one_beside_it_and_stops_it(tmp_path):
    from test_linear import make_store

    env = dict(os.environ, CNNCODES_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               CNNCODES_PROGRESS="0")
    env.pop("PREFECT_API_URL", None)
    store = make_store(tmp_path / "s.h5")
    run = subprocess.run([sys.executable, "-m", "cnncodes.cli", "sweep", str(store), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Starting temporary server" not in run.stderr  # not Prefect's own: ours, started as the command began
    port = re.search(r"View at http://127\.0\.0\.1:(\d+)/runs/flow-run/", run.stderr).group(1)
    deadline = time.monotonic() + 20
    while server.healthy(f"http://127.0.0.1:{port}/api") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.healthy(f"http://127.0.0.1:{port}/api")  # gone with the command


def test_a_killed_command_leaves_no_temporary_server_behind(tmp_path):
    """The temporary server goes when the command's process dies, even by SIGKILL (no exit hooks)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    import signal

    env = dict(os.environ, CNNCODES_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    child = ("import sys, time; sys.path.insert(0, %r)\n"
             "from cnncodes.server import Warmup\n"
             "w = Warmup(); print(w._proc.pid, flush=True); time.sleep(600)\n") % str(ROOT)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=env)
    try:
        server_pid = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:  # gone, or a zombie waiting for whoever adopted it to reap it
                if open(f"/proc/{server_pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.2)
        else:
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail("the temporary server outlived its killed command")
    finally:
        if proc.poll() is None:
            proc.kill()
