"""The network that is fine-tuned: backbone + preprocessing layer + new head, its freezing and its
optimizer (with the head's learning-rate multiplier inside the update step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import ParameterError

from .. import runtime
from ..backbones import BackboneSpec, build_backbone, preprocess_mode
from .config import FineTuneConfig


# --------------------------------------------------------------------------- Keras pieces
_KERAS_PIECES: dict[str, Any] = {}


def keras_pieces() -> dict[str, Any]:
    """Classes that need Keras to be defined: built once, registered for (de)serialisation."""
    if _KERAS_PIECES:
        return _KERAS_PIECES
    keras = runtime.keras()
    from keras import ops

    @keras.saving.register_keras_serializable(package="cnncodes")
    class Preprocess(keras.layers.Layer):
        """A family's ``preprocess_input`` as a layer, so a saved model takes raw RGB in [0, 255]."""

        def __init__(self, mode: str = "none", **kwargs):
            super().__init__(**kwargs)
            self.mode = mode

        def call(self, x):
            x = ops.cast(x, self.compute_dtype)
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "scale01":
                return x / 255.0
            if self.mode == "torch":
                mean = ops.convert_to_tensor([0.485, 0.456, 0.406], self.compute_dtype)
                std = ops.convert_to_tensor([0.229, 0.224, 0.225], self.compute_dtype)
                return (x / 255.0 - mean) / std
            if self.mode == "caffe":
                x = ops.flip(x, axis=-1)  # RGB -> BGR
                return x - ops.convert_to_tensor([103.939, 116.779, 123.68], self.compute_dtype)
            return x

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    tensorflow_backend = keras.backend.backend() == "tensorflow"

    def _tf_variable(v):
        return v.value if isinstance(v, keras.Variable) else v

    def _key(v):
        """What identifies a variable in ``update_step``: TensorFlow hands it the ``tf.Variable`` inside each Keras
        variable (under MirroredStrategy each GPU's copy), keyed by ``ref()``; JAX and PyTorch hand it the Keras
        variable itself (also inside JAX's traced, stateless step), keyed by its identity."""
        return _tf_variable(v).ref() if tensorflow_backend else id(v)

    def with_head_multiplier(base):
        class HeadMultiplier(base):
            """``base`` optimizer whose update of the head's variables uses ``lr * head_multiplier``."""

            def __init__(self, head_multiplier: float = 10.0, **kwargs):
                super().__init__(**kwargs)
                self.head_multiplier = float(head_multiplier)
                self._head_refs: set = set()

            def set_head_variables(self, variables) -> None:
                refs = set()
                for v in variables:
                    refs.add(_key(v))
                    if tensorflow_backend:  # under MirroredStrategy the update sees each GPU's copy
                        refs.update(x.ref() for x in getattr(_tf_variable(v), "values", ()) or ())
                self._head_refs = refs

            def update_step(self, gradient, variable, learning_rate):
                if _key(variable) in self._head_refs:
                    learning_rate = learning_rate * self.head_multiplier
                return super().update_step(gradient, variable, learning_rate)

            def get_config(self):
                return {**super().get_config(), "head_multiplier": self.head_multiplier}

        HeadMultiplier.__name__ = f"HeadMultiplier{base.__name__}"
        return keras.saving.register_keras_serializable(package="cnncodes")(HeadMultiplier)

    _KERAS_PIECES.update(Preprocess=Preprocess, SGD=with_head_multiplier(keras.optimizers.SGD),
                         Adam=with_head_multiplier(keras.optimizers.Adam))
    return _KERAS_PIECES


def preprocess_positions(model) -> list[int]:
    """Where ``model.layers`` holds cnncodes' ``Preprocess`` layer (a fine-tuned network has it once)."""
    return [i for i, layer in enumerate(model.layers) if type(layer).__name__ == "Preprocess"]


@dataclass
class Network:
    """The assembled classifier and what is frozen in it."""

    model: Any
    body: Any                    # the (cut) backbone, a nested Keras model
    head_layers: list
    size: int
    preprocess: str

    def head_variables(self) -> list:
        return [w for layer in self.head_layers for w in layer.trainable_weights]

    def counts(self) -> dict[str, int]:
        layers = self.body.layers
        trainable = sum(1 for layer in layers if layer.trainable and layer.weights)
        frozen = sum(1 for layer in layers if not layer.trainable and layer.weights)
        return {"body_layers_with_weights": trainable + frozen, "body_trainable_layers": trainable,
                "body_frozen_layers": frozen,
                "trainable_params": int(sum(np.prod(w.shape) for w in self.model.trainable_weights)),
                "frozen_params": int(sum(np.prod(w.shape) for w in self.model.non_trainable_weights))}


