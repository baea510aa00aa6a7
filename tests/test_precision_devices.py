"""GPU paths proven on a CPU (issue 12): precision reaches every layer, MirroredStrategy trains like one
device, GPU pinning is asserted or fails clearly, XLA changes no feature.

The precision checks read the dtype policy of each layer from the saved ``.keras`` file's config, as a
user's serving stack would see it. Tests needing a real GPU live in ``test_gpu.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY
from storage import ParameterError
from tasks.backbones import BackboneSpec

pytestmark = pytest.mark.slow
PRECISIONS = ("float32", "float16", "bfloat16")
POLICY = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
COMPUTE = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")


def saved_policies(path: str | Path) -> list[tuple[str, str, str]]:
    """(class, layer name, dtype policy) of every layer in a saved .keras file, nested models included."""
    config = json.loads(zipfile.ZipFile(path).read("config.json"))

    def walk(node, out):
        for layer in node["config"].get("layers", []):
            dtype = layer["config"].get("dtype")
            name = dtype["config"]["name"] if isinstance(dtype, dict) else dtype
            out.append((layer["class_name"], layer["config"]["name"], name))
            if "layers" in layer["config"]:
                walk(layer, out)
        return out

    return walk(config, [])


def _assert_all_compute_in(policies, precision, except_names=()):
    compute = [(k, n, d) for k, n, d in policies if k in COMPUTE]
    assert len(compute) >= 3, compute
    wrong = [(k, n, d) for k, n, d in compute if n not in except_names and d != POLICY[precision]]
    assert not wrong, f"layers not in {precision}: {wrong[:5]}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_extraction_model_computes_every_layer_in_the_requested_precision(tmp_path, precision, small_cnn):
    from tasks.backbones import Extractor, build_backbone

    for spec in (BackboneSpec(**dict(TINY, precision=precision)),
                 BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01", precision=precision)):
        ex = Extractor(build_backbone(spec, check_device=False), [(build_backbone(
            spec, check_device=False).model.layers[-1].name, "avg")])
        path = tmp_path / f"{Path(spec.name).stem}-{precision}.keras"
        ex.model.save(path)
        _assert_all_compute_in(saved_policies(path), precision)
        assert ex.backbone.spec.precision == precision


@pytest.mark.parametrize("precision", PRECISIONS)
def test_finetuning_network_computes_in_the_requested_precision_but_its_softmax(tmp_path, precision):
    from tasks.finetune import FineTuneConfig, build_network

    net = build_network(BackboneSpec(**dict(TINY, precision=precision)), 3, FineTuneConfig(dense=[8]),
                        check_device=False)
    path = tmp_path / "net.keras"
    net.model.save(path)
    policies = saved_policies(path)
    _assert_all_compute_in(policies, precision, except_names=("head_softmax",))
    assert [d for k, n, d in policies if n == "head_softmax"] == ["float32"]  # probabilities and loss in float32
    assert ("Dense", "head_dense_0", POLICY[precision]) in policies


def test_a_saved_model_file_is_recast_with_its_weights_kept(small_cnn):
    from tasks.backbones import build_backbone

    f32 = build_backbone(BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01"))
    bf16 = build_backbone(BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01", precision="bfloat16"),
                          check_device=False)
    assert bf16.weights_digest == f32.weights_digest  # variables stay float32 and identical
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    a, b = np.asarray(f32.model(x)), np.asarray(b := bf16.model(x)).astype("float32")
    assert str(bf16.model.layers[1].compute_dtype) == "bfloat16"
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() and not np.array_equal(a, b)


def test_fine_tuning_in_bfloat16_registers_a_model_whose_every_convolution_is_bfloat16(tmp_path, texture_data):
    """The bug of issue 12: `--mixed-precision bfloat16` gave a model whose convolutions all ran in float32."""
    from tasks import runtime
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, fine_tune

    if not runtime.cpu_supports_bfloat16() and not runtime.gpus():
        pytest.skip("this CPU has no bfloat16 units (AVX512-BF16/AMX), so bfloat16 is refused here")
    spec = BackboneSpec(**dict(TINY, precision="bfloat16"))
    res = fine_tune(scan_dataset(texture_data), spec, FineTuneConfig(dense=[8], dropout=0.0, batch_size=8,
                                                                      augment=[], epochs=1), tmp_path / "run")
    assert res.precision == "bfloat16"
    _assert_all_compute_in(saved_policies(res.model_path), "bfloat16", except_names=("head_softmax",))
    assert np.isfinite(res.history[-1]["loss"])


def test_float16_fine_tuning_scales_the_loss(tmp_path, texture_data, small_cnn, monkeypatch):
    """Loss scaling is what keeps float16 gradients from underflowing; run on the CPU with the speed check off."""
    import keras

    from tasks import runtime
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, fine_tune

    monkeypatch.setattr(runtime, "check_precision", lambda p: None)
    wrapped = []
    real = keras.optimizers.LossScaleOptimizer

    def spy(opt, *a, **k):
        wrapped.append(type(opt).__name__)
        return real(opt, *a, **k)

    monkeypatch.setattr(keras.optimizers, "LossScaleOptimizer", spy)
    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01", precision="float16")
    res = fine_tune(scan_dataset(texture_data), spec, FineTuneConfig(dense=[8], dropout=0.0, batch_size=8, augment=[],
                                                                      epochs=1, learning_rate=0.01),
                    tmp_path / "run")
    assert wrapped == ["HeadMultiplierSGD"] and res.precision == "float16"
    assert np.isfinite(res.history[-1]["loss"])
    _assert_all_compute_in(saved_policies(res.model_path), "float16", except_names=("head_softmax",))


def test_auto_precision_is_float32_on_a_cpu_and_one_option_serves_every_flow():
    import inspect

    from flows.extract_features import extract_features
    from flows.fine_tune import fine_tune
    from flows.transfer import transfer
    from tasks import runtime

    if runtime.gpus():
        pytest.skip("a GPU is visible: auto means float16 here")
    assert BackboneSpec(**dict(TINY, precision="auto")).resolved().precision == "float32"
    for f in (extract_features, fine_tune, transfer):
        params = inspect.signature(f.fn).parameters
        assert params["backbone"].default.precision == "auto" and "mixed_precision" not in params
    with pytest.raises(ParameterError, match="precision must be one of float32, float16, bfloat16, auto"):
        BackboneSpec(**dict(TINY, precision="half"))
    with pytest.raises(ParameterError, match="needs a GPU"):
        runtime.check_precision("float16")


def test_cli_fine_tune_takes_precision():
    from cnncodes.cli import _backbone, build_parser

    parser = build_parser()
    assert _backbone(parser.parse_args(["fine-tune", "data", "--precision", "bfloat16"])).precision == "bfloat16"
    with pytest.raises(SystemExit):  # the option that --precision replaced is gone
        parser.parse_args(["fine-tune", "data", "--mixed-precision", "off"])
    assert _backbone(parser.parse_args(["fine-tune", "data"])).precision == "auto"
    assert parser.parse_args(["extract", "data", "--xla"]).__dict__["extract.xla"] is True


def test_an_extraction_store_records_the_precision_that_ran(tmp_path, texture_data, small_cnn):
    from storage import FeatureStore
    from tasks import runtime
    from tasks.data.datasets import scan_dataset
    from tasks.extract import extract_to_store

    m = scan_dataset(texture_data)
    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01", precision="auto")
    out = extract_to_store(m, tmp_path / "a.h5", spec, [("relu2", "avg")])
    assert FeatureStore(tmp_path / "a.h5").provenance["precision"] == out["precision"] == "float32"
    if not runtime.cpu_supports_bfloat16():
        pytest.skip("the bfloat16 half needs a CPU with AVX512-BF16 or AMX (the float32 half passed)")
    bf = extract_to_store(m, tmp_path / "b.h5", BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01",
                                                             precision="bfloat16"), [("relu2", "avg")])
    assert FeatureStore(tmp_path / "b.h5").provenance["precision"] == bf["precision"] == "bfloat16"
    a = FeatureStore(tmp_path / "a.h5").read_features("relu2", "avg")
    b = FeatureStore(tmp_path / "b.h5").read_features("relu2", "avg")
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() and not np.array_equal(a, b)
    # auto on an existing bfloat16 store keeps its precision where it runs, rather than refusing the store
    again = extract_to_store(m, tmp_path / "b.h5", BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01",
                                                                precision="auto"), [("relu2", "avg")])
    assert again["computed"] == 0 and again["precision"] == "bfloat16"


def test_xla_on_and_off_give_the_same_features(tmp_path):
    from tasks.backbones import Extractor, build_backbone

    bb = build_backbone(BackboneSpec(**TINY))
    x = np.random.default_rng(0).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    cuts = [("block_3_expand_relu", "avg"), ("block_6_expand_relu", "max")]
    plain, xla = Extractor(bb, cuts)(x), Extractor(bb, cuts, xla=True)(x)
    for a, b in zip(plain, xla):
        assert a.std() > 0
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


# --------------------------------------------------------------------------- MirroredStrategy
MIRRORED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    import tensorflow as tf
    if {mode!r} == "cpu":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tasks.backbones import BackboneSpec
    from tasks.finetune import FineTuneConfig, apply_freezing, build_network, make_optimizer

    spec = BackboneSpec(name={model!r}, weights="file", preprocessing="scale01")
    cfg = FineTuneConfig(dense=[8], dropout=0.0, optimizer="sgd", learning_rate=0.01, momentum=0.0,
                         head_lr_multiplier=10.0, augment=[])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1] * 2)

    def train(strategy, steps, initial=None):
        with strategy.scope():
            net = build_network(spec, 3, cfg)
            if initial is not None:
                net.model.set_weights(initial)
            apply_freezing(net, "none", True)
            opt = make_optimizer(cfg, 1, "finetune")
            opt.set_head_variables(net.head_variables())
            net.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        start = [w.copy() for w in net.model.get_weights()]
        net.model.fit(x[:8 * steps], y[:8 * steps], batch_size=8, epochs=1, shuffle=False, verbose=0)
        return net, start, net.model.get_weights()

    if {mode!r} == "cpu":
        one, two = tf.distribute.OneDeviceStrategy("/cpu:0"), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:  # every visible GPU; TF32 matrix units off, so that the comparison is of float32 arithmetic
        tf.config.experimental.enable_tensor_float_32_execution(False)
        one, two = tf.distribute.OneDeviceStrategy("/gpu:0"), tf.distribute.MirroredStrategy()
    net1, w0, single = train(one, 2)
    net2, _, mirrored = train(two, 2, w0)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
    scale = max(float(np.abs(a - b).max()) for a, b in zip(single, w0))

    # one step by hand: w1 = w0 - lr * (10 for the head) * grad over the first batch of 8
    ref = build_network(spec, 3, cfg)
    ref.model.set_weights(w0)
    apply_freezing(ref, "none", True)
    variables = ref.model.trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y[:8], ref.model(x[:8], training=True)))
    grads = {{v.path: np.asarray(g) for v, g in zip(variables, tape.gradient(loss, variables))}}
    head = {{v.path for v in ref.head_variables()}}
    net3, start3, after = train(two, 1, w0)
    errs, moved_head, moved_body = [], 0, 0
    for v, b, a in zip(net3.model.weights, start3, after):
        if v.path not in grads:
            assert np.array_equal(a, b), v.path  # frozen BatchNormalization statistics untouched
            continue
        mult = 10.0 if v.path in head else 1.0
        want = b - 0.01 * mult * grads[v.path]
        errs.append(float(np.abs(a - want).max() / (np.abs(want - b).max() + 1e-12)))
        if np.abs(a - b).max() > 0:
            moved_head += v.path in head
            moved_body += v.path not in head
    print(json.dumps({{"replicas": two.num_replicas_in_sync, "diff": diff, "scale": scale, "max_rel_err": max(errs),
                      "moved_head": moved_head, "moved_body": moved_body}}))
""")


