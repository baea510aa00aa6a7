"""Scheduled retraining: no change, no training; growth extracts only new images; a worse or equal
challenger never replaces the champion; every decision is in the lineage's history."""
from __future__ import annotations

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
from test_linear import make_store


def test_promotion_rule():
    champ = {"val": {"accuracy": 0.80}}
    assert decide_promotion(champ, {"val": {"accuracy": 0.85}}, 0.0)["promote"]
    assert not decide_promotion(champ, {"val": {"accuracy": 0.80}}, 0.0)["promote"]   # a tie keeps the champion
    assert not decide_promotion(champ, {"val": {"accuracy": 0.84}}, 0.05)["promote"]
    assert not decide_promotion(champ, {"val": {"accuracy": 0.60}}, 0.0)["promote"]
    d = decide_promotion({"val": {"accuracy": 0.9}, "test": {"accuracy": 0.7}},
                         {"val": {"accuracy": 0.5}, "test": {"accuracy": 0.8}}, 0.0)
    assert d["split"] == "test" and d["promote"]


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


def _holdout_accuracy(registry, store, version, split) -> float:
    """Accuracy of registered probe ``version`` on ``split`` of ``store``, computed without the flow."""
    from tasks.reports.evaluate import scores_of

    model, rec = ModelRegistry(registry).load("tex", version)
    codes = FeatureStore(store).read(rec.metadata["layer"], rec.metadata["pooling"], split=split)
    return float((scores_of(model, codes.features).argmax(1) == codes.labels).mean())


@pytest.mark.slow
def test_retrain_flow_no_change_then_growth(tmp_path, texture_data):
    from prefect.testing.utilities import prefect_test_harness

    from flows.extract_features import extract_features
    from flows.retrain import retrain
    from flows.train_linear import train_linear

    out, reg = str(tmp_path / "out"), str(tmp_path / "reg")
    tiny = BackboneSpec(name="mobilenet_v2", weights="none", input_size=96, backbone_args={"alpha": 0.35})
    output = Output(out=out, registry=reg)
    with prefect_test_harness(server_startup_timeout=90):
        s = extract_features(str(texture_data), tiny, ExtractOptions(layers=["block_3_expand_relu"]),
                             output=Output(out=out))
        train_linear(s["store"], "block_3_expand_relu", linear=LinearConfig(C=1.0), model_name="tex", output=output)

        same = retrain(str(texture_data), "tex", output)
        assert same["retrained"] is False and "no data change" in same["reason"]
        assert ModelRegistry(reg).versions("tex") == [1]

        classes = sorted(p.name for p in texture_data.iterdir())
        for i, cls in enumerate(classes * 2):
            make_image(cls if cls in ("stripes", "checks", "rings") else "blobs", (50, 60), 500 + i).save(
                texture_data / cls / f"grown_{i}.jpg")
        grown = retrain(str(texture_data), "tex", output)
        assert grown["retrained"] and grown["extracted"] == 6 and grown["challenger"] == 2
        r = ModelRegistry(reg)
        assert r.versions("tex") == [1, 2]
        assert r.aliases("tex")["champion"] == (2 if grown["promoted"] else 1) == grown["champion"]
        assert r.history("tex")[-1]["challenger"] == 2
        # The decision, recomputed here from both models on the same held-out rows of the current store
        champion, challenger = _holdout_accuracy(reg, s["store"], 1, grown["decision"]["split"]), \
            _holdout_accuracy(reg, s["store"], 2, grown["decision"]["split"])
        assert grown["decision"]["champion_accuracy"] == pytest.approx(champion)
        assert grown["decision"]["challenger_accuracy"] == pytest.approx(challenger)
        assert grown["promoted"] == (challenger > champion + 0.0)

        strict = retrain(str(texture_data), "tex", output, force=True, margin=1.0)
        assert strict["retrained"] and not strict["promoted"]  # nothing can win by more than 1.0
        assert r.aliases("tex")["champion"] == grown["champion"]
        before = grown["champion"]
        champion = _holdout_accuracy(reg, s["store"], before, strict["decision"]["split"])
        challenger = _holdout_accuracy(reg, s["store"], 3, strict["decision"]["split"])
        assert strict["promoted"] == (challenger > champion + 1.0)
        # and with a margin the challenger does clear, the same rule promotes it
        lenient = retrain(str(texture_data), "tex", output, force=True, margin=-1.0)
        assert lenient["promoted"] and r.aliases("tex")["champion"] == 4 == lenient["champion"]


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
                  FineTuneConfig(dense=[8], dropout=0.0, epochs=1, augment=[], batch_size=8), model_name="ft",
                  output=output)
        same = retrain(str(texture_data), "ft", output)
        assert same["retrained"] is False
        forced = retrain(str(texture_data), "ft", output, force=True)
    assert forced["retrained"] and forced["challenger"] == 2 and forced["extracted"] is None
    r = ModelRegistry(reg)
    assert r.versions("ft") == [1, 2] and r.record("ft", 2).metadata["config"]["dense"] == [8]
    assert r.aliases("ft")["champion"] == forced["champion"] and r.history("ft")[-1]["challenger"] == 2
