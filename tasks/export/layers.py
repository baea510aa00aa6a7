"""The exported network in standard Keras layers only (no Lambda, no layer of cnncodes'): what a
plain ``keras.saving.load_model`` or TensorFlow Serving runs without cnncodes installed.

- :func:`preprocess_layer`: a family's ``preprocess_input`` as a fixed 1x1 convolution (per-channel
  scale and offset; caffe's RGB->BGR flip is a permutation of the kernel);
- :func:`pooling_layer`: the store's pooling (avg, max, flatten, none, and the time poolings of spectrograms);
- :func:`head_layers`: a folded probe (:class:`~.fold.Head`) as Dense, UnitNormalization, softplus,
  Rescaling, Reshape, Softmax and GlobalAveragePooling1D layers;
- :func:`standard_only`: the check that a model's serialised form names no custom object.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import runtime
from ..backbones import TIME_POOLINGS, segment_bounds, time_segments
from .fold import Affine, ExportError, Head, L2

# The per-channel affine map of each preprocessing mode, on RGB in [0, 255]: out = x[perm] * scale + offset
_TORCH_MEAN, _TORCH_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])
PREPROCESSING_TEXT = {
    "none": "none: the network takes RGB in [0, 255] as it is",
    "scale01": "x / 255",
    "tf": "x / 127.5 - 1 (keras.applications 'tf' mode)",
    "torch": "(x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] (keras.applications 'torch' mode)",
    "caffe": "RGB -> BGR, then minus [103.939, 116.779, 123.68] (keras.applications 'caffe' mode)",
}


def preprocess_affine(mode: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(kernel 3x3, bias 3)`` with ``out = x @ kernel + bias`` for a preprocessing mode; None for 'none'."""
    if mode == "none":
        return None
    if mode == "scale01":
        return np.diag(np.full(3, 1 / 255.0)), np.zeros(3)
    if mode == "tf":
        return np.diag(np.full(3, 1 / 127.5)), -np.ones(3)
    if mode == "torch":
        return np.diag(1.0 / (255.0 * _TORCH_STD)), -_TORCH_MEAN / _TORCH_STD
    if mode == "caffe":
        kernel = np.zeros((3, 3))
        for out_c in range(3):  # BGR channel out_c is RGB channel 2 - out_c
            kernel[2 - out_c, out_c] = 1.0
        return kernel, -_CAFFE_MEAN_BGR
    raise ExportError(f"preprocessing mode {mode!r} has no layer form (known: {', '.join(PREPROCESSING_TEXT)}).")


def preprocess_layer(mode: str, name: str = "preprocess"):
    """The mode as a frozen 1x1 Conv2D, or None for 'none'. Call it on a float32 image tensor."""
    keras = runtime.keras()
    aff = preprocess_affine(mode)
    if aff is None:
        return None
    kernel, bias = aff
    layer = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, dtype="float32", name=name)
    layer.build((None, None, None, 3))
    layer.set_weights([kernel.reshape(1, 1, 3, 3).astype(np.float32), bias.astype(np.float32)])
    return layer


def pooling_layer(pooling: str, name: str = "pool"):
    """The store's pooling of a layer output as a standard layer; ExportError for an unknown one."""
    keras = runtime.keras()
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(dtype="float32", name=name)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(dtype="float32", name=name)
    if pooling in ("flatten", "none"):  # 'none' keeps the shape; the probe saw it flattened
        return keras.layers.Flatten(dtype="float32", name=name)
    k = time_segments(pooling)
    if k is not None:
        return lambda t: _time_pooling(t, pooling, k, name)
    raise ExportError(f"pooling {pooling!r} has no standard Keras layer here (known: avg, max, flatten, none, "
                      f"{', '.join(TIME_POOLINGS)}); export a probe trained on one of those groups.")


def _time_pooling(t, pooling: str, k: int, name: str):
    """Pooling over time only, as the extractor does it, from standard layers: per time segment a crop and
    a (1, width) average (or max) pooling, side by side, flattened row by row."""
    keras = runtime.keras()
    width = int(t.shape[2])
    pool = keras.layers.MaxPooling2D if pooling == "time-max" else keras.layers.AveragePooling2D
    parts = []
    for i, (a, b) in enumerate(segment_bounds(width, k)):
        part = t if (a, b) == (0, width) else \
            keras.layers.Cropping2D(((0, 0), (a, width - b)), dtype="float32", name=f"{name}_time{i}")(t)
        parts.append(pool(pool_size=(1, b - a), dtype="float32", name=f"{name}_seg{i}")(part))
    y = parts[0] if k == 1 else keras.layers.Concatenate(axis=2, dtype="float32", name=f"{name}_segments")(parts)
    return keras.layers.Flatten(dtype="float32", name=name)(y)


