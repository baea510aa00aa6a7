"""Building a backbone: a ``keras.applications`` constructor or a model file, cut at named layers,
in the requested precision, with seeded random weights or ImageNet weights from Keras's cache."""
from __future__ import annotations

import hashlib
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from storage.errors import BackboneError, ParameterError
from storage.store import POOLINGS as STORE_POOLINGS

# Poolings of a spectrogram's feature map over time only (its width): the frequency axis (its height) is kept,
# so where energy sits in frequency survives; each row of the map is averaged (or maxed) over time and the
# rows are concatenated (height x channels values). ``time-avgK`` averages K consecutive time segments
# (np.array_split of the columns) instead of the whole width: a word stretched to the image keeps the order
# of its parts (height x K x channels values, row by row, then segment, then channel).
TIME_POOLINGS = ("time-avg", "time-max", "time-avg2", "time-avg3", "time-avg4")
POOLINGS = tuple(STORE_POOLINGS) + TIME_POOLINGS


def time_segments(pooling: str) -> int | None:
    """How many time segments a time pooling keeps (1 for time-avg and time-max); None for other poolings."""
    if pooling not in TIME_POOLINGS:
        return None
    tail = pooling[len("time-avg"):] if pooling.startswith("time-avg") else ""
    return int(tail) if tail else 1


def segment_bounds(width: int, k: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``k`` consecutive segments of ``width`` columns, as ``np.array_split`` cuts them."""
    edges = np.cumsum([0] + [width // k + (i < width % k) for i in range(k)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

from .. import internals, runtime
from .catalog import suggest, backbone_info, is_model_file, preprocessing_of
from .spec import BackboneSpec


@dataclass
class LayerInfo:
    name: str
    kind: str
    output_shape: tuple
    params: int
    stride: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "output_shape": list(self.output_shape),
                "params": self.params, "stride": self.stride}


class Backbone:
    """A built Keras backbone plus what produced it."""

    def __init__(self, spec: BackboneSpec, model, size: int):
        self.spec = spec
        self.model = model
        self.size = size
        self._digest: str | None = None

    @property
    def weights_digest(self) -> str:
        """sha256 over the backbone's weight tensors (names and bytes, in order), the same on every backend and
        in every process: layers Keras named itself are named as a fresh process names them (the k-th
        ``Normalization`` of the model is ``normalization`` then ``normalization_1``, ...), whatever models the
        process built before (Keras numbers its own names across the process)."""
        if self._digest is None:
            canonical = _canonical_names(self.model)
            h = hashlib.sha256()
            for w in self.model.weights:
                path = w.path if hasattr(w, "path") else w.name
                layer, _, rest = path.partition("/")
                h.update((f"{canonical.get(layer, layer)}/{rest}" if rest else path).encode())
                h.update(np.ascontiguousarray(np.asarray(w.numpy(), dtype=np.float32)).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def identity(self) -> dict[str, Any]:
        ident = self.spec.identity()
        ident["input_size"] = self.size
        ident["weights_digest"] = self.weights_digest
        return ident

    def layers(self) -> list[LayerInfo]:
        out = []
        for layer in self.model.layers:
            try:
                shape = tuple(layer.output.shape)
            except (AttributeError, ValueError):
                shape = ()
            stride = None
            if len(shape) == 4 and shape[1]:
                stride = max(1, round(self.size / shape[1]))
            out.append(LayerInfo(layer.name, type(layer).__name__, shape, int(layer.count_params()), stride))
        return out

    def check_layers(self, layers: Sequence[str]) -> None:
        names = [layer.name for layer in self.model.layers]
        for name in layers:
            if name not in names:
                raise BackboneError(f"unknown layer {name!r} for {self.spec.name}.{suggest(name, names)} "
                                    f"`cnncodes layers {self.spec.name}` lists its {len(names)} layers "
                                    f"(the last one is {names[-1]!r}).")

    def output_shape(self, layer: str) -> tuple:
        return tuple(self.model.get_layer(layer).output.shape)


def _snake(name: str) -> str:
    """A class name as Keras makes a layer's own name of it (``BatchNormalization`` -> ``batch_normalization``)."""
    import re

    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _canonical_names(model) -> dict[str, str]:
    """Layers that Keras named itself (``<class>`` or ``<class>_<n>``), renamed as a fresh process would name them
    in this model: the first of a class keeps the bare name, the next ``_1``, and so on."""
    import re

    seen: dict[str, int] = {}
    out = {}
    for layer in model.layers:
        base = _snake(type(layer).__name__)
        if re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name):
            k = seen.get(base, 0)
            seen[base] = k + 1
            out[layer.name] = base if k == 0 else f"{base}_{k}"
    return out


def pooled_shape(shape: tuple, pooling: str, layer: str) -> tuple[int, ...]:
    """Feature shape per image after pooling a layer output of ``shape`` (batch first)."""
    if pooling not in POOLINGS:
        raise ParameterError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")
    dims = tuple(int(d) for d in shape[1:])
    if pooling in ("avg", "max"):
        if len(dims) != 3:
            raise ParameterError(f"layer {layer!r} outputs shape {dims}, not a spatial map, so pooling "
                                 f"{pooling!r} does not apply; use pooling 'none' or 'flatten'.")
        return (dims[-1],)
    if pooling in TIME_POOLINGS:
        if len(dims) != 3:
            raise ParameterError(f"layer {layer!r} outputs shape {dims}, not a spatial map, so pooling "
                                 f"{pooling!r} does not apply; use pooling 'none' or 'flatten'.")
        k = time_segments(pooling)
        if dims[1] < k:
            raise ParameterError(f"layer {layer!r}'s map is {dims[1]} columns wide, fewer than the {k} time "
                                 f"segments of pooling {pooling!r}; use an earlier layer or time-avg.")
        return (dims[0] * k * dims[2],)
    if pooling == "flatten":
        return (int(np.prod(dims)),)
    return dims


