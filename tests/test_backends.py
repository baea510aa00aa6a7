"""One code path on TensorFlow, JAX and PyTorch: the same codes, stores and models on every Keras backend.

This process computes on TensorFlow (the default backend); each other backend runs in its own process
(:mod:`tests.backends`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.backends import OTHER_BACKENDS, run_on
from tests.conftest import require_shared

# Codes of one network, weights and precision agree across backends within this share of the codes' scale
# (float32): |a - b| <= CODES_TOLERANCE * max(1, max |b|). Stores mix rows computed on several backends on this
# ground (tasks/extract.py, _backends).
CODES_TOLERANCE = 1e-4

CODES_SCRIPT = """
    import json
    import numpy as np
    from tasks import runtime
    from tasks.backbones import BackboneSpec, Extractor, build_backbone

    nets = json.load(open("nets.json"))
    out = {}
    for key, net in nets.items():
        backbone = build_backbone(BackboneSpec(**net["spec"]))
        images = np.load(f"{key}.npy")
        for (layer, pooling), codes in zip(net["cuts"], Extractor(backbone, net["cuts"])(images)):
            np.save(f"{key}.{layer}.{pooling}.{runtime.backend()}.npy", codes)
        out[key] = backbone.weights_digest
    print(json.dumps({"backend": runtime.backend(), "digests": out}))
"""


def _nets(tmp_path) -> dict:
    """MobileNet 0.25 with the shared ImageNet weights; ResNet50 and EfficientNetB0 with one saved weights file
    each (random, drawn once here on TensorFlow), at 64 px; cut early and late, every kind of pooling."""
    from tasks.backbones import BackboneSpec, build_backbone

    require_shared("keras", "models")
    nets = {"mobilenet": {"spec": dict(name="mobilenet", weights="imagenet", backbone_args={"alpha": 0.25}),
                          "cuts": [["conv_pw_13_relu", "avg"], ["conv_pw_13_relu", "max"],
                                   ["conv_pw_7_relu", "time-avg2"], ["conv_pw_11_relu", "flatten"]]},
            "resnet50": {"spec": dict(name="resnet50", input_size=64),
                         "cuts": [["conv5_block3_out", "avg"], ["conv3_block4_out", "time-max"]]},
            "efficientnet_b0": {"spec": dict(name="efficientnet_b0", input_size=64),
                                "cuts": [["top_activation", "avg"], ["block4a_expand_activation", "avg"]]}}
    for key, net in nets.items():
        if key != "mobilenet":
            path = tmp_path / f"{key}.weights.h5"
            build_backbone(BackboneSpec(**net["spec"], weights="none", seed=3)).model.save_weights(path)
            net["spec"]["weights"] = str(path)
        net["spec"]["precision"] = "float32"
        size = BackboneSpec(**net["spec"]).size
        rng = np.random.default_rng(len(key))
        np.save(tmp_path / f"{key}.npy", rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8))
    (tmp_path / "nets.json").write_text(json.dumps(nets))
    return nets


@pytest.fixture(scope="module")
def codes_on_tensorflow(tmp_path_factory):
    """The reference: every network's codes computed on TensorFlow, by the same script in its own process."""
    tmp = tmp_path_factory.mktemp("codes")
    nets = _nets(tmp)
    got = run_on("tensorflow", CODES_SCRIPT, tmp)
    assert got["backend"] == "tensorflow"
    return tmp, nets, got["digests"]


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_codes_equal_tensorflows_on_every_backend(backend, codes_on_tensorflow):
    tmp, nets, digests = codes_on_tensorflow
    got = run_on(backend, CODES_SCRIPT, tmp)
    assert got["backend"] == backend
    # the same weights: loaded from the same files, they hash the same on every backend
    assert got["digests"] == digests
    for key, net in nets.items():
        for layer, pooling in net["cuts"]:
            want = np.load(tmp / f"{key}.{layer}.{pooling}.tensorflow.npy")
            codes = np.load(tmp / f"{key}.{layer}.{pooling}.{backend}.npy")
            assert codes.shape == want.shape and codes.dtype == np.float32
            scale = max(1.0, float(np.abs(want).max()))
            worst = float(np.abs(codes - want).max()) / scale
            assert worst <= CODES_TOLERANCE, f"{key} {layer}/{pooling} on {backend}: off by {worst:.2e} of its scale"
            assert float(np.abs(want).max()) > 0  # a network that outputs zeros would agree trivially


PIPELINE_SCRIPT = """
    import json
    import sys
    from pathlib import Path

    from flows.export import export
    from flows.extract_features import extract_features
    from flows.fine_tune import fine_tune
    from flows.predict import predict
    from flows.train_linear import train_linear
    from tasks.backbones import BackboneSpec
    from tasks.extract import ExtractOptions
    from tasks.finetune import FineTuneConfig
    from tasks.settings import Output

    args = json.load(open("args.json"))
    out = Output(out="out", backend="jax")
    spec = BackboneSpec(name=args["model"], weights="file", preprocessing="scale01")
    extracted = extract_features(args["data"], spec, ExtractOptions(layers=["relu2"]), output=out)
    probe = train_linear(extracted.store, "relu2", output=out)
    # tests/test_finetune_backends.py's settings that learn on JAX (seed 3), fewer epochs
    tuned = fine_tune(args["data"], spec, FineTuneConfig(dense=[16], dropout=0.0, batch_size=8, augment=[], epochs=6,
                                                         optimizer="adam", learning_rate=3e-3, patience=6, seed=3),
                      model_name="stripes-ft", output=out)
    predicted = predict(args["images"], "stripes-ft", output=out, predictions="jax-predictions.csv")
    exported = export("stripes-ft", "exported", output=out)
    from storage.errors import CnncodesError
    from tasks.settings import ExportOptions
    try:
        export("stripes-ft", "exported-tflite", options=ExportOptions(format="tflite"), output=out)
        refused = None
    except CnncodesError as exc:  # TensorFlow's format: refused by name, not a failed import
        refused = str(exc)
    print(json.dumps({"tflite_refused": refused, "store": extracted.store, "computed": extracted.computed,
                      "probe_test": probe.metrics["test"]["accuracy"],
                      "tuned_test": tuned.metrics["test"]["accuracy"], "predicted": predicted.images,
                      "export_files": exported.files, "reload": exported.reload_check,
                      "tensorflow_imported": "tensorflow" in sys.modules}))
"""