def build_network(spec: BackboneSpec, n_classes: int, cfg: FineTuneConfig, check_device: bool = True) -> Network:
    """Backbone (cut at ``cfg.cut_layer``) + preprocessing layer + new head; freezing not applied yet.

    Every layer computes in ``spec.precision`` (mixed: float32 variables) except the last Dense and its
    softmax, which stay float32 so probabilities and the loss keep their precision."""
    spec = spec.resolved()
    with runtime.precision_policy(spec.precision):
        return _build_network(spec, n_classes, cfg, check_device)


def _build_network(spec: BackboneSpec, n_classes: int, cfg: FineTuneConfig, check_device: bool) -> Network:
    keras = runtime.keras()
    pieces = keras_pieces()
    backbone = build_backbone(spec, check_device=check_device)
    base = backbone.model
    if cfg.cut_layer:
        backbone.check_layers([cfg.cut_layer])
        base = keras.Model(base.inputs, base.get_layer(cfg.cut_layer).output, name=f"{base.name}_cut")
    size = backbone.size
    mode = preprocess_mode(spec)
    inp = keras.Input((size, size, 3), name="image")
    x = pieces["Preprocess"](mode, name="preprocess")(inp)
    x = base(x)
    if cfg.head_pooling in ("time-avg", "time-max"):
        # over the width (a spectrogram's time) only: each row (a band of frequencies) keeps its own values
        pool = keras.layers.AveragePooling2D if cfg.head_pooling == "time-avg" else keras.layers.MaxPooling2D
        head = [pool((1, int(x.shape[2])), name="head_time_pool"), keras.layers.Flatten(name="head_flatten")]
    else:
        head = [keras.layers.GlobalAveragePooling2D(name="head_pool") if cfg.head_pooling == "avg"
                else keras.layers.Flatten(name="head_flatten")]
    if cfg.pool_dropout:
        head.append(keras.layers.Dropout(cfg.pool_dropout, name="head_pool_dropout", seed=cfg.seed + 100))
    for i, width in enumerate(cfg.dense):
        head.append(keras.layers.Dense(width, activation="relu", name=f"head_dense_{i}"))
        if cfg.dropout:
            head.append(keras.layers.Dropout(cfg.dropout, name=f"head_dropout_{i}", seed=cfg.seed + i))
    head.append(keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="head_softmax"))
    for layer in head:
        x = layer(x)
    return Network(keras.Model(inp, x, name="cnncodes_finetune"), base, head, size, mode)


def apply_freezing(net: Network, freeze: str, freeze_batchnorm: bool) -> None:
    """Set ``trainable`` on the body's layers: everything ("all"), nothing ("none"), the first N layers
    ("first:N"), or every layer up to and including a named one ("until:NAME")."""
    keras = runtime.keras()
    layers = net.body.layers
    if freeze == "all":
        cutoff = len(layers)
    elif freeze == "none":
        cutoff = 0
    elif freeze.startswith("first:"):
        cutoff = int(freeze.split(":", 1)[1])
        if cutoff > len(layers):
            raise ParameterError(f"freeze first:{cutoff} exceeds the {len(layers)} layers of the backbone.")
    else:
        name = freeze.split(":", 1)[1]
        names = [layer.name for layer in layers]
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=3)
            raise ParameterError(f"freeze until:{name}: no such layer in the backbone"
                                 + (f"; did you mean {close}?" if close else "") + " `cnncodes layers` lists them.")
        cutoff = names.index(name) + 1
    net.body.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= cutoff
        if freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def make_optimizer(cfg: FineTuneConfig, steps_per_epoch: int, phase: str):
    keras = runtime.keras()
    pieces = keras_pieces()
    if phase == "head":
        return keras.optimizers.Adam(cfg.head_learning_rate)
    lr: Any = cfg.learning_rate
    if cfg.schedule == "step":
        bounds = [steps_per_epoch * cfg.step_epochs * k for k in range(1, max(1, cfg.epochs // cfg.step_epochs) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [cfg.learning_rate * cfg.step_gamma ** k for k in range(len(bounds) + 1)])
    elif cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=steps_per_epoch * cfg.epochs)
    if cfg.optimizer == "sgd":
        return pieces["SGD"](head_multiplier=cfg.head_lr_multiplier, learning_rate=lr, momentum=cfg.momentum)
    return pieces["Adam"](head_multiplier=cfg.head_lr_multiplier, learning_rate=lr)
