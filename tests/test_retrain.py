"""Scheduled retraining: no change, no training; growth extracts only new images; a worse or equal
challenger never replaces the champion; every decision is in the lineage's history."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.backbones import BackboneSpec
from tasks.extract import ExtractOptions
from tasks.finetune import FineTuneConfig
from tasks.settings import Output

from storage import FeatureStore, ModelRegistry
from tasks.probe.linear import LinearConfig
from tasks.probe import evaluate_probe, fit_probe
from tasks.decide.retrain import apply_promotion, decide_promotion
from tasks.data.synthetic import make_image
from conftest import ROOT
from test_linear import make_store


def test_promotion_rule(tmp_path):
    from test_transfer import _outcomes

    n = 200
    champ = {"test": _outcomes(tmp_path, "c", [i < 160 for i in range(n)])}
    clear = {"test": _outcomes(tmp_path, "b", [i < 190 for i in range(n)])}
    assert decide_promotion(champ, clear, 0.0)["promote"]
    assert not decide_promotion(champ, champ, 0.0)["promote"]                           # a tie keeps the champion
    assert not decide_promotion(champ, clear, 0.15)["promote"]                          # not *more* than the margin
    assert not decide_promotion(clear, champ, 0.0)["promote"]
    noisy = decide_promotion(champ, {"test": _outcomes(tmp_path, "n", [i < 163 for i in range(n)])}, 0.0)
    assert not noisy["promote"] and noisy["interval"][0] <= 0 < noisy["difference"] and "noise" in noisy["reason"]
    # images the lineage trained on are left out of the comparison
    trained = {f"{i:064x}" for i in range(160, 190)}
    d = decide_promotion(champ, clear, 0.0, exclude=trained)
    assert d["images"] == n - 30 and d["excluded"] == 30 and d["difference"] == 0 and not d["promote"]


def test_a_worse_challenger_never_replaces_the_champion(tmp_path):
    store = make_store(tmp_path / "s.h5")
    reg = tmp_path / "reg"
    # champion: codes that carry the signal; challenger: the same lineage trained on codes that do not
    fit_probe(store, "signal", "avg", LinearConfig(C=0.1, n_jobs=1), reg, name="m")
    fit_probe(store, "noise", "avg", LinearConfig(C=0.1, n_jobs=1), reg, name="m")
    champ = evaluate_probe(reg, "m", 1, store, report_dir=tmp_path)["metrics"]
    chall = evaluate_probe(reg, "m", 2, store, report_dir=tmp_path)["metrics"]
    d = decide_promotion(champ, chall, 0.0)
    assert not d["promote"] and chall["test"]["accuracy"] < champ["test"]["accuracy"]
    apply_promotion(reg, "m", 1, 2, d)
    r = ModelRegistry(reg)
    assert r.aliases("m")["champion"] == 1
    apply_promotion(reg, "m", 1, 2, decide_promotion(chall, champ, 0.0))  # the other way round: promoted
    assert r.aliases("m")["champion"] == 2
    events = r.history("m")
    assert [e["champion_after"] for e in events] == [1, 2] and all("reason" in e for e in events)


def _correct_on(registry, store, version, rows: dict[str, str]) -> dict[str, bool]:
    """Whether registered probe ``version`` is right on each of ``rows`` ({sha256: split}) of the store's
    current labels, computed here without the flow."""
    from tasks.reports.evaluate import scores_of

    model, rec = ModelRegistry(registry).load("tex", version)
    codes = FeatureStore(store).read(rec.metadata["layer"], rec.metadata["pooling"])
    keep = np.isin(codes.sha256, list(rows))
    pred = np.asarray(model.classes_)[scores_of(model, codes.features[keep]).argmax(1)]
    return dict(zip(codes.sha256[keep].tolist(), (pred == codes.labels[keep]).tolist()))


def _check_decision(registry, store, decision: dict, champion: int, challenger: int) -> bool:
    """Recompute both models' accuracies on the same test rows the flow judged on (the store's test
    rows minus what the lineage trained on) and check the flow's decision follows its rule."""
    pinned = ModelRegistry(registry).splits("tex")["samples"]
    test = {h: sp for h, sp in FeatureStore(store).row_splits("block_3_expand_relu", "avg").items()
            if sp == "test" and pinned.get(h, "test") == "test"}
    a, b = _correct_on(registry, store, champion, test), _correct_on(registry, store, challenger, test)
    acc_a, acc_b = np.mean(list(a.values())), np.mean(list(b.values()))
    assert decision["images"] == len(test) and decision["split"] == "test"
    assert decision["champion_accuracy"] == pytest.approx(acc_a)
    assert decision["challenger_accuracy"] == pytest.approx(acc_b)
    lo, hi = decision["interval"]
    assert lo <= acc_b - acc_a <= hi
    rule = bool(acc_b > acc_a + decision["margin"] and lo > min(decision["margin"], 0))
    assert decision["promote"] == rule
    return rule