def _dense(affine: Affine, name: str):
    keras = runtime.keras()
    n_in, n_out = affine.kernel.shape
    layer = keras.layers.Dense(n_out, trainable=False, dtype="float32", name=name)
    layer.build((None, n_in))
    layer.set_weights([affine.kernel.astype(np.float32), affine.bias.astype(np.float32)])
    return layer


def head_layers(head: Head, n_classes: int):
    """A function ``x -> scores`` applying the folded probe to pooled codes with standard layers; the
    output has one column per class of the model (``n_classes``), zero for classes the probe never saw."""
    keras = runtime.keras()
    branch_layers = []
    for b, steps in enumerate(head.branches):
        tag = f"_{b}" if len(head.branches) > 1 else ""
        layers, affines = [], 0
        for s in steps:
            if isinstance(s, Affine):
                layers.append(_dense(s, f"probe{tag}_dense{affines}" if affines else f"probe{tag}"))
                affines += 1
            elif isinstance(s, L2):
                layers.append(keras.layers.UnitNormalization(axis=-1, dtype="float32", name=f"probe{tag}_l2"))
            else:  # pragma: no cover - fold only makes the two kinds
                raise ExportError(f"unknown folded step {s!r}")
        branch_layers.append(layers)
    k = head.width
    expand = None
    if head.classes != list(range(n_classes)):  # columns of the classes the probe saw -> every class
        sel = np.zeros((len(head.classes), n_classes))
        sel[np.arange(len(head.classes)), head.classes] = 1.0
        expand = _dense(Affine(sel, np.zeros(n_classes)), "classes")
    extra = {}
    if head.output == "softmax":
        extra["act"] = keras.layers.Activation("softmax", dtype="float32", name="probabilities")
    elif head.output == "sigmoids":
        f = len(head.branches)
        extra["softplus"] = keras.layers.Activation("softplus", dtype="float32", name="softplus")
        extra["neg"] = keras.layers.Rescaling(-1.0, dtype="float32", name="log_sigmoids")
        if f > 1:
            extra["concat"] = keras.layers.Concatenate(axis=-1, dtype="float32", name="folds")
        extra["reshape"] = keras.layers.Reshape((f, k), dtype="float32", name="per_fold")
        extra["softmax"] = keras.layers.Softmax(axis=-1, dtype="float32", name="fold_probabilities")
        extra["mean"] = keras.layers.GlobalAveragePooling1D(dtype="float32", name="probabilities")

    def apply(x):
        outs = []
        for layers in branch_layers:
            y = x
            for layer in layers:
                y = layer(y)
            outs.append(y)
        if head.output == "scores":
            y = outs[0]
        elif head.output == "softmax":
            y = extra["act"](outs[0])
        else:
            y = extra["concat"](outs) if len(outs) > 1 else outs[0]
            y = extra["neg"](extra["softplus"](y))
            y = extra["mean"](extra["softmax"](extra["reshape"](y)))
        return expand(y) if expand is not None else y

    return apply


def standard_only(model) -> list[str]:
    """Names of the objects in ``model``'s serialised form that plain Keras would not know (registered
    custom objects, Lambda layers); empty when it loads anywhere Keras is installed."""
    keras = runtime.keras()
    found: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            module = obj.get("module")
            registered = obj.get("registered_name")
            cls = obj.get("class_name")
            if cls == "Lambda" or (isinstance(registered, str) and ">" in registered) or (
                    isinstance(module, str) and "class_name" in obj and not module.startswith("keras")):
                found.append(str(registered or cls))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(keras.saving.serialize_keras_object(model))
    return sorted(set(found))


def float32_copy(model):
    """``model`` rebuilt with every layer computing in float32 (mixed-precision policies dropped), with
    the same weights: a serving model that runs anywhere, and converts to TFLite."""
    runtime.keras()  # TensorFlow initialised before the config is rebuilt
    config = model.get_config()
    changed = [False]

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict) \
                    and str(obj["config"].get("name", "")).startswith("mixed_"):
                changed[0] = True
                return {**obj, "config": {**obj["config"], "name": "float32"}}
            out = {k: walk(v) for k, v in obj.items()}
            if isinstance(out.get("dtype"), str) and out["dtype"].startswith("mixed_"):
                changed[0] = True
                out["dtype"] = "float32"
            return out
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    config = walk(config)
    if not changed[0]:
        return model
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy
