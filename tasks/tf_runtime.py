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
PRECISIONS = ("float32", "bfloat16", "float16")


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


def check_precision(precision: str) -> None:
    """Raise ParameterError when ``precision`` cannot run fast on this machine."""
    if precision not in PRECISIONS:
        raise ParameterError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    if precision == "float16" and not gpus():
        raise ParameterError("precision 'float16' (mixed float16) needs a GPU and none was found; "
                             "use --precision float32, or bfloat16 on a CPU with AVX512-BF16/AMX.")
    if precision == "bfloat16" and not gpus() and not cpu_supports_bfloat16():
        raise ParameterError("precision 'bfloat16' needs a GPU or a CPU with AVX512-BF16 or AMX "
                             "(this one has neither, so it would be slower than float32); use --precision float32.")


def policy_name(precision: str) -> str:
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]


def device_name() -> str:
    g = gpus()
    return f"GPU ({len(g)})" if g else "CPU"
