"""Backbone registry, layer listing, cutting, validation and offline ImageNet weights."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import TINY, TINY_LAST, require_shared
from storage import BackboneError, ParameterError
from tasks.backbones import (REGISTRY, BackboneSpec, Extractor, backbone_info, build_backbone, parse_backbone_args,
                             pooled_shape)

# One entry per family runs by default; CNNCODES_FULL_REGISTRY=1 runs every registered constructor.
FAMILY_REPRESENTATIVES = ["vgg16", "resnet50", "resnet50_v2", "inception_v3", "xception", "mobilenet",
                          "mobilenet_v2", "mobilenet_v3_small", "densenet121", "nasnet_mobile", "efficientnet_b0",
                          "efficientnet_v2_b0", "convnext_tiny", "inception_resnet_v2"]
FULL = os.environ.get("CNNCODES_FULL_REGISTRY") == "1"
NAMES = sorted(REGISTRY) if FULL else FAMILY_REPRESENTATIVES


def test_representatives_cover_every_family():
    families = {b.module for b in REGISTRY.values()}
    covered = {REGISTRY[n].module for n in FAMILY_REPRESENTATIVES}
    assert families - covered <= {"vgg19"}, families - covered  # vgg19 is vgg16 with 3 more layers


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_registered_backbone_builds_cuts_and_extracts(name):
    info = REGISTRY[name]
    size = max(info.min_size, 75 if name.startswith(("inception", "xception")) else 64)
    bb = build_backbone(BackboneSpec(name=name, weights="none", input_size=size))
    layers = bb.layers()
    spatial = [layer for layer in layers if len(layer.output_shape) == 4 and layer.output_shape[1]]
    last, middle = layers[-1].name, spatial[len(spatial) // 2].name
    ex = Extractor(bb, [(last, "avg"), (middle, "max")])
    batch = np.random.default_rng(0).integers(0, 255, (2, size, size, 3), dtype=np.uint8)
    outs = ex(batch)
    assert [o.shape for o in outs] == [(2, *s) for s in ex.shapes]
    assert all(np.isfinite(o).all() for o in outs)
    assert ex.images_seen == 2
    ident = bb.identity()
    assert ident["backbone"] == name and ident["input_size"] == size and len(ident["weights_digest"]) == 64


def test_layers_listing_has_shapes_strides_and_params():
    bb = build_backbone(BackboneSpec(**TINY))
    layers = {layer.name: layer for layer in bb.layers()}
    assert layers[TINY_LAST].output_shape[1:] == (3, 3, 1280) and layers[TINY_LAST].stride == 32
    assert layers["block_3_expand_relu"].stride == 4
    assert layers["Conv1"].params == 3 * 3 * 3 * 16  # 16 filters (alpha 0.35 rounds to 16), no bias
    assert sum(layer.params for layer in layers.values()) == bb.model.count_params()


def test_unknown_names_fail_up_front_with_the_choices():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5'.*Did you mean 'resnet50'"):
        BackboneSpec(name="resnet5")
    bb = build_backbone(BackboneSpec(**TINY))
    with pytest.raises(BackboneError, match=r"unknown layer 'out_rel'.*Did you mean 'out_relu'.*cnncodes layers"):
        Extractor(bb, [("out_rel", "avg")])
    with pytest.raises(ParameterError, match=r"does not take backbone argument\(s\) \['depth'\]; it takes: alpha"):
        BackboneSpec(name="mobilenet_v2", backbone_args={"depth": 2})
    with pytest.raises(BackboneError, match="smallest it accepts is 75"):
        BackboneSpec(name="inception_v3", weights="none", input_size=40)
    with pytest.raises(ParameterError, match="weights must be"):
        BackboneSpec(name="resnet50", weights="/no/such/file.h5")


def test_input_size_override_and_keras_refusal_are_clear():
    bb = build_backbone(BackboneSpec(name="vgg16", weights="none", input_size=80))
    assert bb.size == 80 and bb.model.input_shape == (None, 80, 80, 3)
    with pytest.raises(BackboneError, match="resnet50 cannot take input size 20: the smallest it accepts is 32"):
        build_backbone(BackboneSpec(name="resnet50", weights="none", input_size=20))


def test_pooling_shapes_and_errors():
    assert pooled_shape((None, 7, 7, 512), "avg", "x") == (512,)
    assert pooled_shape((None, 7, 7, 512), "flatten", "x") == (7 * 7 * 512,)
    assert pooled_shape((None, 7, 7, 512), "none", "x") == (7, 7, 512)
    with pytest.raises(ParameterError, match="not a spatial map"):
        pooled_shape((None, 1024), "avg", "fc")


def test_pooling_values_match_numpy():
    bb = build_backbone(BackboneSpec(**TINY))
    ex = Extractor(bb, [("block_3_expand_relu", "none"), ("block_3_expand_relu", "avg"),
                        ("block_3_expand_relu", "max"), ("block_3_expand_relu", "flatten")])
    x = np.random.default_rng(1).integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)
    full, avg, mx, flat = ex(x)
    np.testing.assert_allclose(avg, full.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx, full.max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(flat, full.reshape(3, -1))


def test_preprocessing_is_the_familys_own_and_is_applied():
    spec = BackboneSpec(**TINY)
    assert spec.preprocessing_name() == "keras.applications.mobilenet_v2.preprocess_input"
    assert "built into the model" in BackboneSpec(name="efficientnet_b0").preprocessing_name()
    assert BackboneSpec(**dict(TINY, preprocessing="caffe")).identity()["preprocessing"] != spec.identity()["preprocessing"]
    bb = build_backbone(spec)
    x = np.random.default_rng(2).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    a = Extractor(bb, [("Conv1", "none")])(x)[0]
    from tasks.backbones import build_backbone as bb2
    raw = bb2(BackboneSpec(**dict(TINY, preprocessing="none")))
    b = Extractor(raw, [("Conv1", "none")])(x)[0]
    c = Extractor(raw, [("Conv1", "none")])((x.astype(np.float32) / 127.5 - 1.0).astype(np.uint8))[0]
    assert not np.allclose(a, b)  # preprocessing changes the codes...
    import keras

    direct = keras.Model(bb.model.inputs, bb.model.get_layer("Conv1").output)(
        keras.applications.mobilenet_v2.preprocess_input(x.astype("float32")))
    np.testing.assert_allclose(a, np.asarray(direct), rtol=1e-5, atol=1e-5)  # ...exactly as the family's own function
    del c


def test_user_model_file_is_a_backbone(tmp_path):
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="c1", activation="relu")(inp)
    x = keras.layers.Conv2D(4, 3, strides=2, name="c2")(x)
    path = tmp_path / "mine.keras"
    keras.Model(inp, x).save(path)
    spec = BackboneSpec(name=str(path), weights="imagenet")
    assert spec.weights == "file" and spec.preprocessing_name() == "none"
    bb = build_backbone(spec)
    assert bb.size == 32 and [layer.name for layer in bb.layers()][-2:] == ["c1", "c2"]
    out = Extractor(bb, [("c2", "avg")])(np.zeros((1, 32, 32, 3), np.uint8))[0]
    assert out.shape == (1, 4)
    assert spec.identity()["backbone"].startswith("model-file:")
    with pytest.raises(BackboneError, match="takes 32x32 inputs"):
        build_backbone(BackboneSpec(name=str(path), input_size=64))


def test_parse_backbone_args():
    assert parse_backbone_args(["alpha=0.25", "minimalistic=true", "name=x"]) == \
        {"alpha": 0.25, "minimalistic": True, "name": "x"}
    with pytest.raises(ParameterError, match="KEY=VALUE"):
        parse_backbone_args(["alpha"])


def test_missing_imagenet_weights_fail_fast_with_advice(tmp_path):
    """No network here: the download fails at once, and the CLI says what to do (exit status 2)."""
    import subprocess
    import sys
    import time

    closed = "http://127.0.0.1:9"  # even with network, nothing is downloaded: every fetch hits a closed port
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "empty-keras-home"), https_proxy=closed, HTTPS_PROXY=closed,
               http_proxy=closed, HTTP_PROXY=closed)
    cmd = [sys.executable, "-m", "cnncodes.cli", "layers", "mobilenet", "--backbone-arg", "alpha=0.25",
           "--weights", "imagenet"]
    t = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - t < 120
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "not in Keras's cache" in out.stderr and "empty-keras-home" in out.stderr
    assert "--weights none" in out.stderr


@pytest.mark.shared
def test_imagenet_mobilenet_loads_offline_from_shared_keras_home(tmp_path):
    """KERAS_HOME is read when Keras is imported, so this runs the CLI in a fresh process."""
    import json
    import subprocess
    import sys

    home = require_shared("keras", "models", "mobilenet_2_5_224_tf_no_top.h5").parents[1]
    env = dict(os.environ, KERAS_HOME=str(home))
    cmd = [sys.executable, "-m", "cnncodes.cli", "layers", "mobilenet", "--backbone-arg", "alpha=0.25",
           "--weights", "imagenet", "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["input_size"] == 224 and res["layers"][-1]["name"] == "conv_pw_13_relu"
    assert res["layers"][-1]["output_shape"] == [None, 7, 7, 256]
    assert backbone_info("mobilenet").default_size == 224


def test_weights_digest_does_not_depend_on_what_the_process_built_before(tmp_path):
    """Keras numbers the names it gives layers across the process (``normalization``, then ``normalization_1``):
    the digest of the same weights must not change with it, or a store extended by a long-lived worker (or by
    the transfer flow, which builds the backbone before extracting) would be refused as another extraction."""
    from tasks.backbones import BackboneSpec, build_backbone

    spec = BackboneSpec(name="efficientnet_b0", weights="none", input_size=32, seed=1, precision="float32")
    first = build_backbone(spec)
    again = build_backbone(spec)
    auto = [la.name for la in again.model.layers if la.name.startswith("normalization")]
    assert auto and all(name != "normalization" for name in auto)  # Keras did number them anew
    assert again.weights_digest == first.weights_digest
    # the digest still sees the weights
    first.model.layers[-3].weights[0].assign(first.model.layers[-3].weights[0].numpy() + 1.0)
    first._digest = None
    assert first.weights_digest != again.weights_digest
