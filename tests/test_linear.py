"""Linear probes: training, calibration, evaluation report, registry checks, layer sweep, predict."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_EARLY
from storage import (DatasetError, FeatureStore, Manifest, ModelMismatchError, ModelRegistry, ParameterError,
                     Sample, TamperedModelError)
from storage.store import GroupSpec, StoreWriter
from tasks.probe.linear import LinearConfig, train_linear, train_sgd_chunked
from tasks.probe import evaluate_probe, fit_probe, sweep_layers

CLASSES = ["cat", "dog", "fox"]


def make_store(path: Path, per_class=(40, 40, 40), dims=32, seed=0, groups=("signal", "noise"),
               classes=CLASSES, backbone="toy") -> Path:
    """A store with a 'signal' group (class-dependent means) and a 'noise' group (no class signal)."""
    rng = np.random.default_rng(seed)
    samples, labels = [], []
    for c, n in enumerate(per_class):
        for i in range(n):
            split = "val" if i % 4 == 0 else "test" if i % 4 == 1 else "train"
            samples.append(Sample(f"{classes[c]}/{i}.jpg", f"{c:02d}{i:062x}", c, split))
            labels.append(c)
    labels = np.array(labels)
    centers = rng.normal(0, 1.0, (len(per_class), dims))
    feats = {"signal": (centers[labels] + rng.normal(0, 1.2, (len(labels), dims))).astype("f4"),
             "noise": rng.normal(0, 1, (len(labels), dims)).astype("f4")}
    m = Manifest("/data", "folders", list(classes), samples)
    ident = {"backbone": backbone, "weights": "none", "weights_digest": "d" * 64, "input_size": 8,
             "preprocessing": "none"}
    specs = [GroupSpec(g, "avg", (dims,)) for g in groups]
    with StoreWriter(path, ident, specs) as w:
        w.plan(m)
        w.start_appending()
        for spec in specs:
            w.append(spec.name, [s.path for s in samples], [s.sha256 for s in samples], labels,
                     [s.split for s in samples], feats[spec.layer])
        w.finish(m)
    return path


def _sklearn_reference(store) -> dict[str, float]:
    """Accuracy per split of a plain scikit-learn pipeline fit on the same train rows (C by its own CV)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fs = FeatureStore(store)
    train = fs.read("signal", "avg", split="train")
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0, 10.0], cv=5,
                                                                 max_iter=3000)).fit(train.features, train.labels)
    return {split: float((model.predict(c.features) == c.labels).mean())
            for split in ("val", "test") for c in [fs.read("signal", "avg", split=split)]}


@pytest.mark.parametrize("classifier", ["softmax", "svm", "sgd"])
def test_each_classifier_is_well_above_chance_and_reported(tmp_path, classifier):
    store = make_store(tmp_path / "s.h5")
    reg = tmp_path / "registry"
    trained = fit_probe(store, "signal", "avg", LinearConfig(classifier=classifier, n_jobs=1, chunk_rows=16),
                        reg, name=f"m-{classifier}")
    assert trained["version"] == 1 and trained["train_images"] == 60
    res = evaluate_probe(reg, f"m-{classifier}", 1, store, report_dir=tmp_path / "reports")
    reference = _sklearn_reference(store)
    for split in ("val", "test"):
        assert res["metrics"][split]["accuracy"] >= 0.85, (classifier, res["metrics"][split])  # chance: 0.33
        assert res["metrics"][split]["images"] == 30
        # as good as scikit-learn's own scaler + logistic regression on the same rows, within 2 images of 30
        assert res["metrics"][split]["accuracy"] >= reference[split] - 2 / 30, (classifier, reference)
    report = Path(res["report"]).read_text()
    assert "| val | 30 |" in report and "## Per class (val)" in report and "**fox**" in report
    for split in ("train", "val", "test"):
        png = Path(res["confusion_plots"][split])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    conf = np.array(res["metrics"]["val"]["confusion"])
    assert conf.shape == (3, 3) and conf.sum() == 30 and np.trace(conf) == round(30 * res["metrics"]["val"]["accuracy"])
    if classifier != "sgd":
        assert len(trained["cv_scores"]) == 5 and trained["C"] in [r["C"] for r in trained["cv_scores"]]
        assert Path(res["cv_plot"]).exists() and "## C search" in report