def _swap(data, a: str, b: str) -> None:
    (data / a).rename(data / "_swap")
    (data / b).rename(data / a)
    (data / "_swap").rename(data / b)


@pytest.mark.slow
def test_retrain_flow_pinned_holdout_and_both_decisions(tmp_path):
    """A lineage trained on wrong labels (two class folders swapped); the labels are fixed and the data
    grows: the challenger is trained with the test images pinned, wins clearly and is promoted; a
    margin it cannot clear keeps the champion. Each decision is recomputed here from both models."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.extract_features import extract_features
    from flows.retrain import retrain
    from flows.train_linear import train_linear
    from tasks.data.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", per_class=30, size=(48, 56), seed=3)
    _swap(data, "stripes", "checks")
    out, reg = str(tmp_path / "out"), str(tmp_path / "reg")
    tiny = BackboneSpec(name="mobilenet_v2", weights="none", input_size=96, backbone_args={"alpha": 0.35})
    output = Output(out=out, registry=reg)
    with prefect_test_harness(server_startup_timeout=90):
        s = extract_features(str(data), tiny, ExtractOptions(layers=["block_3_expand_relu"]), output=Output(out=out))
        train_linear(s.store, "block_3_expand_relu", linear=LinearConfig(C=1.0), model_name="tex", output=output)
        first = dict(ModelRegistry(reg).splits("tex")["samples"])
        assert sorted(set(first.values())) == ["test", "train", "val"]
        assert ModelRegistry(reg).splits("tex")["fractions"] == {"val": 0.2, "test": 0.15}

        same = retrain(str(data), "tex", output)
        assert same.retrained is False and "no data change" in same.reason

        _swap(data, "stripes", "checks")                                # the labels are fixed ...
        for i, cls in enumerate(["stripes", "checks", "rings"] * 7):     # ... and the data grows
            make_image(cls, (50, 60), 900 + i).save(data / cls / f"grown_{i}.jpg")
        fixed = retrain(str(data), "tex", output)
        assert fixed.retrained and fixed.extracted >= 21 and fixed.challenger == 2
        now = FeatureStore(s.store).row_splits("block_3_expand_relu", "avg")
        # the first training's images kept their split; new test images come only from new data
        assert all(now[h] == sp for h, sp in first.items())
        assert any(sp == "test" for h, sp in now.items() if h not in first)
        assert _check_decision(reg, s.store, fixed.decision, 1, 2) is True   # the promoted outcome
        r = ModelRegistry(reg)
        assert fixed.promoted and r.aliases("tex")["champion"] == 2 == fixed.champion

        strict = retrain(str(data), "tex", output, force=True, margin=0.5)
        assert _check_decision(reg, s.store, strict.decision, 2, 3) is False  # the kept outcome
        assert not strict.promoted and r.aliases("tex")["champion"] == 2
        assert [e["champion_after"] for e in r.history("tex")] == [2, 2]


@pytest.mark.slow
def test_retrain_a_fine_tuned_lineage(tmp_path, texture_data):
    import keras
    from prefect.testing.utilities import prefect_test_harness

    from flows.fine_tune import fine_tune
    from flows.retrain import retrain

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, name="c")(inp)
    model = tmp_path / "cnn.keras"
    keras.Model(inp, keras.layers.ReLU(name="r")(x)).save(model)
    out, reg = str(tmp_path / "out"), str(tmp_path / "reg")
    with prefect_test_harness(server_startup_timeout=90):
        output = Output(out=out, registry=reg)
        fine_tune(str(texture_data), BackboneSpec(name=str(model), weights="file", preprocessing="scale01"),
                  FineTuneConfig(dense=[8], dropout=0.0, epochs=1, augment=[], batch_size=8, ensemble=2),
                  model_name="ft", output=output)
        same = retrain(str(texture_data), "ft", output)
        assert same.retrained is False
        forced = retrain(str(texture_data), "ft", output, force=True)
    assert forced.retrained and forced.challenger == 2 and forced.extracted is None
    r = ModelRegistry(reg)
    assert r.versions("ft") == [1, 2] and r.record("ft", 2).metadata["config"]["dense"] == [8]
    # an ensemble lineage retrains as an ensemble: one model file holding both networks
    assert r.record("ft", 2).metadata["config"]["ensemble"] == 2
    from tasks.finetune import load_finetuned

    layers = [layer.name for layer in load_finetuned(r.load("ft", 2)[0]).layers]
    assert layers[-3:] == ["network_1", "network_2", "ensemble_average"]
    assert r.aliases("ft")["champion"] == forced.champion and r.history("ft")[-1]["challenger"] == 2


def test_retrain_rehash_reaches_the_scan(tmp_path, monkeypatch):
    """`cnncodes retrain --rehash` passes ``rehash`` to the flow, and the flow to the scan."""
    import flows.retrain as flow_module
    from cnncodes import cli

    seen = {}

    class Stop(Exception):
        pass

    def scan(data, manifest_path, val, test, seed, pinned, rehash=False, **kwargs):
        seen["scan"] = rehash
        raise Stop

    def flow(data, model, output, margin=0.0, force=False, rehash=False, **kwargs):
        seen["flow"] = rehash
        flow_module.retrain.fn(data, model, output, margin, force, rehash, **kwargs)

    monkeypatch.setattr(flow_module, "retrain_split_settings",
                        lambda registry, model: {"val": 0.2, "test": 0.15, "seed": 0, "pinned": None})
    monkeypatch.setattr(flow_module, "scan_dataset", scan)
    monkeypatch.setattr(flow_module, "retrain", type("F", (), {"fn": staticmethod(flow_module.retrain.fn),
                                                               "__call__": staticmethod(flow)})())
    for flag, expected in ((["--rehash"], True), ([], False)):
        args = cli.build_parser().parse_args(["retrain", str(tmp_path), "--model", "m", "--out", str(tmp_path), *flag])
        with pytest.raises(Stop):
            cli.cmd_retrain(args)
        assert seen == {"flow": expected, "scan": expected}
        seen.clear()


def test_a_second_retraining_of_a_lineage_meanwhile_is_refused_naming_the_first(tmp_path, monkeypatch):
    """Another process retraining lineage 'tex' holds it: this one stops before scanning anything, saying who."""
    import subprocess
    import sys

    import flows.retrain as flow_module
    from storage.registry import RegistryError
    from tasks.settings import Output

    reg = tmp_path / "registry"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom storage import ModelRegistry\n"
        f"with ModelRegistry({str(reg)!r}).retraining('tex'):\n    print('held', flush=True)\n    time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(flow_module, "retrain_split_settings", lambda *a: pytest.fail("went on while held"))
        with pytest.raises(RegistryError, match=rf"lineage 'tex' is being retrained already, by pid {holder.pid}"):
            flow_module.retrain.fn(str(tmp_path), "tex", Output(out=str(tmp_path), registry=str(reg)))
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(flow_module, "retrain_split_settings", lambda *a: (_ for _ in ()).throw(KeyError("reached")))
    with pytest.raises(KeyError, match="reached"):  # released with its process: the next one goes on
        flow_module.retrain.fn(str(tmp_path), "tex", Output(out=str(tmp_path), registry=str(reg)))
