"""Export (issue 18): a registered model as a network of standard Keras layers that serves without cnncodes.

Parity: on the same 224x224 PNGs (no resize differs), the exported model and `cnncodes predict` agree to
1e-4 in every class probability, for each kind of probe and for a fine-tuned network; TFLite to 1e-3. The
exports load in a fresh Python process that cannot import cnncodes. A tiny CNN at 224 px keeps it fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("stripes", "checks", "rings")
SPLITS = {"train": 8, "val": 2, "test": 3}
SIZE = 224


# ----------------------------------------------------------------------------- folding, without TensorFlow
def _sk_models(X, y):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    return {
        "softmax": make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)),
        "pca-l2-whiten": make_pipeline(StandardScaler(), Normalizer(), PCA(5, whiten=True, random_state=0),
                                       LogisticRegression(max_iter=2000)),
        "svm-calibrated": CalibratedClassifierCV(make_pipeline(StandardScaler(), PCA(4, random_state=0),
                                                               LinearSVC(C=0.1)), method="sigmoid", cv=3),
        "svm-scores": make_pipeline(StandardScaler(), LinearSVC(C=0.1)),
        "sgd": make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", random_state=0)),
    }


@pytest.mark.parametrize("classes", [3, 2])
def test_folded_maps_reproduce_scikit_learn(classes):
    from tasks.export.fold import fold_pipeline
    from tasks.reports.evaluate import scores_of

    rng = np.random.default_rng(classes)
    y = np.repeat(np.arange(classes), 20)
    X = rng.normal(0, 1, (len(y), 12)) + rng.normal(0, 2, (classes, 12))[y]
    for name, model in _sk_models(X, y).items():
        model.fit(X, y)
        head = fold_pipeline(model, 12)
        Xt = rng.normal(0, 3, (50, 12)).astype(np.float32)  # what scores_of gives the model
        # float64 maps against scikit-learn, which computes in float32 on float32 codes: 1e-6
        assert np.max(np.abs(head(Xt) - scores_of(model, Xt))) < 1e-6, name
        assert head.output == ("scores" if name == "svm-scores" else "softmax" if name.startswith(
            ("softmax", "pca")) and classes > 2 else "sigmoids"), name


def test_what_has_no_exact_form_is_refused_with_what_to_do():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    from tasks.export.fold import ExportError, fold_pipeline

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 12)
    X = rng.normal(0, 1, (36, 6)) + 3 * np.eye(6)[y]
    iso = CalibratedClassifierCV(make_pipeline(StandardScaler(), LinearSVC()), method="isotonic", cv=3).fit(X, y)
    with pytest.raises(ExportError, match="isotonic.*Retrain the probe with sigmoid calibration"):
        fold_pipeline(iso, 6)
    hinge = make_pipeline(StandardScaler(), SGDClassifier(loss="hinge")).fit(X, y)
    with pytest.raises(ExportError, match="loss 'hinge'"):
        fold_pipeline(hinge, 6)
    l1 = make_pipeline(Normalizer(norm="l1"), LinearSVC()).fit(X, y)
    with pytest.raises(ExportError, match="norm 'l1'.*L2"):
        fold_pipeline(l1, 6)
    from tasks.export.layers import pooling_layer

    with pytest.raises(ExportError, match="pooling 'time'.*avg, max, flatten, none, time-avg"):
        pooling_layer("time")


# ----------------------------------------------------------------------------- a registry to export from
def _png_dataset(root: Path, classes, seed: int) -> Path:
    from tasks.data.synthetic import make_image

    for s, (split, n) in enumerate(SPLITS.items()):
        for c, kind in enumerate(classes):
            d = root / split / kind
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(kind, (SIZE, SIZE), seed * 1000 + s * 100 + c * 10 + i).save(d / f"{i}.png")
    return root


def _cnn(path: Path) -> str:
    """A small CNN at 224 px with BatchNormalization (a user's model file as the backbone)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    for i, f in enumerate((8, 16)):
        x = keras.layers.Conv2D(f, 3, strides=2, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    keras.Model(inp, x).save(path)
    return str(path)


# name -> (dataset, preprocessing, pooling, LinearConfig kwargs)
PROBES = {
    "softmax": ("three", "caffe", "avg", dict(classifier="softmax", C=1.0)),
    "binary": ("two", "torch", "avg", dict(classifier="softmax", C=1.0)),
    "svm": ("three", "caffe", "max", dict(classifier="svm", C=0.1)),
    "svm-binary": ("two", "torch", "avg", dict(classifier="svm", C=0.1)),
    "pca": ("three", "caffe", "avg", dict(classifier="softmax", C=1.0, pca=4, l2_normalize=True)),
    "sgd": ("three", "caffe", "max", dict(classifier="sgd", C=1.0)),
    # spectrogram poolings: over time only, whole (max) or in 3 segments of a 14-column map (5, 5, 4)
    "time-max": ("three", "caffe", "time-max", dict(classifier="softmax", C=1.0)),
    "time-avg3": ("three", "caffe", "time-avg3", dict(classifier="softmax", C=1.0)),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Datasets of 224 px PNGs (3 classes, and 2), their stores, one registered probe per variant and a
    fine-tuned network, and the predictions `cnncodes predict` makes with each on the test images."""
    import pandas as pd

    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.extract import extract_to_store
    from tasks.finetune import FineTuneConfig, evaluate_register_report, fine_tune
    from tasks.predict import predict_images
    from tasks.probe.linear import LinearConfig
    from tasks.probe.train import fit_probe

    tmp = tmp_path_factory.mktemp("export")
    cnn = _cnn(tmp / "cnn224.keras")
    data = {"three": _png_dataset(tmp / "three", CLASSES, 1), "two": _png_dataset(tmp / "two", CLASSES[:2], 2)}
    reg = tmp / "registry"
    specs = {"three": BackboneSpec(name=cnn, weights="file", preprocessing="caffe", precision="float32"),
             "two": BackboneSpec(name=cnn, weights="file", preprocessing="torch", precision="float32")}
    stores = {}
    for key, root in data.items():
        stores[key] = tmp / f"{key}.h5"
        extract_to_store(scan_dataset(root), stores[key], specs[key],
                         [("pool1", "avg"), ("pool1", "max"), ("pool1", "time-max"), ("pool1", "time-avg3")])
    predictions = {}
    for name, (key, _, pooling, kw) in PROBES.items():
        fit_probe(stores[key], "pool1", pooling, LinearConfig(**kw), reg, name=name)
        out = tmp / f"{name}.csv"
        predict_images(data[key] / "test", reg, name, None, out)
        predictions[name] = pd.read_csv(out)
    # fine-tuned: the same CNN at 224 px, 'tf' preprocessing, one epoch of head and one of the whole
    manifest = scan_dataset(data["three"])
    spec = BackboneSpec(name=cnn, weights="file", preprocessing="tf", precision="float32")
    cfg = FineTuneConfig(dense=[8], dropout=0.0, batch_size=8, augment=[], epochs=1, head_epochs=1)
    r = fine_tune(manifest, spec, cfg, tmp / "ft-run", resize="stretch")
    trained = {"model_path": r.model_path, "history": r.history, "phases": r.phases, "counts": r.counts,
               "skipped": r.skipped, "seconds": r.seconds, "input_size": r.input_size, "precision": r.precision}
    evaluate_register_report(trained, manifest, spec, cfg, "stretch", reg, "tuned", tmp / "reports")
    # an ensemble of two such networks (one epoch each, seeds 0 and 1), their probabilities averaged
    ens = cfg.model_copy(update={"head_epochs": 0, "ensemble": 2})
    r = fine_tune(manifest, spec, ens, tmp / "ens-run", resize="stretch")
    trained_ens = {"model_path": r.model_path, "history": r.history, "phases": r.phases, "counts": r.counts,
                   "skipped": r.skipped, "seconds": r.seconds, "input_size": r.input_size, "precision": r.precision}
    evaluate_register_report(trained_ens, manifest, spec, ens, "stretch", reg, "tuned-ensemble", tmp / "reports")
    for name in ("tuned", "tuned-ensemble"):
        out = tmp / f"{name}.csv"
        predict_images(data["three"] / "test", reg, name, None, out)
        predictions[name] = pd.read_csv(out)
    return {"registry": reg, "tmp": tmp, "data": data, "predictions": predictions}


def _images_and_expected(df) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    classes = [c[2:] for c in df.columns if c.startswith("p_")]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in df["path"]])
    assert images.shape[1:] == (SIZE, SIZE, 3)  # no resize anywhere: the parity is the model's
    return images, df[[f"p_{c}" for c in classes]].to_numpy(), classes


@pytest.mark.parametrize("name", [*PROBES, "tuned", "tuned-ensemble"])
@pytest.mark.slow  # the registry fixture trains and registers models of every kind
def test_the_exported_keras_model_agrees_with_predict(registry, name):
    import keras

    from tasks.export import export_model
    from tasks.settings import ExportOptions

    out = registry["tmp"] / "exports" / name
    r = export_model(registry["registry"], name, None, out, ExportOptions(format="keras"))
    images, expected, classes = _images_and_expected(registry["predictions"][name])
    model = keras.saving.load_model(out / "model.keras", compile=False)
    got = model.predict(images, verbose=0)
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == classes == r["classes"]
    assert got.shape == expected.shape and np.max(np.abs(got - expected)) <= 1e-4, np.max(np.abs(got - expected))
    assert info["output"]["kind"] == "probabilities" and np.allclose(got.sum(1), 1.0, atol=1e-5)
    assert info["input"]["size"] == SIZE and info["input"]["range"] == [0, 255]
    mode = {"tuned": "tf", "tuned-ensemble": "tf", "binary": "torch", "svm-binary": "torch"}.get(name, "caffe")
    assert info["input"]["preprocessing_mode"] == mode and mode in info["input"]["preprocessing"]
    reg_meta = json.loads((registry["registry"] / name / "v1" / "metadata.json").read_text())
    assert info["source"]["model_sha256"] == reg_meta["model_sha256"] and info["source"]["version"] == 1
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Intended use" in card and "## Limits" in card and reg_meta["model_sha256"] in card
    test_images = len(registry["predictions"][name])
    assert f"{test_images} images" in card and r["test"]["images"] == test_images
    lo, hi = r["test"]["interval"]
    assert 0 <= lo <= r["test"]["accuracy"] <= hi <= 1
    assert info["data"]["splits"]["test"] == test_images and info["data"]["splits"]["train"] > test_images


@pytest.mark.slow  # the registry fixture trains and registers models of every kind
def test_an_ensembles_report_names_its_networks_and_seeds(registry):
    report = (registry["tmp"] / "reports" / "tuned-ensemble-v1.report.md").read_text()
    assert "ensemble: 2 networks (seeds 0 to 1)" in report
    assert "| finetune (network 1) |" in report and "| finetune (network 2) |" in report
    meta = json.loads((registry["registry"] / "tuned-ensemble" / "v1" / "metadata.json").read_text())
    assert meta["config"]["ensemble"] == 2 and [h["network"] for h in meta["history"]] == [1, 2]


@pytest.mark.slow  # the registry fixture trains and registers models of every kind
def test_tflite_float32_and_int8_agree_with_predict(registry):
    import tensorflow as tf

    from tasks.export import export_model
    from tasks.settings import ExportOptions

    for name in ("svm", "tuned", "tuned-ensemble"):
        out = registry["tmp"] / "tflite" / name
        export_model(registry["registry"], name, None, out, ExportOptions(format="tflite", int8=(name == "svm")))
        images, expected, _ = _images_and_expected(registry["predictions"][name])
        interpreter = tf.lite.Interpreter(model_path=str(out / "model.tflite"))  # the README's five lines
        interpreter.allocate_tensors()
        inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        got = []
        for img in images:
            interpreter.set_tensor(inp["index"], img[None])
            interpreter.invoke()
            got.append(interpreter.get_tensor(outp["index"])[0])
        assert np.max(np.abs(np.stack(got) - expected)) <= 1e-3, name
    int8 = json.loads((registry["tmp"] / "tflite" / "svm" / "model.json").read_text())["int8"]
    assert (registry["tmp"] / "tflite" / "svm" / "model-int8.tflite").stat().st_size == int8["bytes"]
    assert int8["images"] == 9 and int8["split"] == "test"
    assert int8["accuracy_change"] == pytest.approx(int8["int8_accuracy"] - int8["float32_accuracy"])
    same = int8["same_prediction"]  # a share of the 9 images, and only images predicted otherwise move accuracy
    assert same * 9 == pytest.approx(round(same * 9), abs=1e-6)
    assert abs(int8["accuracy_change"]) <= 1 - same + 1e-9
    assert "int8 TFLite" in (registry["tmp"] / "tflite" / "svm" / "MODEL_CARD.md").read_text()


@pytest.mark.slow  # the registry fixture trains and registers models of every kind
def test_exports_load_in_a_python_without_cnncodes(registry, tmp_path):
    """keras, SavedModel and TFLite exports, loaded in a fresh interpreter whose path holds TensorFlow but
    neither the worktree nor the editable install of cnncodes."""
    import site

    from tasks.export import export_model
    from tasks.settings import ExportOptions

    exports = {}
    for fmt, name in (("keras", "pca"), ("savedmodel", "svm"), ("tflite", "binary"), ("keras", "tuned"),
                      ("savedmodel", "tuned-ensemble")):
        out = tmp_path / f"{fmt}-{name}"
        export_model(registry["registry"], name, None, out, ExportOptions(format=fmt))
        images, expected, _ = _images_and_expected(registry["predictions"][name])
        np.save(tmp_path / f"{fmt}-{name}.images.npy", images)
        np.save(tmp_path / f"{fmt}-{name}.expected.npy", expected)
        exports[f"{fmt}-{name}"] = fmt
    packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
    child = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.path[:] = [p for p in sys.path if p.endswith(("zip", "lib-dynload")) or "python3." in p
                       and "site-packages" not in p] + {packages!r}
        assert importlib.util.find_spec("cnncodes") is None and importlib.util.find_spec("tasks") is None
        assert importlib.util.find_spec("storage") is None
        import numpy as np, tensorflow as tf, keras
        out = {{}}
        for stem, fmt in {exports!r}.items():
            images = np.load(stem + ".images.npy")
            if fmt == "keras":
                probs = keras.saving.load_model(stem + "/model.keras").predict(images, verbose=0)
            elif fmt == "savedmodel":
                serve = tf.saved_model.load(stem + "/saved_model").signatures["serving_default"]
                probs = list(serve(tf.constant(images)).values())[0].numpy()
            else:
                it = tf.lite.Interpreter(model_path=stem + "/model.tflite")
                it.allocate_tensors()
                i, o = it.get_input_details()[0], it.get_output_details()[0]
                rows = []
                for img in images:
                    it.set_tensor(i["index"], img[None]); it.invoke(); rows.append(it.get_tensor(o["index"])[0])
                probs = np.stack(rows)
            out[stem] = float(np.max(np.abs(probs - np.load(stem + ".expected.npy"))))
        out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("cnncodes", "tasks", "storage", "flows"))
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", child], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("modules") == []
    for stem, diff in res.items():
        assert diff <= (1e-3 if stem.startswith("tflite") else 1e-4), (stem, diff)
    assert sorted(res) == sorted(exports)  # every export was loaded and scored


@pytest.mark.slow  # the registry fixture trains and registers models of every kind
def test_bad_requests_get_messages_that_say_what_to_do(registry, tmp_path):
    from storage import ModelRegistry, RegistryError

    from tasks.export import ExportError, export_model
    from tasks.settings import ExportOptions

    reg = registry["registry"]
    with pytest.raises(RegistryError, match="no saved model named 'nope'.*models there: binary"):
        export_model(reg, "nope", None, tmp_path / "a")
    with pytest.raises(RegistryError, match="has no version 7"):
        export_model(reg, "softmax", 7, tmp_path / "a")
    with pytest.raises(ExportError, match="--int8 quantises a TFLite model"):
        export_model(reg, "softmax", None, tmp_path / "a", ExportOptions(format="keras", int8=True))
    out = tmp_path / "done"
    export_model(reg, "softmax", None, out)
    first = (out / "model.json").read_text()
    with pytest.raises(ExportError, match="exists; choose another --output, or pass --force"):
        export_model(reg, "softmax", None, out)
    assert (out / "model.json").read_text() == first
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds no export"):
        export_model(reg, "softmax", None, other, ExportOptions(force=True))
    ModelRegistry(reg).set_alias("sgd", "champion", 1)
    r = export_model(reg, "sgd", None, out, ExportOptions(force=True))  # replaced; the champion by default
    assert r["model"] == "sgd" and json.loads((out / "model.json").read_text())["source"]["registry_model"] == "sgd"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.slow
def test_cli_export_json(registry, tmp_path):
    from conftest import ROOT

    out = tmp_path / "cli-export"
    env = dict(os.environ, CNNCODES_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "cnncodes.cli", "export", "--model", "softmax", "--version", "1",
                           "--format", "savedmodel", "--output", str(out), "--registry", str(registry["registry"]),
                           "--out", str(tmp_path / "o"), "--json"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["format"] == "savedmodel" and res["version"] == 1 and res["model"] == "softmax"
    assert (out / "saved_model" / "saved_model.pb").exists() and res["reload_check"]["max_abs_difference"] < 1e-5
    assert res["test"]["images"] == 9 and json.loads((out / "model.json").read_text())["format"] == "savedmodel"


@pytest.mark.slow  # the registry fixture trains and registers models of every kind
def test_the_custom_object_check_finds_cnncodes_layers(registry, tmp_path):
    """The registered fine-tuned network holds cnncodes' Preprocess layer; its export holds none."""
    import keras

    from storage import ModelRegistry
    from tasks.export import export_model
    from tasks.export.layers import standard_only
    from tasks.finetune import load_finetuned

    path, _ = ModelRegistry(registry["registry"]).load("tuned")
    assert standard_only(load_finetuned(path)) == ["cnncodes>Preprocess"]
    export_model(registry["registry"], "tuned", None, tmp_path / "tuned")
    assert standard_only(keras.saving.load_model(tmp_path / "tuned" / "model.keras", compile=False)) == []
