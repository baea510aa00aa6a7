"""Scale out: sharded extraction on a Dask cluster, and a Prefect server on PostgreSQL."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, TINY_LAST
from storage import FeatureStore, open_store
from tasks.backbones import BackboneSpec
from tasks.extract import ExtractOptions
from tasks.settings import Output, ScaleOut
from tasks.data.synthetic import make_image

pytestmark = pytest.mark.slow
TINY_FLOW = BackboneSpec(name="mobilenet_v2", weights="none", input_size=96, backbone_args={"alpha": 0.35})
TWO_WORKERS = ScaleOut(shards=2, workers=2)


def _cut(store):
    return ExtractOptions(layers=[TINY_LAST], store=str(store))


def _by_path(codes):
    order = np.argsort(codes.paths.astype(str))
    return codes.paths.astype(str)[order], codes.features[order], codes.labels[order]


def test_two_dask_workers_give_the_single_process_features_and_stay_incremental(tmp_path, texture_data):
    from prefect.testing.utilities import prefect_test_harness

    from flows.extract_features import extract_features

    with prefect_test_harness(server_startup_timeout=90):
        single = extract_features(str(texture_data), TINY_FLOW, _cut(tmp_path / "single.h5"),
                                  output=Output(out=str(tmp_path / "o1")))
        sharded = extract_features(str(texture_data), TINY_FLOW, _cut(tmp_path / "sharded.h5"),
                                   output=Output(out=str(tmp_path / "o2")), scale=TWO_WORKERS)
        assert sharded.computed == single.computed == 36
        per_shard = {p["shard"]: p["computed"] for p in sharded.per_shard}
        assert set(per_shard) == {0, 1} and all(n > 0 for n in per_shard.values())  # both workers worked
        a, b = FeatureStore(tmp_path / "single.h5"), open_store(tmp_path / "sharded.h5")
        assert type(b).__name__ == "ShardedStore" and len(b.shards) == 2
        pa, fa, la = _by_path(a.read(TINY_LAST, "avg"))
        pb, fb, lb = _by_path(b.read(TINY_LAST, "avg"))
        assert (pa == pb).all() and (la == lb).all()
        scale = float(np.abs(fa).max())
        np.testing.assert_allclose(fb, fa, rtol=1e-4, atol=1e-5 * scale)

        classes = sorted(p.name for p in texture_data.iterdir())
        for i in range(7):
            make_image("stripes", (50, 50), 900 + i).save(texture_data / classes[i % 3] / f"more_{i}.jpg")
        grown = extract_features(str(texture_data), TINY_FLOW, _cut(tmp_path / "sharded.h5"),
                                 output=Output(out=str(tmp_path / "o2")), scale=TWO_WORKERS)
        assert grown.computed == 7 and grown.reused == 36       # only the new images, across both shards
        assert len(open_store(tmp_path / "sharded.h5").read(TINY_LAST, "avg")) == 43
        again = extract_features(str(texture_data), TINY_FLOW, _cut(tmp_path / "sharded.h5"),
                                 output=Output(out=str(tmp_path / "o2")), scale=TWO_WORKERS)
        assert again.up_to_date and again.computed == 0
    from storage.tools import list_store
    from storage.verify import verify_store

    assert list_store(tmp_path / "sharded.h5")["groups"][0]["rows"] == 43
    v = verify_store(tmp_path / "sharded.h5", check_files=True)
    assert v["ok"] and len(v["shards"]) == 2 and v["files_checked"] == 43


def _postgres_binaries():
    import shutil

    found = {b: shutil.which(b) for b in ("initdb", "pg_ctl", "postgres")}
    if not all(found.values()):
        import glob

        for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
            found = {b: f"{d}/{b}" for b in ("initdb", "pg_ctl", "postgres")}
            if all(os.path.exists(p) for p in found.values()):
                break
    return found if all(found.values()) and all(os.path.exists(p) for p in found.values()) else None


import os  # noqa: E402
from pathlib import Path  # noqa: E402


def test_a_prefect_server_on_postgresql_completes_a_deployment_run(tmp_path):
    """PostgreSQL in a temporary folder (skipped where its binaries are absent or we cannot switch user),
    a Prefect server on it, a deployment run through a process worker."""
    import json
    import pwd
    import subprocess

    from test_deployments import PREFECT, _free_port, _prefect, _stop, start_server
    from test_linear import make_store

    bins = _postgres_binaries()
    if bins is None or os.geteuid() != 0:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed, or not root to run them as 'postgres'")
    try:
        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' system user to run the database server as")
    import shutil
    import tempfile

    psql = shutil.which("psql") or bins["pg_ctl"].replace("pg_ctl", "psql")
    # pytest's own temporary folders are private to root: the database lives in one 'postgres' can enter
    pg_root = Path(tempfile.mkdtemp(prefix="cnncodes-pg-"))
    os.chmod(pg_root, 0o755)
    pgdata, port = pg_root / "data", _free_port()
    pgdata.mkdir()
    os.chown(pgdata, pg_user.pw_uid, pg_user.pw_gid)

    def as_pg(*cmd):
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=120)

    r = as_pg(bins["initdb"], "-D", str(pgdata), "-A", "trust", "-U", "prefect")
    assert r.returncode == 0, r.stderr
    r = as_pg(bins["pg_ctl"], "-D", str(pgdata), "-l", str(pgdata / "log"), "-w", "-o",
              f"-p {port} -k {pgdata} -c listen_addresses=127.0.0.1", "start")
    assert r.returncode == 0, r.stderr + (pgdata / "log").read_text()
    stop_server = None
    worker = None
    try:
        r = as_pg(psql, "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "postgres",
                  "-c", "CREATE DATABASE prefect")
        assert r.returncode == 0, r.stderr
        url = f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
        env, _, stop_server = start_server(tmp_path, {"PREFECT_SERVER_DATABASE_CONNECTION_URL": url})
        _prefect(env, "work-pool", "create", "cnncodes-cpu", "--type", "process")
        _prefect(env, "work-pool", "create", "cnncodes-gpu", "--type", "process")
        _prefect(env, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "train-linear", "--no-prompt")
        store = make_store(tmp_path / "s.h5")
        log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cnncodes-cpu"], env=env, cwd=tmp_path,
                                  stdout=log, stderr=subprocess.STDOUT)
        params = {"store": str(store), "layer": "signal", "model_name": "pg",
                  "output": {"registry": str(tmp_path / "reg"), "out": str(tmp_path / "out")}}
        run = _prefect(env, "deployment", "run", "train-linear/train-linear", "--params", json.dumps(params),
                       "--watch", "--watch-timeout", "300", timeout=360, check=False)
        assert run.returncode == 0, run.stdout[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        from storage import ModelRegistry

        assert ModelRegistry(tmp_path / "reg").versions("pg") == [1]
        r = as_pg(psql, "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "prefect", "-tAc",
                  "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
        assert r.returncode == 0 and int(r.stdout.strip()) >= 1  # the run's state lives in PostgreSQL
    finally:
        if worker is not None:
            _stop(worker)
        if stop_server is not None:
            stop_server()
        as_pg(bins["pg_ctl"], "-D", str(pgdata), "-m", "fast", "stop")
        shutil.rmtree(pg_root, ignore_errors=True)


def test_a_remote_dask_cluster_reached_by_its_address_extracts_the_shards(tmp_path, texture_data):
    """A scheduler and two workers started as their own processes (as on other machines), reached through
    ``dask_address``: both workers extract a shard, and the store reads as the whole dataset."""
    import os
    import subprocess
    import sys
    import time

    from prefect.testing.utilities import prefect_test_harness

    from flows.extract_features import extract_features
    from test_deployments import _free_port, _stop

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = open(tmp_path / "dask.log", "w")
    procs = [subprocess.Popen([*dask, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], cwd=tmp_path, env=env, stdout=log, stderr=log)]
    try:
        for i in range(2):
            procs.append(subprocess.Popen([*dask, "distributed.cli.dask_worker", address, "--nthreads", "1",
                                           "--nworkers", "1", "--dashboard-address", ":0", "--name", f"w{i}"],
                                          cwd=tmp_path, env=env, stdout=log, stderr=log))
        from distributed import Client

        def tasks_run(dask_scheduler):  # the seconds this cluster's workers computed, by kind of task
            return {name: prefix.all_durations.get("compute", 0.0)
                    for name, prefix in dask_scheduler.task_prefixes.items()}

        with Client(address, timeout=60) as client:  # both workers have joined
            deadline = time.monotonic() + 120
            while len(client.scheduler_info()["workers"]) < 2:
                assert time.monotonic() < deadline, (tmp_path / "dask.log").read_text()[-3000:]
                time.sleep(0.5)
            assert not client.run_on_scheduler(tasks_run)
        with prefect_test_harness(server_startup_timeout=90):  # no client of ours open: the flow finds the cluster
            result = extract_features(str(texture_data), TINY_FLOW, _cut(tmp_path / "remote.h5"),
                                      output=Output(out=str(tmp_path / "o")),
                                      scale=ScaleOut(shards=2, dask_address=address))
        with Client(address, timeout=60) as client:
            ran = client.run_on_scheduler(tasks_run)
        assert ran.get("extract_codes_shard", 0) > 0, ran  # the shards ran on this cluster, not on a local one
        assert result.computed == 36
        per_shard = {p["shard"]: p["computed"] for p in result.per_shard}
        assert set(per_shard) == {0, 1} and all(n > 0 for n in per_shard.values())
        codes = open_store(tmp_path / "remote.h5").read(TINY_LAST, "avg")
        assert len(codes) == 36 and len(set(codes.paths.astype(str))) == 36
    finally:
        for p in reversed(procs):
            _stop(p)
        log.close()
