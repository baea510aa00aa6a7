"""Deployments for real: a Prefect server on a free loopback port, process workers, `prefect deploy`,
`prefect deployment run`, and the outputs on disk. Everything started here is stopped here."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENTS = {"transfer/transfer", "extract-features/extract", "train-linear/train-linear", "sweep/sweep",
               "fine-tune/fine-tune", "predict/predict", "retrain/retrain", "export/export"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, first=signal.SIGINT) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(first)
    try:  # the test is over: a few seconds for a clean exit, then no more waiting
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def start_server(tmp_path, extra_env: dict | None = None):
    """A Prefect server on a free loopback port; returns (env for clients, process, stop function)."""
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2", CNNCODES_ROOT=str(ROOT), CNNCODES_PROGRESS="0",
               **(extra_env or {}))
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Prefect server did not become healthy in 90 s"
            time.sleep(0.5)
    except BaseException:
        _stop(proc, signal.SIGTERM)
        log.close()
        raise

    def stop():
        _stop(proc, signal.SIGTERM)
        log.close()

    return env, proc, stop


@pytest.fixture
def server(tmp_path):
    env, _, stop = start_server(tmp_path)
    workers: list[subprocess.Popen] = []
    try:
        yield env, workers
    finally:
        for w in workers:  # workers before the server: a worker whose server is gone ignores SIGTERM
            _stop(w)
        stop()


def _prefect(env, *args, timeout=300, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_deploy_run_and_schedule_on_a_real_server(server, tmp_path, texture_data):
    env, workers = server
    for pool in ("cnncodes-cpu", "cnncodes-gpu"):
        _prefect(env, "work-pool", "create", pool, "--type", "process")
    _prefect(env, "concurrency-limit", "create", "gpu", "1")
    _prefect(env, "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", "--no-prompt")

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            names = set()
            for d in client.read_deployments():
                flow = client.read_flow(d.flow_id)
                names.add(f"{flow.name}/{d.name}")
            retrain = client.read_deployment_by_name("retrain/retrain")
            schema = client.read_deployment_by_name("transfer/transfer").parameter_openapi_schema
    assert DEPLOYMENTS <= names
    # The run form in the UI: grouped, described, validated settings
    assert set(schema["properties"]) == {"data", "backbone", "thresholds", "probe", "finetune", "split",
                                         "model_name", "output"}
    defs = schema.get("definitions") or schema.get("$defs")

    def group(name):
        prop = schema["properties"][name]
        ref = prop.get("$ref") or next(p["$ref"] for p in prop.get("allOf", prop.get("anyOf", [])) if "$ref" in p)
        return defs[ref.rsplit("/", 1)[-1]]

    precision = group("backbone")["properties"]["precision"]
    assert precision["enum"] == ["float32", "float16", "bfloat16", "auto"] and "compute precision" in \
        precision["description"]
    assert "fine-tuning epochs" in group("finetune")["properties"]["epochs"]["description"]
    assert group("thresholds")["properties"]["large_per_class"]["minimum"] == 1
    crons = [s.schedule.cron for s in retrain.schedules]
    assert crons == ["0 3 * * *"] and retrain.schedules[0].active
    assert retrain.work_pool_name == "cnncodes-cpu"

    log = open(tmp_path / "worker.log", "w")
    workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "cnncodes-gpu"], env=env, cwd=tmp_path,
                                    stdout=log, stderr=subprocess.STDOUT))
    out = tmp_path / "out"
    params = {"data": str(texture_data), "backbone": {"name": "mobilenet_v2", "weights": "none", "input_size": 96,
                                                      "backbone_args": {"alpha": 0.35}},
              "output": {"out": str(out), "registry": str(out / "registry")}, "model_name": "deployed"}
    run = _prefect(env, "deployment", "run", "transfer/transfer", "--params", json.dumps(params), "--watch",
                   "--watch-timeout", "400", timeout=480, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]
    assert "Completed" in run.stdout + run.stderr
    stores = list((out / "stores").glob("*.h5"))
    assert len(stores) == 1
    from storage import FeatureStore, ModelRegistry

    assert len(FeatureStore(stores[0]).groups()) == 3
    reg = ModelRegistry(out / "registry")
    assert reg.names() == ["deployed-probe"] and reg.aliases("deployed-probe")["champion"] == 1
    assert (out / "reports" / "deployed.transfer.md").exists()

    # The nightly retrain, fired by hand on its deployment, by a worker of its pool: its result is in the registry
    workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "cnncodes-cpu"], env=env, cwd=tmp_path,
                                    stdout=log, stderr=subprocess.STDOUT))
    params = {"data": str(texture_data), "model": "deployed-probe", "force": True,
              "output": {"out": str(out), "registry": str(out / "registry")}}
    run = _prefect(env, "deployment", "run", "retrain/retrain", "--params", json.dumps(params), "--watch",
                   "--watch-timeout", "400", timeout=480, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]
    assert "Completed" in run.stdout + run.stderr
    event = reg.history("deployed-probe")[-1]
    assert event["event"] == "retrain" and event["challenger"] == 2 and event["champion_before"] == 1, event
    assert reg.versions("deployed-probe") == [1, 2]
    assert reg.aliases("deployed-probe")["champion"] == event["champion_after"]
