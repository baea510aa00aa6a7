"""The extract-features flow under Prefect (embedded test server) and the CLI around it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_EARLY, TINY_LAST
from storage import FeatureStore, ParameterError
from tasks.backbones import BackboneSpec
from tasks.extract import ExtractOptions
from tasks.probe.linear import LinearConfig
from tasks.settings import Output, SplitConfig

TINY_FLOW = BackboneSpec(name="mobilenet_v2", weights="none", input_size=96, backbone_args={"alpha": 0.35})


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.slow
def test_extract_flow_end_to_end_with_report_and_artifacts(prefect_harness, tmp_path, texture_data):
    from prefect.client.orchestration import get_client

    from flows.extract_features import extract_features

    (texture_data / sorted(os.listdir(texture_data))[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    s = extract_features(str(texture_data), TINY_FLOW,
                         ExtractOptions(layers=[TINY_LAST, TINY_EARLY], pooling=["avg", "max"]),
                         output=Output(out=str(out)))
    assert s.computed == 36 and len(s.skipped) == 1
    store = Path(s.store)
    assert store.parent == (out / "stores").resolve() and store.name == "data__mobilenet_v2-alpha0.35__none.h5"
    assert {g["group"] for g in FeatureStore(store).groups()} == {f"{TINY_LAST}/avg", f"{TINY_EARLY}/max"}
    report = Path(s.report).read_text()
    assert "broken.jpg" in report and "| 37 | 36 | 0 | 0 | 1 |" in report
    assert json.loads(Path(s.report).with_suffix(".json").read_text())["computed"] == 36
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"extract-report", "extract-counts", "extract-skipped", "extract-codes"} <= keys

    again = extract_features(str(texture_data), TINY_FLOW,
                             ExtractOptions(layers=[TINY_LAST, TINY_EARLY], pooling=["avg", "max"]),
                             output=Output(out=str(out)))
    assert again.up_to_date and again.computed == 0 and len(again.skipped) == 1


def test_extract_flow_validates_parameters_before_any_work(prefect_harness, tmp_path, texture_data):
    from flows.extract_features import extract_features

    with pytest.raises(ParameterError, match="batch_size must be an integer"):
        extract_features(str(texture_data), TINY_FLOW, ExtractOptions(layers=[TINY_LAST], batch_size=0),
                         output=Output(out=str(tmp_path)))
    with pytest.raises(ParameterError, match="val_fraction"):
        extract_features(str(texture_data), TINY_FLOW, ExtractOptions(layers=[TINY_LAST]),
                         SplitConfig(val_fraction=1.5), Output(out=str(tmp_path)))
    assert not (tmp_path / "stores").exists()


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, CNNCODES_PROGRESS="0")
    return subprocess.run([sys.executable, "-m", "cnncodes.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


TINY_ARGS = ["--backbone", "mobilenet_v2", "--backbone-arg", "alpha=0.35", "--input-size", "96", "--weights", "none"]


@pytest.mark.slow
def test_cli_extract_json_is_one_object_on_stdout(tmp_path, texture_data):
    store = tmp_path / "codes.h5"
    out = _cli("extract", str(texture_data), *TINY_ARGS, "--layer", TINY_LAST, "--layer", f"{TINY_EARLY}:max",
               "--store", str(store), "--out", str(tmp_path / "out"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)  # nothing but the JSON object on stdout
    assert res["computed"] == 36 and res["store"] == str(store.resolve())
    assert [g["group"] for g in res["groups"]] == [f"{TINY_LAST}/avg", f"{TINY_EARLY}/max"]
    assert Path(res["report"]).exists() and res["timings"]["total"] > 0


@pytest.mark.slow
def test_cli_errors_are_messages_not_tracebacks(tmp_path, texture_data):
    out = _cli("extract", str(texture_data), *TINY_ARGS, "--layer", "out_rel", "--out", str(tmp_path), "--json")
    assert out.returncode == 2
    assert "unknown layer 'out_rel'" in out.stderr and "Did you mean 'out_relu'" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["type"] == "BackboneError"
    out = _cli("extract", str(tmp_path / "nope"), *TINY_ARGS, "--layer", TINY_LAST, "--out", str(tmp_path))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert "Traceback (most recent call last)" not in out.stderr.split("error:")[-1]


def test_cli_listings():
    out = _cli("backbones", "--json")
    names = {b["name"] for b in json.loads(out.stdout)["backbones"]}
    assert {"resnet50", "mobilenet", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vgg19"} <= names
    out = _cli("layers", "mobilenet_v2", "--backbone-arg", "alpha=0.35", "--input-size", "96", "--json")
    layers = json.loads(out.stdout)["layers"]
    assert layers[-1]["name"] == TINY_LAST and layers[-1]["stride"] == 32


@pytest.mark.slow
def test_cli_train_linear_sweep_and_json(tmp_path):
    from test_linear import assert_matches_reference, make_store

    store = make_store(tmp_path / "s.h5", hard=True)
    out = _cli("train-linear", str(store), "--layer", "signal", "--classifier", "svm", "--out", str(tmp_path / "o"),
               "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["model"] == "s-signal-svm" and res["version"] == 1 and res["metrics"]["val"]["images"] == 30
    # scikit-learn's calibrated scaler + LinearSVC at the C the CLI chose: the same accuracy within one image
    assert_matches_reference(res["metrics"]["val"]["accuracy"], store, "signal", "val", "svm", res["C"], 30)
    assert Path(res["report"]).exists() and Path(res["registry"]) == (tmp_path / "o" / "registry").resolve()
    out = _cli("sweep", str(store), "--cv-folds", "3", "--out", str(tmp_path / "o"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["best"]["layer"] == "signal"
    out = _cli("train-linear", str(store), "--layer", "signal", "--C", "-2", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "C must be a positive number" in out.stderr


def test_train_linear_flow_publishes_report_metrics_and_confusion(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.train_linear import train_linear
    from test_linear import assert_matches_reference, make_store

    store = make_store(tmp_path / "s.h5", hard=True)
    r = train_linear(str(store), "signal", linear=LinearConfig(classifier="softmax", C=0.1),
                     output=Output(out=str(tmp_path / "o"), registry=str(tmp_path / "o" / "registry")))
    assert r.model == "s-signal-softmax" and r.C == 0.1 and r.metrics["test"]["images"] == 30
    # scikit-learn's scaler + logistic regression at C 0.1: the same test accuracy within one image
    assert_matches_reference(r.metrics["test"]["accuracy"], store, "signal", "test", "softmax", 0.1, 30)
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts()}
    assert {"probe-report", "probe-metrics", "probe-confusion-val", "probe-confusion-test"} <= set(arts)
    assert "Per class (val)" in arts["probe-report"].data
