"""Would padding a run's short last batch pay on JAX? One XLA compilation against a batch of padding rows.

XLA compiles the forward pass once per batch shape. An extraction of N images in batches of B ends with a batch of
N mod B images, which compiles once more. Padding it to B rows would reuse the B-row program at the price of the
padding rows' arithmetic. This measures both, side by side in one process on JAX, for each network (random
weights, 224 px), with the forward pass cnncodes' Extractor compiles on JAX (preprocessing, network, average
pooling, one jax.jit over the model's stateless call):

  * ``compiled_s``  the short batch at its own shape, the first time (a compilation, then the batch): what cnncodes
                    pays;
  * ``padded_s``    the short batch padded to B rows on the already compiled B-row program: what padding would pay;
  * ``extract_s``   a whole pass over N images in batches of B (the first batch compiles; the last one too): the
                    share of the command that the difference is.

Usage:
    KERAS_BACKEND=jax .venv/bin/python benchmarks/jax_last_batch.py --json benchmarks/results/jax-last-batch-cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from report import emit  # noqa: E402


def measure(name: str, n: int, batch: int, size: int) -> dict:
    import jax
    from keras import ops

    from tasks.backbones import BackboneSpec, build_backbone
    from tasks.backbones.build import preprocess_fn

    bb = build_backbone(BackboneSpec(name=name, weights="none", input_size=size, precision="float32"))
    model, prep = bb.model, preprocess_fn(bb.spec)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def compiled():
        """A new jit-compiled forward pass: a new function, so JAX's caches hold nothing compiled for it."""
        def forward(tv, ntv, x):
            x = ops.cast(x, "float32")
            x = prep(x) if prep is not None else x
            y, _ = model.stateless_call(tv, ntv, x, training=False)
            return ops.mean(ops.cast(y, "float32"), axis=(1, 2))

        return jax.jit(forward)

    def timed(fn, x) -> float:
        t = time.perf_counter()
        np.asarray(fn(tv, ntv, x))
        return time.perf_counter() - t

    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    short = images[: n % batch]
    run = compiled()
    extract_s = sum(timed(run, images[i:i + batch]) for i in range(0, n, batch))  # compiles B, then the last shape
    padded = np.concatenate([short, np.zeros((batch - len(short), size, size, 3), np.uint8)])
    padded_s = timed(run, padded)
    compiled_s = timed(compiled(), short)  # the short shape compiled anew, then run
    return {"network": name, "images": n, "batch": batch, "short": len(short), "extract_s": extract_s,
            "compiled_s": compiled_s, "padded_s": padded_s, "padding_saves_s": compiled_s - padded_s,
            "padding_saves_share": (compiled_s - padded_s) / extract_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import jax

    out = {"command": "KERAS_BACKEND=jax .venv/bin/python benchmarks/jax_last_batch.py", "jax": jax.__version__,
           "device": str(jax.devices()[0]), "cpu_cores": os.cpu_count(),
           "networks": {name: measure(name, a.images, a.batch, a.size) for name in ("mobilenet_v2", "resnet50")}}
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