def test_noise_features_stay_near_chance(tmp_path):
    store = make_store(tmp_path / "s.h5")
    fit_probe(store, "noise", "avg", LinearConfig(n_jobs=1), tmp_path / "r", name="noise")
    res = evaluate_probe(tmp_path / "r", "noise", None, store, report_dir=tmp_path)
    assert res["metrics"]["val"]["accuracy"] < 0.6  # the probe cannot invent a signal


def test_svm_calibration_gives_probabilities_that_sum_to_one():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 30)
    X = rng.normal(0, 1, (90, 8)) + y[:, None]
    res = train_linear(X, y, CLASSES, LinearConfig(classifier="svm", C=0.1, n_jobs=1))
    p = res.model.predict_proba(X)
    assert p.shape == (90, 3) and np.all(p >= 0) and np.allclose(p.sum(1), 1.0)
    assert (p.argmax(1) == y).mean() > 0.8
    uncal = train_linear(X, y, CLASSES, LinearConfig(classifier="svm", C=0.1, calibrate=False, n_jobs=1))
    assert not hasattr(uncal.model, "predict_proba")


def test_pipeline_options_are_in_the_saved_model():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 40)
    X = rng.normal(0, 1, (80, 20)) + y[:, None]
    m = train_linear(X, y, ["a", "b"], LinearConfig(C=1.0, l2_normalize=True, pca=5, n_jobs=1)).model
    assert list(m.named_steps) == ["scale", "l2", "pca", "clf"] and m.named_steps["pca"].n_components_ == 5


def test_class_weight_balanced_helps_a_rare_class():
    rng = np.random.default_rng(3)
    y = np.array([0] * 200 + [1] * 12)
    X = rng.normal(0, 1, (212, 4)) + 1.1 * y[:, None]
    from sklearn.metrics import recall_score

    plain = train_linear(X, y, ["a", "b"], LinearConfig(C=1.0, n_jobs=1)).model
    bal = train_linear(X, y, ["a", "b"], LinearConfig(C=1.0, class_weight="balanced", n_jobs=1)).model
    assert recall_score(y, bal.predict(X), pos_label=1) > recall_score(y, plain.predict(X), pos_label=1)


def test_chunked_sgd_sees_every_chunk_and_learns(tmp_path):
    store = make_store(tmp_path / "s.h5", per_class=(60, 60, 60))
    fs = FeatureStore(store)
    passes = []

    def chunks():
        n = 0
        for c in fs.iter_chunks("signal", "avg", split="train", rows=32):
            n += len(c)
            yield c.features, c.labels
        passes.append(n)

    res = train_sgd_chunked(chunks, [0, 1, 2], LinearConfig(classifier="sgd", sgd_epochs=4))
    assert passes == [90] * 5  # one pass for the scaler, then one per epoch, each over all 90 rows
    val = fs.read("signal", "avg", split="val")
    assert (res.model.predict(val.features) == val.labels).mean() > 0.85


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ParameterError, match="classifier must be one of svm, softmax, sgd"):
        LinearConfig(classifier="tree").validate()
    with pytest.raises(ParameterError, match="C must be a positive number"):
        LinearConfig(C=-1).validate()
    with pytest.raises(ParameterError, match="pca"):
        LinearConfig(pca=1.5).validate()
    store = make_store(tmp_path / "one.h5", per_class=(30,), classes=["only"])
    with pytest.raises(DatasetError, match="needs at least two"):
        fit_probe(store, "signal", "avg", LinearConfig(n_jobs=1), tmp_path / "r")


def test_loading_refuses_a_mismatched_store_and_a_tampered_model(tmp_path):
    store = make_store(tmp_path / "s.h5")
    reg = tmp_path / "r"
    fit_probe(store, "signal", "avg", LinearConfig(C=0.1, n_jobs=1), reg, name="m")
    other = make_store(tmp_path / "o.h5", classes=["cat", "dog", "wolf"])
    with pytest.raises(ModelMismatchError, match="class_names"):
        evaluate_probe(reg, "m", 1, other, report_dir=tmp_path)
    wider = make_store(tmp_path / "w.h5", dims=16, backbone="other")
    with pytest.raises(ModelMismatchError, match=r"feature_dim.*|backbone"):
        evaluate_probe(reg, "m", 1, wider, report_dir=tmp_path)
    model_file = ModelRegistry(reg).record("m").model_path
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(TamperedModelError):
        evaluate_probe(reg, "m", 1, store, report_dir=tmp_path)


