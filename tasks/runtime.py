"""The Keras backend this process computes on (TensorFlow, JAX or PyTorch), imported quietly, and what the
machine offers it: GPUs, precisions, pinning.

The backend is chosen by Keras's own convention: ``KERAS_BACKEND``, else the ``backend`` of ``keras.json`` (in
``KERAS_HOME``, default ``~/.keras``), else TensorFlow. Every command's ``--backend`` sets ``KERAS_BACKEND``
before Keras is imported (:func:`use_backend`); once Keras is imported the backend is fixed for the process,
and asking for another is an error that says so. Nothing here imports TensorFlow unless the backend is
TensorFlow or a caller asks for it by name (:func:`tensorflow`: SavedModel and TFLite exports).

TensorFlow 2.21 prints several lines to stderr on import (oneDNN notice, "Could not find cuda drivers", a
cuInit error on machines without a GPU) before its logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot
silence them. :func:`tensorflow` captures stderr at the file-descriptor level while TF imports and initialises
its devices, drops the lines known to be noise, and writes every other line back: real errors are never hidden.
"""
from __future__ import annotations

import importlib.util
import json
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
# The Keras backends cnncodes runs on; each is also the name of the module it needs.
BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_BACKEND = "tensorflow"
DISPLAY = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
CUDA_BUILD = {"tensorflow": "tensorflow[and-cuda] (pip install 'cnncodes[gpu]')", "jax": "jax[cuda12] or jax[cuda13]",
              "torch": "a CUDA build of torch"}
# One precision vocabulary for every flow. "auto": mixed float16 where the backend sees a GPU, float32 elsewhere.
PRECISIONS = ("float32", "float16", "bfloat16", "auto")
CONCRETE_PRECISIONS = ("float32", "float16", "bfloat16")
_pinned_gpu: int | None = None


def gpu_hardware_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def _keras_json_backend() -> str | None:
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        return json.loads(Path(home, "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def configured_backend() -> str:
    """The backend Keras will use (or uses): ``KERAS_BACKEND``, else keras.json's, else TensorFlow."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND") or _keras_json_backend() or DEFAULT_BACKEND


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ParameterError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}.")
    return name


def use_backend(name: str | None) -> str:
    """Make ``name`` this process's Keras backend (None: keep the configured one); returns the backend.

    Before Keras is imported this sets ``KERAS_BACKEND``. After, the backend is fixed: asking for another
    raises ParameterError, since one process computes on one backend (start another process, e.g. a
    Prefect worker or a Dask worker with ``KERAS_BACKEND`` set)."""
    if name is None:
        return check_backend_name(configured_backend())
    check_backend_name(name)
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != name:
            raise ParameterError(
                f"this process already computes on the {current} backend and cannot switch to {name}: Keras picks "
                f"its backend once per process. Run the command in a new process with --backend {name} (or "
                f"KERAS_BACKEND={name}), or start the worker that runs it with KERAS_BACKEND={name}.")
        return name
    os.environ["KERAS_BACKEND"] = name
    return name


def backend_installed(name: str) -> bool:
    return importlib.util.find_spec(check_backend_name(name)) is not None


def _missing_backend(name: str, why: str = "") -> ParameterError:
    others = [b for b in BACKENDS if b != name and backend_installed(b)]
    return ParameterError(
        f"the {name} backend is not installed{why}: pip install 'cnncodes[{name}]'"
        + (f", or use one that is installed: --backend {' or --backend '.join(others)} (or KERAS_BACKEND)."
           if others else "."))


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


def tensorflow(needed_for: str = ""):
    """Import TensorFlow (once), quietly, with its devices initialised; returns the module.

    ``needed_for`` names what needs it (e.g. "a SavedModel export"): where TensorFlow is not installed the
    error says so and how to get it."""
    global _tf
    if _tf is not None:
        return _tf
    if not backend_installed("tensorflow"):
        raise ParameterError(f"{needed_for or 'this'} needs TensorFlow, which is not installed here: pip install "
                             "'cnncodes[tensorflow]' (it runs on any backend's machine beside JAX or PyTorch), or "
                             "do it on a machine that has TensorFlow.")
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
    """Import Keras on the configured backend (TensorFlow quietly first when that is the backend)."""
    if "keras" in sys.modules:
        import keras as _keras

        return _keras
    name = check_backend_name(configured_backend())
    if not backend_installed(name):
        raise _missing_backend(name, " (KERAS_BACKEND, keras.json or --backend chose it)")
    if name == "tensorflow":
        tensorflow()
    os.environ["KERAS_BACKEND"] = name
    import keras as _keras

    return _keras


def backend() -> str:
    """The backend this process computes on (Keras imported on it)."""
    return keras().backend.backend()


def library_versions() -> dict[str, str]:
    """The backend this process computes on and the versions of it and of Keras (for provenance)."""
    name = backend()
    module = sys.modules.get(name) or importlib.import_module(name)
    return {"backend": name, name: getattr(module, "__version__", "unknown"), "keras": keras().__version__}


def gpus() -> list:
    """The GPUs the backend sees in this process (names; empty on a CPU)."""
    name = backend()
    if name == "tensorflow":
        return [d.name for d in tensorflow().config.list_physical_devices("GPU")]
    if name == "jax":
        import jax

        try:
            return [str(d) for d in jax.devices("gpu")]
        except RuntimeError:  # no GPU platform in this jaxlib
            return []
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def cpu_supports_bfloat16() -> bool:
    """Native bfloat16 matrix units (AVX512-BF16 or AMX) on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``float16`` where the backend sees a GPU, ``float32`` elsewhere; others unchanged."""
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

    Before TensorFlow is imported this sets ``CUDA_VISIBLE_DEVICES``, which every backend honours (JAX and
    PyTorch read it when they first touch CUDA; :func:`check_pinned` verifies). After, it asks TensorFlow to
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
                "A backend picks its devices once per process. Start one worker per GPU (--workers equal to "
                "--gpus, the default), or start each Dask worker with its own CUDA_VISIBLE_DEVICES.")
        return
    if "tensorflow" not in sys.modules or configured_backend() != "tensorflow":
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
    """After :func:`pin_gpu`: assert that the backend sees exactly one GPU; returns what it sees."""
    name = backend()
    visible = ([d.name for d in tensorflow().config.get_visible_devices("GPU")] if name == "tensorflow"
               else gpus())
    if len(visible) != 1:
        raise ParameterError(
            f"this worker was pinned to GPU {index} but {DISPLAY[name]} sees {len(visible)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            + (f"No GPU is visible: install {CUDA_BUILD[name]} and check nvidia-smi, or run without --gpus."
               if not visible else
               "Set CUDA_VISIBLE_DEVICES per worker, or let cnncodes start the workers (--gpus without "
               "--dask-address)."))
    return {"gpu": index, "visible": visible,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def device_name() -> str:
    g = gpus()
    return f"GPU ({len(g)})" if g else "CPU"
