"""Backbones: a registry over ``keras.applications``, cut at named layers.

Names are the Keras constructor names in snake case (``resnet50``,
``mobilenet_v2``, ``efficientnet_b0``, ``convnext_tiny``...); a path to a
``.keras``/``.h5`` model file is a backbone too. Each registry entry knows its
constructor, its family's ``preprocess_input`` and its input sizes. The exact
Keras layer names are the vocabulary of cut points.

Nothing here imports TensorFlow at module import time: the registry can be
listed and parameters validated without it.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import os
import random
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

import numpy as np

from storage.errors import BackboneError, ParameterError
from storage.hashing import file_sha256
from storage.store import POOLINGS

from . import tf_runtime
from .settings import Settings


@dataclass(frozen=True)
class BackboneInfo:
    """What cnncodes knows about one ``keras.applications`` constructor."""

    name: str
    constructor: str
    module: str            # keras.applications submodule holding preprocess_input
    default_size: int
    min_size: int
    builtin_preprocessing: bool = False   # the model rescales its own input (EfficientNet, ConvNeXt, MobileNetV3)
    options: tuple[str, ...] = ()         # constructor options that may be passed through

    @property
    def preprocessing(self) -> str:
        return f"keras.applications.{self.module}.preprocess_input"


def _entries() -> dict[str, BackboneInfo]:
    e: list[BackboneInfo] = [
        BackboneInfo("vgg16", "VGG16", "vgg16", 224, 32),
        BackboneInfo("vgg19", "VGG19", "vgg19", 224, 32),
        BackboneInfo("xception", "Xception", "xception", 299, 71),
        BackboneInfo("inception_v3", "InceptionV3", "inception_v3", 299, 75),
        BackboneInfo("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 75),
        BackboneInfo("mobilenet", "MobileNet", "mobilenet", 224, 32, options=("alpha", "depth_multiplier", "dropout")),
        BackboneInfo("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 32, options=("alpha",)),
        BackboneInfo("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 32, True, ("alpha", "minimalistic")),
        BackboneInfo("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 32, True, ("alpha", "minimalistic")),
        BackboneInfo("nasnet_mobile", "NASNetMobile", "nasnet", 224, 32),
        BackboneInfo("nasnet_large", "NASNetLarge", "nasnet", 331, 32),
    ]
    for depth in (50, 101, 152):
        e.append(BackboneInfo(f"resnet{depth}", f"ResNet{depth}", "resnet", 224, 32))
        e.append(BackboneInfo(f"resnet{depth}_v2", f"ResNet{depth}V2", "resnet_v2", 224, 32))
    for depth in (121, 169, 201):
        e.append(BackboneInfo(f"densenet{depth}", f"DenseNet{depth}", "densenet", 224, 32))
    for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600)):
        e.append(BackboneInfo(f"efficientnet_b{i}", f"EfficientNetB{i}", "efficientnet", size, 32, True))
    for suffix, size in (("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300), ("s", 384), ("m", 480), ("l", 480)):
        e.append(BackboneInfo(f"efficientnet_v2_{suffix}", f"EfficientNetV2{suffix.upper()}", "efficientnet_v2",
                              size, 32, True, ("include_preprocessing",)))
    for size in ("tiny", "small", "base", "large", "xlarge"):
        e.append(BackboneInfo(f"convnext_{size}", f"ConvNeXt{size.capitalize()}", "convnext", 224, 32, True,
                              ("include_preprocessing",)))
    return {b.name: b for b in e}


REGISTRY: dict[str, BackboneInfo] = _entries()
# Preprocessing that can be named explicitly (for a user's own model, or to override).
PREPROCESSING_MODES = ("auto", "none", "tf", "caffe", "torch", "scale01")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def is_model_file(name: str) -> bool:
    return str(name).lower().endswith(MODEL_SUFFIXES)


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry of ``name``; BackboneError listing the choices if unknown."""
    if name in REGISTRY:
        return REGISTRY[name]
    raise BackboneError(f"unknown backbone {name!r}.{_suggest(name, list(REGISTRY))} Known backbones: "
                        f"{', '.join(list_backbones())}; or give the path of a .keras/.h5 model file. "
                        "`cnncodes backbones` lists them.")