def run_mirrored(model: str, mode: str) -> dict:
    """Train 2 steps on one device and on a MirroredStrategy (2 logical CPUs, or every GPU); one step by hand."""
    proc = subprocess.run([sys.executable, "-c", MIRRORED.format(root=str(ROOT), model=model, mode=mode)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_mirrored_matches(r: dict) -> None:
    assert r["scale"] > 1e-4  # training moved the weights ...
    assert r["diff"] <= 1e-5 + 1e-3 * r["scale"], r  # ... the same way on two replicas as on one
    assert r["max_rel_err"] < 1e-3, r  # and each replica's update applied lr x 10 to the head, lr to the body
    assert r["moved_head"] >= 2 and r["moved_body"] >= 4


def test_mirrored_strategy_on_two_cpu_devices_trains_like_one_with_the_head_multiplier(small_cnn):
    r = run_mirrored(small_cnn, "cpu")
    assert r["replicas"] == 2
    assert_mirrored_matches(r)


# --------------------------------------------------------------------------- GPU pinning
PIN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from storage.errors import ParameterError
    from tasks import runtime
    out = {{}}
    runtime.pin_gpu({index})
    out["env"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    out["tf_imported"] = "tensorflow" in sys.modules
    runtime.pin_gpu({index})  # the same GPU again: a worker running a second shard
    try:
        runtime.pin_gpu({index} + 1)
    except ParameterError as exc:
        out["move"] = str(exc)
    try:
        runtime.check_pinned({index})
    except ParameterError as exc:
        out["check"] = str(exc)
    print(json.dumps(out))
""")


def _pin(index: int, env_devices: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if env_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = env_devices
    proc = subprocess.run([sys.executable, "-c", PIN.format(root=str(ROOT), index=index)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_worker_is_pinned_before_tensorflow_starts_and_cannot_move():
    r = _pin(1)
    assert r["env"] == "1" and r["tf_imported"] is False
    assert "already pinned to GPU 1 and cannot move to GPU 2" in r["move"]
    # on this machine TensorFlow then sees no GPU: that is said, not silently run on the CPU
    assert "pinned to GPU 1 but TensorFlow sees 0 GPU(s)" in r["check"] and "tensorflow[and-cuda]" in r["check"]
    assert _pin(1, env_devices="4,5")["env"] == "5"  # indices count within the user's own CUDA_VISIBLE_DEVICES


def test_a_worker_whose_tensorflow_is_initialised_fails_clearly_instead_of_sharing_gpu_0(monkeypatch):
    """What TensorFlow does on a GPU machine once its devices run: set_visible_devices raises RuntimeError."""
    from tasks import runtime

    tf = runtime.tensorflow()
    fake = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
    monkeypatch.setattr(runtime, "_pinned_gpu", None)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fake if kind == "GPU" else [])

    def initialised(devices, kind=None):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", initialised)
    with pytest.raises(ParameterError, match="cannot pin this worker to GPU 1: TensorFlow already initialised"):
        runtime.pin_gpu(1)
    with pytest.raises(ParameterError, match="TensorFlow sees 2 GPU"):
        runtime.pin_gpu(5)
    assert runtime.pinned_gpu() is None


def test_shards_take_their_workers_gpu(monkeypatch):
    from tasks import extract, runtime

    monkeypatch.setattr(runtime, "_pinned_gpu", None)
    assert [extract.gpu_for_shard(i, 2) for i in range(4)] == [0, 1, 0, 1]  # outside Dask: by shard
    monkeypatch.setattr(runtime, "_pinned_gpu", 1)
    assert [extract.gpu_for_shard(i, 2) for i in range(3)] == [1, 1, 1]  # a pinned worker keeps its GPU


def test_asking_for_gpus_on_a_machine_without_one_is_a_clear_error(tmp_path, texture_data):
    from tasks import runtime
    from tasks.data.datasets import scan_dataset
    from tasks.extract import extract_shard

    if runtime.gpus():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ParameterError, match="GPU|gpu"):
        extract_shard(scan_dataset(texture_data), tmp_path / "s.h5", 0, 2, BackboneSpec(**TINY),
                      [("out_relu", "avg")], gpu=0)
    assert not (tmp_path / "s.shards").exists()  # nothing written


def test_one_gpu_asked_for_on_the_single_process_path_is_an_error_without_one():
    from tasks import runtime
    from tasks.prefect_tasks import extract_codes

    if runtime.gpus():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ParameterError, match="--gpus 1 was given but TensorFlow sees 0 GPU"):
        extract_codes.fn("unused.manifest.json", "unused.h5", {}, [], {}, gpus=1)