def preprocess_fn(spec: BackboneSpec):
    """The function that preprocesses float32 RGB in [0, 255] for ``spec`` (None: nothing to do)."""
    what, _ = preprocessing_of(spec)
    if what == "none":
        return None
    if what == "scale01":
        return lambda x: x / 255.0
    if what in ("tf", "caffe", "torch"):
        from keras.applications import imagenet_utils

        return lambda x: imagenet_utils.preprocess_input(x, mode=what)
    return getattr(runtime.keras().applications, what).preprocess_input


def build_backbone(spec: BackboneSpec, check_device: bool = True) -> Backbone:
    """Build the backbone of ``spec`` (headless, fixed square input), every layer computing in
    ``spec.precision`` ('auto' resolved for this machine). Raises BackboneError.

    ``check_device=False`` skips the check that the precision runs fast here (tests build
    float16 models on CPUs to inspect them)."""
    spec = spec.resolved()
    keras = runtime.keras()
    if check_device:
        runtime.check_precision(spec.precision)
    with runtime.precision_policy(spec.precision):
        if is_model_file(spec.name):
            model, size = _load_model_file(spec, keras)
        else:
            model, size = _build_application(spec, keras)
    return Backbone(spec, model, size)


def _load_model_file(spec: BackboneSpec, keras):
    try:
        model = keras.models.load_model(spec.name, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds here
        raise BackboneError(f"cannot load model file {spec.name}: {exc}") from exc
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise BackboneError(f"model file {spec.name} takes inputs of shape {shape[1:]}; cnncodes needs "
                            "(height, width, 3) RGB images.")
    fixed = shape[1] if shape[1] == shape[2] and shape[1] else None
    size = spec.input_size or fixed or 224
    if fixed and size != fixed:
        raise BackboneError(f"model file {spec.name} takes {fixed}x{fixed} inputs; input size {size} does not fit.")
    if spec.weights not in ("file", "none"):
        try:
            model.load_weights(spec.weights)
        except Exception as exc:  # noqa: BLE001
            raise BackboneError(f"cannot load weights {spec.weights} into {spec.name}: {exc}") from exc
    if spec.precision != "float32":
        model = _recast(model, keras)
    if not fixed:  # give the graph a fixed spatial size so layer shapes are known
        inp = keras.Input((size, size, 3))
        model = keras.Model(inp, model(inp))
    return model, size


def _recast(model, keras):
    """A loaded model rebuilt under the current (mixed) dtype policy with the same weights: a saved
    model's layers carry their own policy in their config, which the global policy does not override."""
    policy = keras.config.dtype_policy()

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    try:
        recast = keras.models.clone_model(model, clone_function=clone, recursive=True)
        recast.set_weights(model.get_weights())
    except Exception as exc:  # noqa: BLE001 - clone_model refuses some subclassed models
        raise BackboneError(f"model file cannot be rebuilt in precision {policy.name}: {exc}. "
                            "Use --precision float32 for this model.") from exc
    return recast


@contextmanager
def _seeded_init(seed: int | None):
    """Random initialisation that depends on ``seed`` alone. Keras draws each initializer's seed from
    Python's global ``random``, which other threads (Prefect, Dask) also consume: the same seed then
    gives other weights in a worker than in the main process. A private generator fixes that
    (:func:`tasks.internals.keras_python_random`)."""
    if seed is None:
        yield
        return
    runtime.keras().utils.set_random_seed(seed)
    with internals.keras_python_random(seed):
        yield


def _build_application(spec: BackboneSpec, keras):
    info = backbone_info(spec.name)
    size = spec.size
    ctor = getattr(keras.applications, info.constructor)
    weights = {"imagenet": "imagenet", "none": None}.get(spec.weights, spec.weights)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a missing weights file must fail, not hang
    try:
        with _seeded_init(spec.seed if weights is None else None):
            model = ctor(include_top=False, weights=weights, input_shape=(size, size, 3), **spec.backbone_args)
    except ValueError as exc:
        raise BackboneError(f"{spec.name} cannot be built with input size {size}, weights {spec.weights!r} and "
                            f"arguments {spec.backbone_args}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a failed download surfaces as a bare Exception
        if spec.weights == "imagenet":
            home = internals.keras_home()
            raise BackboneError(
                f"the ImageNet weights of {spec.name} (input {size}, {spec.backbone_args or 'default arguments'}) "
                f"are not in Keras's cache ({home}/models) and could not be downloaded: {exc}. "
                "Copy the weights file there (or set KERAS_HOME to a folder holding models/<file>), "
                "run once with network access, or use --weights none / a weights file.") from exc
        raise BackboneError(f"cannot build {spec.name}: {exc}") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    return model, size


def imagenet_weights_available(spec: BackboneSpec) -> bool:
    """Whether ``spec`` builds with ImageNet weights here (cached under KERAS_HOME, or downloadable)."""
    try:
        build_backbone(BackboneSpec(name=spec.name, weights="imagenet", input_size=spec.input_size,
                                    backbone_args=dict(spec.backbone_args)))
        return True
    except BackboneError:
        return False
