"""Importing TensorFlow quietly, and what the machine offers it.

TensorFlow 2.21 prints several lines to stderr on import (oneDNN notice,
"Could not find cuda drivers", a cuInit error on machines without a GPU)
before its logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence them.
:func:`tensorflow` captures stderr at the file-descriptor level while TF
imports and initialises its devices, drops the lines known to be noise, and
writes every other line back: real errors are never hidden.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from storage.errors import ParameterError

_NOISE = [re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers on your machine",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"absl::InitializeLog",
)]
# Without GPU hardware this error is only TensorFlow probing for one.
_NO_GPU_NOISE = re.compile(r"failed call to cuInit")

_tf = None
# One precision vocabulary for every flow. "auto": mixed float16 where TensorFlow sees a GPU, float32 elsewhere.
PRECISIONS = ("float32", "float16", "bfloat16", "auto")
CONCRETE_PRECISIONS = ("float32", "float16", "bfloat16")
_pinned_gpu: int | None = None


def gpu_hardware_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


@contextmanager
def _captured_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines(keepends=True))


def _is_noise(line: str) -> bool:
    if any(p.search(line) for p in _NOISE):
        return True
    return bool(_NO_GPU_NOISE.search(line)) and not gpu_hardware_present()


def tensorflow():
    """Import TensorFlow (once), quietly, with its devices initialised; returns the module."""
    global _tf
    if _tf is not None:
        return _tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ok = False
    captured: list[str] = []
    try:
        with _captured_stderr() as captured:
            import tensorflow as tf

            tf.config.list_physical_devices()
            ok = True
    finally:
        for line in captured:
            if not ok or not _is_noise(line):
                sys.stderr.write(line)
    # Each Extractor compiles its own forward pass on purpose; TF's retracing advice does not apply.
    logging.getLogger("tensorflow").addFilter(lambda r: "triggered tf.function retracing" not in r.getMessage())
    _tf = tf
    return tf


def keras():
    tensorflow()
    import keras as _keras

    return _keras


def gpus() -> list:
    return tensorflow().config.list_physical_devices("GPU")


def cpu_supports_bfloat16() -> bool:
    """Native bfloat16 matrix units (AVX512-BF16 or AMX) on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``float16`` where TensorFlow sees a GPU, ``float32`` elsewhere; others unchanged."""
    if precision not in PRECISIONS:
        raise ParameterError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "auto":
        return "float16" if gpus() else "float32"
    return precision


def check_precision(precision: str) -> None:
    """Raise ParameterError when ``precision`` cannot run fast on this machine."""
    precision = resolve_precision(precision)
    if precision == "float16" and not gpus():
        raise ParameterError("precision 'float16' (mixed float16) needs a GPU and none was found; "
                             "use --precision float32 (or auto), or bfloat16 on a CPU with AVX512-BF16/AMX.")
    if precision == "bfloat16" and not gpus() and not cpu_supports_bfloat16():
        raise ParameterError("precision 'bfloat16' needs a GPU or a CPU with AVX512-BF16 or AMX "
                             "(this one has neither, so it would be slower than float32); use --precision float32.")


def policy_name(precision: str) -> str:
    """The Keras dtype policy of a concrete precision: variables stay float32 under both mixed policies."""
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]


@contextmanager
def precision_policy(precision: str):
    """Build layers under ``precision``'s dtype policy (Keras reads the global policy when a layer is
    made), then restore the caller's: every layer made inside computes in that precision."""
    keras_ = keras()
    previous = keras_.config.dtype_policy()
    keras_.config.set_dtype_policy(policy_name(resolve_precision(precision)))
    try:
        yield
    finally:
        keras_.config.set_dtype_policy(previous)


def pin_gpu(index: int) -> None:
    """Make GPU ``index`` of this machine the only one this process uses, or raise a clear error.

    Before TensorFlow is imported this sets ``CUDA_VISIBLE_DEVICES``. After, it asks TensorFlow to
    hide the other GPUs, which works only until TensorFlow has initialised its devices: a worker
    whose TensorFlow already runs (it ran another task first) cannot move to another GPU, and
    sharing GPU 0 silently would halve every shard's speed, so that is an error. Pinning the same
    process twice to the same GPU is fine (one worker running several shards)."""
    global _pinned_gpu
    if not isinstance(index, int) or index < 0:
        raise ParameterError(f"a GPU index must be an integer >= 0; got {index!r}.")
    if _pinned_gpu is not None:
        if _pinned_gpu != index:
            raise ParameterError(
                f"this worker process is already pinned to GPU {_pinned_gpu} and cannot move to GPU {index}: "
                "TensorFlow picks its devices once per process. Start one worker per GPU (--workers equal to "
                "--gpus, the default), or start each Dask worker with its own CUDA_VISIBLE_DEVICES.")
        return
    if "tensorflow" not in sys.modules:
        # Indices count the GPUs this process may see: within a CUDA_VISIBLE_DEVICES the user set, if any.
        allowed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if allowed and index >= len(allowed):
            raise ParameterError(f"GPU {index} was asked for, but CUDA_VISIBLE_DEVICES={','.join(allowed)} "
                                 f"allows {len(allowed)} GPU(s); give --gpus at most {len(allowed)}.")
        os.environ["CUDA_VISIBLE_DEVICES"] = allowed[index] if allowed else str(index)
        _pinned_gpu = index
        return
    tf = tensorflow()
    physical = tf.config.list_physical_devices("GPU")
    if index >= len(physical):
        raise ParameterError(f"GPU {index} was asked for, but TensorFlow sees {len(physical)} GPU(s) in this "
                             f"process (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                             "Give --gpus at most the number of GPUs, and install tensorflow[and-cuda] "
                             "(pip install 'cnncodes[gpu]') so that TensorFlow finds them.")
    try:
        tf.config.set_visible_devices([physical[index]], "GPU")
    except RuntimeError as exc:
        raise ParameterError(
            f"cannot pin this worker to GPU {index}: TensorFlow already initialised its devices in this process "
            f"({exc}). A shared GPU would silently halve every shard's speed. Start workers fresh, one per GPU "
            "(the default for --gpus), or set CUDA_VISIBLE_DEVICES for each worker when starting it.") from exc
    _pinned_gpu = index


def pinned_gpu() -> int | None:
    return _pinned_gpu


def check_pinned(index: int) -> dict:
    """After :func:`pin_gpu`: assert that TensorFlow sees exactly one GPU; returns what it sees."""
    tf = tensorflow()
    visible = tf.config.get_visible_devices("GPU")
    if len(visible) != 1:
        raise ParameterError(
            f"this worker was pinned to GPU {index} but TensorFlow sees {len(visible)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            + ("No GPU is visible: install tensorflow[and-cuda] (pip install 'cnncodes[gpu]') and check "
               "nvidia-smi, or run without --gpus." if not visible else
               "Set CUDA_VISIBLE_DEVICES per worker, or let cnncodes start the workers (--gpus without "
               "--dask-address)."))
    return {"gpu": index, "visible": [d.name for d in visible],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def device_name() -> str:
    g = gpus()
    return f"GPU ({len(g)})" if g else "CPU"
