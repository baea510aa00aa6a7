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
    """The reference: every network's codes computed here, on TensorFlow, by the same script."""
    from tasks import runtime

    tmp = tmp_path_factory.mktemp("codes")
    nets = _nets(tmp)
    assert runtime.backend() == "tensorflow"
    import os

    here = os.getcwd()
    os.chdir(tmp)
    try:
        from tasks.backbones import BackboneSpec, Extractor, build_backbone

        digests = {}
        for key, net in nets.items():
            backbone = build_backbone(BackboneSpec(**net["spec"]))
            images = np.load(f"{key}.npy")
            for (layer, pooling), codes in zip(net["cuts"], Extractor(backbone, net["cuts"])(images)):
                np.save(f"{key}.{layer}.{pooling}.tensorflow.npy", codes)
            digests[key] = backbone.weights_digest
    finally:
        os.chdir(here)
    return tmp, nets, digests


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


PADDED_SCRIPT = """
    import json
    import numpy as np
    from tasks.backbones import BackboneSpec, Extractor, build_backbone

    bb = build_backbone(BackboneSpec(name="mobilenet_v2", weights="none", input_size=64, backbone_args={"alpha": 0.35}))
    ex = Extractor(bb, [("out_relu", "avg"), ("block_3_expand_relu", "time-avg2")], batch_size=8)
    x = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    ex(x[:8])
    short = ex(x[8:])  # padded to the 8 rows XLA compiled for
    alone = [ex(x[i:i + 1]) for i in range(8, 11)]
    print(json.dumps({"rows": [len(c) for c in short], "seen": ex.images_seen,
                      "diff": max(float(np.abs(short[k] - np.concatenate([a[k] for a in alone])).max())
                                  for k in range(2))}))
"""


@pytest.mark.slow
def test_a_short_last_batch_on_jax_is_padded_and_trimmed(tmp_path):
    """XLA compiles per batch shape: a run's shorter last batch is padded to the compiled width (no second
    compilation), and only its own rows come back, with the codes each image gets alone."""
    got = run_on("jax", PADDED_SCRIPT, tmp_path)
    assert got["rows"] == [3, 3] and got["seen"] == 14
    assert got["diff"] <= 1e-5