def test_sweep_ranks_the_layer_with_the_signal_first(tmp_path):
    store = make_store(tmp_path / "s.h5")
    res = sweep_layers(store, None, LinearConfig(C=0.1, cv_folds=3, n_jobs=1), tmp_path / "reports")
    scores = {r["layer"]: r["mean"] for r in res["rows"]}
    assert res["best"]["layer"] == "signal" and scores["signal"] > scores["noise"] + 0.3
    assert Path(res["plot"]).read_bytes()[:4] == b"\x89PNG" and "**(best)**" in Path(res["report"]).read_text()
    with pytest.raises(ParameterError, match="not in store"):
        sweep_layers(store, [("conv9", "avg")], LinearConfig(), tmp_path)


@pytest.mark.slow
def test_predict_reproduces_the_evaluation_on_validation_images(tmp_path, texture_data, tiny_spec):
    from tasks.data.datasets import scan_dataset
    from tasks.reports.evaluate import scores_of
    from tasks.extract import extract_to_store
    from tasks.predict import predict_images

    import pandas as pd

    m = scan_dataset(texture_data, val_fraction=0.3)
    store = tmp_path / "codes.h5"
    extract_to_store(m, store, tiny_spec, [(TINY_EARLY, "avg")])
    reg = tmp_path / "r"
    fit_probe(store, TINY_EARLY, "avg", LinearConfig(C=1.0, n_jobs=1), reg, name="tex")
    val = FeatureStore(store).read(TINY_EARLY, "avg", split="val")
    model, _ = ModelRegistry(reg).load("tex")
    expected = dict(zip([str(Path(m.root) / p) for p in val.paths], scores_of(model, val.features)))
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join(str(Path(m.root) / p) for p in val.paths))

    reused = predict_images(listing, reg, "tex", None, tmp_path / "pred.csv")
    assert reused["images"] == len(val) and reused["reused"] == len(val) and reused["computed"] == 0
    fresh = predict_images(listing, reg, "tex", "1", tmp_path / "pred2.csv", reuse=False)
    assert fresh["computed"] == len(val) and fresh["reused"] == 0
    for out in ("pred.csv", "pred2.csv"):
        df = pd.read_csv(tmp_path / out)
        assert len(df) == len(val)
        for _, row in df.iterrows():
            probs = np.array([row[f"p_{c}"] for c in m.class_names])
            np.testing.assert_allclose(probs, expected[row["path"]], atol=1e-4)
            assert row["predicted"] == m.class_names[int(np.argmax(expected[row["path"]]))]
            assert np.isclose(probs.sum(), 1.0) and np.isclose(row["confidence"], probs.max())


def test_top5_accuracy_appears_with_more_than_five_classes(tmp_path):
    classes = [f"c{i}" for i in range(7)]
    store = make_store(tmp_path / "s.h5", per_class=(24,) * 7, classes=classes)
    fit_probe(store, "signal", "avg", LinearConfig(C=0.1, n_jobs=1), tmp_path / "r", name="seven")
    res = evaluate_probe(tmp_path / "r", "seven", None, store, report_dir=tmp_path)
    val = res["metrics"]["val"]
    assert 0 <= val["accuracy"] <= val["top5_accuracy"] <= 1 and val["top5_accuracy"] > 0.9
    assert "top-5" in Path(res["report"]).read_text()
    three = make_store(tmp_path / "t.h5")
    fit_probe(three, "signal", "avg", LinearConfig(C=0.1, n_jobs=1), tmp_path / "r", name="three")
    assert "top5_accuracy" not in evaluate_probe(tmp_path / "r", "three", None, three, report_dir=tmp_path)["metrics"]["val"]


def test_sweep_group_selection_by_layer_and_pooling(tmp_path):
    from tasks.probe import resolve_groups

    store = make_store(tmp_path / "s.h5")
    assert resolve_groups(store, None, None) is None
    assert resolve_groups(store, ["signal"], None) == [("signal", "avg")]
    assert resolve_groups(store, None, "avg") == [("noise", "avg"), ("signal", "avg")]
    assert resolve_groups(store, None, "max") == []
    assert resolve_groups(store, ["conv9"], None) == [("conv9", "avg")]  # kept, so the sweep can say it is missing
    with pytest.raises(ParameterError, match="no layer group .* matches"):
        sweep_layers(store, resolve_groups(store, None, "max"), LinearConfig(), tmp_path)