@pytest.mark.slow
def test_without_tensorflow_jax_runs_extract_probe_fine_tune_predict_export_and_tensorflow_carries_on(
        tmp_path, oriented_data, small_cnn):
    """A process in which TensorFlow cannot be imported (a GPU node with JAX alone) runs the whole chain on JAX;
    then this process, on TensorFlow, reads what it made: it extends and probes the JAX store, predicts with the
    JAX-trained network (the same probabilities) and retrains its lineage."""
    from flows.extract_features import extract_features
    from flows.predict import predict
    from flows.retrain import retrain
    from flows.train_linear import train_linear
    from storage.store import open_store
    from tasks.backbones import BackboneSpec
    from tasks.extract import ExtractOptions
    from tasks.settings import Output

    images = oriented_data / "test"
    (tmp_path / "args.json").write_text(json.dumps({"data": str(oriented_data), "model": small_cnn,
                                                    "images": str(images)}))
    got = run_on("jax", PIPELINE_SCRIPT, tmp_path, without_tensorflow=True)
    assert got["tensorflow_imported"] is False
    # (that fine-tuning learns on JAX is tests/test_finetune_backends.py's; here it must run, register and serve)
    assert got["computed"] == 165 and got["probe_test"] > 0.45 and got["tuned_test"] is not None, got
    assert got["predicted"] == 45 and any(f.endswith(".keras") for f in got["export_files"])
    assert got["reload"]["max_abs_difference"] <= 1e-5
    assert "--format tflite is written by TensorFlow" in got["tflite_refused"]
    assert "--backend tensorflow" in got["tflite_refused"] and "jax" in got["tflite_refused"]

    out = Output(out=str(tmp_path / "out"))
    store = got["store"]
    assert open_store(store).provenance["backends"] == ["jax"]
    # more images: TensorFlow extends the store JAX made (same weights file, same codes within 1e-4)
    extra = oriented_data / "train" / next(p.name for p in (oriented_data / "train").iterdir())
    from PIL import Image

    for k, src in enumerate(sorted(extra.iterdir())[:3]):  # mirrored: other files, the same class
        Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra / f"again-{k}{src.suffix}")
    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01")
    more = extract_features(str(oriented_data), spec, ExtractOptions(layers=["relu2"], store=store), output=out)
    assert more.computed == 3 and more.reused == 165
    assert open_store(store).provenance["backends"] == ["jax", "tensorflow"]
    assert train_linear(store, "relu2", output=out).metrics["test"]["accuracy"] > 0.45  # chance: 1/3

    on_tf = predict(str(images), "stripes-ft", output=out, predictions=str(tmp_path / "tf-predictions.csv"))
    import pandas as pd

    a, b = pd.read_csv(tmp_path / "jax-predictions.csv"), pd.read_csv(tmp_path / "tf-predictions.csv")
    assert list(a.path) == list(b.path) and list(a.predicted) == list(b.predicted)
    probs = [c for c in a.columns if c.startswith("p_")]
    assert probs and float(a[probs].std().max()) > 1e-3  # the images get different probabilities ...
    assert float((a[probs] - b[probs]).abs().max().max()) <= 1e-4  # ... and each the same on both backends
    assert on_tf.images == 45

    again = retrain(str(oriented_data), "stripes-ft", output=out, force=True)
    assert again.retrained and again.challenger == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_transfer_command_runs_on_each_backend(backend, tmp_path, texture_data):
    """`cnncodes transfer --backend B` end to end, as a user types it: measured large (so case 4: codes, sweep,
    probe, fine-tuning from the first layer, gate, report), the backend recorded with the store and the models."""
    import os
    import subprocess
    import sys

    from storage.registry import ModelRegistry
    from storage.store import open_store

    cmd = [sys.executable, "-m", "cnncodes.program", "transfer", str(texture_data), "--backend", backend,
           "--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "96", "--backbone-arg", "alpha=0.35",
           "--large-per-class", "5", "--epochs", "1", "--head-epochs", "1", "--batch-size", "8", "--augment", "flip",
           "--out", str(tmp_path / "out"), "--json"]
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # --backend alone chooses
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "CNNCODES_RUNNER": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["case"] == 4 and r["finetuned"] is not None
    assert open_store(r["store"]).provenance["backend"] == backend
    reg = ModelRegistry(r["registry"])
    for model in (r["probe"], r["finetuned"]):
        assert reg.record(model["name"], model["version"]).metadata["libraries"]["keras_backend"] == backend