def parse_backbone_args(items: Sequence[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["alpha=0.25", "minimalistic=True"]`` -> ``{"alpha": 0.25, "minimalistic": True}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ParameterError(f"backbone argument {item!r} is not KEY=VALUE (for example alpha=0.25).")
        key, raw = item.split("=", 1)
        key, raw = key.strip(), raw.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        out[key] = value
    return out


class BackboneSpec(Settings):
    """Everything needed to rebuild the same backbone; recorded as provenance.

    A bare string is a backbone name (``"resnet50"`` as a flow parameter means
    ``{"name": "resnet50"}``). Weights spelled ``none``/``null``/``random`` mean ``"none"``, and a
    model file asked for ``imagenet`` weights uses the weights inside it (``"file"``): both are
    settled at construction, so the object never changes afterwards."""

    name: str = Field("mobilenet_v2", description="registered backbone (`cnncodes backbones` lists them) or a "
                                                   ".keras/.h5 model file")
    weights: str = Field("imagenet", description="'imagenet' (through Keras's cache, KERAS_HOME), 'none' (random, "
                                                 "seeded), or a weights file")
    input_size: int | None = Field(None, description="square input size in pixels (default: the backbone's own, "
                                                     "e.g. 224)")
    backbone_args: dict[str, Any] = Field(default_factory=dict, description="constructor options passed through, "
                                                                             "e.g. alpha=0.25 (recorded in the store)")
    preprocessing: str = Field("auto", description="'auto' (the family's preprocess_input), 'none', 'tf', 'caffe', "
                                                   "'torch', 'scale01', or a keras.applications module name")
    precision: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        "auto", description="compute precision of the whole network: float32; float16 (mixed, GPUs); bfloat16 "
                            "(GPUs and CPUs with AVX512-BF16/AMX); auto = float16 on a GPU, float32 on a CPU")
    seed: int = Field(0, description="initialisation seed for weights 'none'")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        w = str(data.get("weights", "imagenet"))
        if w.lower() in ("none", "null", "random"):
            data["weights"] = "none"
        elif w == "imagenet" and is_model_file(str(data.get("name", ""))):
            data["weights"] = "file"  # the model file carries its own weights
        if data.get("backbone_args") is None:
            data["backbone_args"] = {}
        return data

    @model_validator(mode="after")
    def _check(self) -> "BackboneSpec":
        """Everything that can be checked without TensorFlow."""
        if self.preprocessing not in PREPROCESSING_MODES and self.preprocessing not in {
                b.module for b in REGISTRY.values()}:
            raise ParameterError(f"preprocessing must be one of {PREPROCESSING_MODES} or a keras.applications "
                                 f"module name (e.g. 'resnet', 'mobilenet_v2'); got {self.preprocessing!r}.")
        w = self.weights
        if w == "file" and not is_model_file(self.name):
            raise ParameterError("weights 'file' means the weights inside a model file; give a weights file path.")
        if w not in ("imagenet", "file", "none") and not Path(w).is_file():
            raise ParameterError(f"weights must be 'imagenet', 'none' or an existing weights file; "
                                 f"{w!r} is neither (no such file).")
        if is_model_file(self.name):
            if not Path(self.name).is_file():
                raise BackboneError(f"model file {self.name} does not exist.")
            if self.backbone_args:
                raise ParameterError("backbone arguments only apply to keras.applications backbones, "
                                     f"not to a model file ({self.name}).")
            return self
        info = backbone_info(self.name)
        unknown = sorted(set(self.backbone_args) - set(info.options))
        if unknown:
            allowed = ", ".join(info.options) or "none"
            raise ParameterError(f"{self.name} does not take backbone argument(s) {unknown}; it takes: {allowed}.")
        if self.input_size is not None and self.input_size < info.min_size:
            raise BackboneError(f"{self.name} cannot take input size {self.input_size!r}: the smallest it "
                                f"accepts is {info.min_size} (default {info.default_size}).")
        return self

    def resolved(self) -> "BackboneSpec":
        """This spec with ``precision`` 'auto' replaced by what it means on this machine (imports
        TensorFlow only then): stores and models record the precision that actually ran."""
        if self.precision != "auto":
            return self
        return self.model_copy(update={"precision": tf_runtime.resolve_precision(self.precision)})

    @property
    def size(self) -> int | None:
        if self.input_size is not None:
            return int(self.input_size)
        return None if is_model_file(self.name) else backbone_info(self.name).default_size

    def preprocessing_name(self) -> str:
        if self.preprocessing != "auto":
            if self.preprocessing in PREPROCESSING_MODES:
                return {"none": "none", "scale01": "x/255",
                        "tf": "imagenet_utils.preprocess_input(mode='tf')",
                        "caffe": "imagenet_utils.preprocess_input(mode='caffe')",
                        "torch": "imagenet_utils.preprocess_input(mode='torch')"}[self.preprocessing]
            return f"keras.applications.{self.preprocessing}.preprocess_input"
        if is_model_file(self.name):
            return "none"
        info = backbone_info(self.name)
        if info.builtin_preprocessing and self.backbone_args.get("include_preprocessing", True) is not False:
            return f"built into the model ({info.preprocessing} is the identity)"
        return info.preprocessing

    def identity(self) -> dict[str, Any]:
        """The configuration part of a store's identity (the weights digest is added once built)."""
        weights = self.weights
        if weights not in ("imagenet", "none", "file"):
            weights = f"file:{file_sha256(weights)}"
        name = self.name
        if is_model_file(name):
            name = f"model-file:{file_sha256(name)}"
        return {"backbone": name, "backbone_args": dict(sorted(self.backbone_args.items())),
                "weights": weights, "init_seed": self.seed if weights == "none" else None,
                "input_size": self.size, "preprocessing": self.preprocessing_name(),
                "precision": self.precision}


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
        """sha256 over the backbone's weight tensors (names and bytes, in order)."""
        if self._digest is None:
            h = hashlib.sha256()
            for w in self.model.weights:
                h.update(w.path.encode() if hasattr(w, "path") else w.name.encode())
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
                raise BackboneError(f"unknown layer {name!r} for {self.spec.name}.{_suggest(name, names)} "
                                    f"`cnncodes layers {self.spec.name}` lists its {len(names)} layers "
                                    f"(the last one is {names[-1]!r}).")

    def output_shape(self, layer: str) -> tuple:
        return tuple(self.model.get_layer(layer).output.shape)


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
    if pooling == "flatten":
        return (int(np.prod(dims)),)
    return dims


def _preprocess_fn(spec: BackboneSpec):
    keras = tf_runtime.keras()
    p = spec.preprocessing
    if p == "auto":
        if is_model_file(spec.name):
            return None
        info = backbone_info(spec.name)
        if info.builtin_preprocessing:
            return None
        p = info.module
    if p == "none":
        return None
    if p == "scale01":
        return lambda x: x / 255.0
    if p in ("tf", "caffe", "torch"):
        from keras.applications import imagenet_utils

        return lambda x: imagenet_utils.preprocess_input(x, mode=p)
    return getattr(keras.applications, p).preprocess_input


def build_backbone(spec: BackboneSpec, check_device: bool = True) -> Backbone:
    """Build the backbone of ``spec`` (headless, fixed square input), every layer computing in
    ``spec.precision`` ('auto' resolved for this machine). Raises BackboneError.

    ``check_device=False`` skips the check that the precision runs fast here (tests build
    float16 models on CPUs to inspect them)."""
    spec = spec.resolved()
    keras = tf_runtime.keras()
    if check_device:
        tf_runtime.check_precision(spec.precision)
    with tf_runtime.precision_policy(spec.precision):
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
    gives other weights in a worker than in the main process. A private generator fixes that."""
    if seed is None:
        yield
        return
    keras = tf_runtime.keras()
    from keras.src.random import seed_generator

    keras.utils.set_random_seed(seed)
    shared = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


def _keras_home() -> str:
    """The folder Keras caches weights in (read from KERAS_HOME when Keras was imported)."""
    try:
        from keras.src.backend import config

        return str(config.keras_home())
    except (ImportError, AttributeError):
        return os.environ.get("KERAS_HOME", str(Path.home() / ".keras"))


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
            home = _keras_home()
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
        build_backbone(BackboneSpec(spec.name, "imagenet", spec.input_size, dict(spec.backbone_args)))
        return True
    except BackboneError:
        return False


class Extractor:
    """A backbone cut at several layers, each pooled, as one compiled forward pass.

    ``extractor(batch_uint8)`` takes ``(n, size, size, 3)`` uint8 RGB and
    returns one float32 array per (layer, pooling), in the order given.
    """

    def __init__(self, backbone: Backbone, cuts: Sequence[tuple[str, str]], xla: bool = False):
        tf = tf_runtime.tensorflow()
        keras = tf_runtime.keras()
        self.backbone = backbone
        self.cuts = list(cuts)
        backbone.check_layers([layer for layer, _ in self.cuts])
        layers = list(dict.fromkeys(layer for layer, _ in self.cuts))
        self.shapes = [pooled_shape(backbone.output_shape(layer), pooling, layer) for layer, pooling in self.cuts]
        model = backbone.model
        cut = keras.Model(model.inputs, [model.get_layer(layer).output for layer in layers])
        self.model = cut  # the network that runs: its layers compute in the backbone's precision
        where = {layer: i for i, layer in enumerate(layers)}
        pre = _preprocess_fn(backbone.spec)
        cuts_ = self.cuts
        self.images_seen = 0  # rows that went through the backbone: what incremental runs are judged by

        # jit_compile: XLA fuses the pooling and casts into the network's kernels (GPUs gain most).
        @tf.function(input_signature=[tf.TensorSpec([None, backbone.size, backbone.size, 3], tf.uint8)],
                     jit_compile=bool(xla))
        def forward(x):
            x = tf.cast(x, tf.float32)
            if pre is not None:
                x = pre(x)
            outs = cut(x, training=False)
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            res = []
            for layer, pooling in cuts_:
                y = tf.cast(outs[where[layer]], tf.float32)
                if pooling == "avg":
                    y = tf.reduce_mean(y, axis=[1, 2])
                elif pooling == "max":
                    y = tf.reduce_max(y, axis=[1, 2])
                elif pooling == "flatten":
                    y = tf.reshape(y, [tf.shape(y)[0], -1])
                res.append(y)
            return res

        self._forward = forward
        # Trace and optimise the graph now, on one image, so that the cost lands in the build
        # and the first real batch runs at full speed.
        forward(tf.zeros([1, backbone.size, backbone.size, 3], tf.uint8))

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.images_seen += int(batch.shape[0])
        return [o.numpy() for o in self._forward(batch)]
