"""GPU figures on a machine without TensorFlow: the same Keras networks on Keras's JAX backend.

The GPU machines this workplace lends carry JAX, PyTorch and Pillow but no TensorFlow, and cannot reach
the package index; the TensorFlow wheel and its CUDA 12 libraries are far larger than what may be
carried there. ``benchmarks/gpu.sh`` (the real check, through cnncodes and TensorFlow) therefore cannot
run on them. This script measures what can be measured there, side by side in one run, and says what
it measured with:

  * device     the GPU, its driver, the Python, JAX and Keras versions, and whether TensorFlow and
               CUDA 12 runtime libraries are present (why gpu.sh could not run);
  * raw        the forward pass of the ``keras.applications`` network that cnncodes builds
               (ResNet50, MobileNetV2; 224 px; random weights, the same arithmetic as ImageNet's),
               preprocessing and average pooling included, one jit-compiled function on a uint8 batch
               already on the GPU, codes copied back to the host: float32, mixed float16 and mixed
               bfloat16 (Keras's dtype policies, as cnncodes' ``--precision`` sets them);
  * decode     cnncodes' own decoder (``tasks.data.images.load_image``) on generated photo-sized
               JPEGs (about 375 x 500 px), images/s on one core, and its decoding pool
               (``tasks.data.decode_pool``) on every core, in threads and in processes;
  * bound      whether the decoder or the GPU would cap extraction on that machine.

These are figures of Keras on JAX (XLA), not of TensorFlow: they bound what the network's arithmetic
costs on that GPU and what the decoder feeds it; cnncodes' own extraction on GPUs still waits for a
machine with TensorFlow (BENCHMARKS.md says so).

Usage (on the GPU machine; keras, namex and optree carried as wheels, see BENCHMARKS.md):
    KERAS_BACKEND=jax python3 benchmarks/gpu_keras_jax.py --json $OUT/gpu-keras-jax.json
    KERAS_BACKEND=jax python3 benchmarks/gpu_keras_jax.py --dry-run       # tiny counts, any machine
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from gpu import decode_rates, photos  # noqa: E402  benchmarks/ is the script's folder
from report import emit  # noqa: E402

POLICIES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
NETWORKS = {"resnet50": ("ResNet50", "caffe"), "mobilenetv2": ("MobileNetV2", "tf")}


def device_info() -> dict:
    import jax
    import keras

    info = {"python": platform.python_version(), "jax": jax.__version__, "keras": keras.__version__,
            "keras_backend": keras.backend.backend(), "jax_devices": [str(d) for d in jax.devices()],
            "cpu_cores": os.cpu_count(),
            "tensorflow_importable": importlib.util.find_spec("tensorflow") is not None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    import site

    dirs = ["/usr/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64", *glob.glob("/usr/local/cuda*/lib64")]
    dirs += [d for sp in site.getsitepackages() for d in glob.glob(f"{sp}/nvidia/*/lib")]  # pip's CUDA wheels
    found = []
    for pattern in ("libcudart.so.12*", "libcublas.so.12*", "libcudnn.so.9*", "libcudart.so.13*"):
        hits = [p for d in dirs for p in glob.glob(f"{d}/{pattern}")]
        found.append({"library": pattern, "found": len(hits), "example": hits[0] if hits else None})
    info["cuda_libraries"] = found
    return info


def raw_rate(network: str, precision: str, batch: int, size: int, seconds: float) -> dict:
    """Images/s of the jit-compiled forward pass (preprocess, network, average pooling, codes to host)."""
    import jax
    import jax.numpy as jnp
    import keras

    keras.config.set_dtype_policy(POLICIES[precision])
    try:
        ctor, mode = NETWORKS[network]
        model = getattr(keras.applications, ctor)(weights=None, include_top=False, input_shape=(size, size, 3))
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        mean = jnp.asarray([103.939, 116.779, 123.68], jnp.float32)

        def forward(tv, ntv, x):
            x = x.astype(jnp.float32)
            x = x[..., ::-1] - mean if mode == "caffe" else x / 127.5 - 1.0  # what cnncodes' preprocessing does
            y, _ = model.stateless_call(tv, ntv, x, training=False)
            return jnp.mean(y.astype(jnp.float32), axis=(1, 2))

        fn = jax.jit(forward)
        x = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
        t0 = time.perf_counter()
        codes = np.asarray(fn(tv, ntv, x))
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            np.asarray(fn(tv, ntv, x))
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            codes = np.asarray(fn(tv, ntv, x))  # the pooled codes on the host, as extraction needs them
            n += batch
        rate = n / (time.perf_counter() - t)
        conv = [layer for layer in model.layers if "conv" in type(layer).__name__.lower()]
        return {"images_per_s": rate, "compile_s": compile_s, "codes_shape": list(codes.shape),
                "finite": bool(np.isfinite(codes).all()),
                "conv_compute_dtypes": sorted({layer.dtype_policy.compute_dtype for layer in conv})}
    finally:
        keras.config.set_dtype_policy("float32")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the summary here too")
    ap.add_argument("--dry-run", action="store_true", help="tiny counts: tries the script on any machine")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per raw figure")
    args = ap.parse_args()
    if args.dry_run:
        args.batch, args.images, args.seconds = 4, 32, 0.5
    size = 224
    started = time.perf_counter()
    out: dict = {"command": "KERAS_BACKEND=jax python3 benchmarks/gpu_keras_jax.py" + (" --dry-run" if args.dry_run else ""),
                 "batch": args.batch, "size": size, "device": device_info(), "raw": {}}
    print(json.dumps(out["device"], indent=1), file=sys.stderr, flush=True)
    for network in NETWORKS:
        out["raw"][network] = {}
        for precision in POLICIES:
            try:
                out["raw"][network][precision] = r = raw_rate(network, precision, args.batch, size, args.seconds)
                print(f"raw {network} {precision}: {r['images_per_s']:.0f} images/s", file=sys.stderr, flush=True)
            except Exception as exc:  # one failing precision must not lose the other figures
                out["raw"][network][precision] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                print(f"raw {network} {precision} failed: {exc}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = photos(Path(tmp), args.images)
        out["photos_generated_s"] = time.perf_counter() - t
        out["decode"] = decode_rates(data, size)
    r50 = out["raw"]["resnet50"]
    f16, f32 = r50.get("float16", {}).get("images_per_s"), r50.get("float32", {}).get("images_per_s")
    if f16 and f32:
        out["resnet50_float16_over_float32"] = f16 / f32
    if f16:
        dec = out["decode"]["all_cores"]
        out["resnet50_bound"] = {"decoder_over_raw_float16": dec / f16,
                                 "capped_by": "decoder" if dec < f16 else "gpu", "decode_in": out["decode"]["best"],
                                 "cores_to_feed_raw_float16": f16 / out["decode"]["one_core"]}
    out["seconds"] = time.perf_counter() - started
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
