"""On a real GPU, on whichever Keras backend this process computes (skipped elsewhere; `benchmarks/gpu.sh` runs
these on JAX and PyTorch): float16 and bfloat16 codes match float32 ones, float16 fine-tuning trains with loss
scaling, workers are pinned to the GPU they were given; on TensorFlow, MirroredStrategy over every GPU trains
like one device with the head multiplier."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, TINY
from tasks.backbones import BackboneSpec
from test_precision_devices import assert_mirrored_matches, run_mirrored, saved_policies

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
# float16 has 11 significant bits: codes after many layers differ from float32 by about 1e-3 relative.
FLOAT16_REL_TOL = 2e-2
# bfloat16 has 8 significant bits, 3 fewer than float16: on a CPU the codes differ by 0.3-0.9% (measured); room
# for GPU kernels that round more often.
BFLOAT16_REL_TOL = 6e-2


def _codes(precision: str, x: np.ndarray, spec: dict, layer: str) -> np.ndarray:
    from tasks.backbones import Extractor, build_backbone

    return Extractor(build_backbone(BackboneSpec(**dict(spec, precision=precision))), [(layer, "avg")])(x)[0]


def _tensorflow_only():
    from tasks import runtime

    if runtime.backend() != "tensorflow":
        pytest.skip(f"TensorFlow's MirroredStrategy and device set-up; this process computes on {runtime.backend()}")


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
@pytest.mark.parametrize("spec,layer", [(dict(name="resnet50", weights="none", input_size=96), "conv4_block6_out"),
                                        (TINY, "block_6_expand_relu")])
def test_mixed_precision_codes_match_float32_codes(spec, layer, precision):
    x = np.random.default_rng(0).integers(0, 256, (16, 96, 96, 3), dtype=np.uint8)
    a, b = _codes("float32", x, spec, layer), _codes(precision, x, spec, layer)
    assert a.std() > 0 and np.isfinite(b).all()
    rel = np.abs(a - b).max() / np.abs(a).max()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    tol, cos_min = (FLOAT16_REL_TOL, 0.999) if precision == "float16" else (BFLOAT16_REL_TOL, 0.998)
    assert rel <= tol and cos.min() >= cos_min, (rel, cos.min())


def test_float16_fine_tuning_trains_with_loss_scaling(tmp_path, texture_data, small_cnn):
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, fine_tune

    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01", precision="auto")
    res = fine_tune(scan_dataset(texture_data), spec, FineTuneConfig(dense=[16], dropout=0.0, batch_size=8,
                                                                      augment=[], epochs=3, learning_rate=0.05,
                                                                      patience=5), tmp_path / "run")
    assert res.precision == "float16"  # auto on a GPU
    losses = [h["loss"] for h in res.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    policies = saved_policies(res.model_path)
    assert {d for k, n, d in policies if k == "Conv2D"} == {"mixed_float16"}


def test_mirrored_strategy_on_every_gpu_trains_like_one(small_cnn):
    from tasks import runtime

    _tensorflow_only()
    r = run_mirrored(small_cnn, "gpu")
    assert r["replicas"] == len(runtime.gpus())
    assert_mirrored_matches(r)


PINNED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tasks import runtime
    runtime.pin_gpu({index})
    print(json.dumps(runtime.check_pinned({index})))
""")


def test_each_worker_sees_exactly_the_gpu_it_was_pinned_to():
    from tasks import runtime

    n = len(runtime.gpus())
    for index in sorted({0, n - 1}):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        proc = subprocess.run([sys.executable, "-c", PINNED.format(root=str(ROOT), index=index)],
                              capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["cuda_visible_devices"] == str(index) and len(r["visible"]) == 1


def test_a_started_worker_cannot_be_moved_to_another_gpu():
    from tasks import runtime

    _tensorflow_only()
    if len(runtime.gpus()) < 2:
        pytest.skip("needs two GPUs")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tasks import runtime
        tf = runtime.tensorflow()
        tf.constant(1.0) + 1  # devices initialised: every GPU in use
        runtime.pin_gpu(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "TensorFlow already initialised its devices" in proc.stderr
