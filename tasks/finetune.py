"""Fine-tuning (cases 3 and 4 of transfer learning): the backbone itself is trained.

A backbone (optionally cut at a layer) gets a new head: global average pooling
or Flatten, optional Dense+ReLU+Dropout blocks, a softmax over the classes.
The known traps are handled here rather than left to the user:

* BatchNormalization layers of a frozen part stay in inference mode (Keras 3
  runs a BN layer with ``trainable=False`` on its moving statistics), and by
  default every BN layer stays frozen while the rest fine-tunes.
* The new head learns at the base rate times ``head_lr_multiplier`` (default
  10): a true per-variable learning rate inside the optimizer's update step,
  so it holds for SGD with momentum and for Adam alike.
* Preprocessing is a layer of the saved model: the ``.keras`` file takes RGB
  pixels in [0, 255] and nothing about it can be forgotten at prediction time.

Data comes from the same manifest as extraction, through ``tf.data``: decoded
once with the same decoder (bad files skipped and reported), cached, shuffled,
augmented with Keras preprocessing layers (training only), prefetched.
A killed run resumes from its last epoch (weights, optimizer state, epoch)
through ``BackupAndRestore``.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from storage.errors import DatasetError, ParameterError
from storage.files import atomic_path, atomic_write
from storage.manifest import Manifest, Skip

from . import tf_runtime
from .backbones import REGISTRY, BackboneSpec, build_backbone, is_model_file
from .images import ImageError, load_image

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine", "plateau")
PREPROCESS_MODES = ("none", "tf", "caffe", "torch", "scale01")
# The preprocess_input of each keras.applications module, as a serialisable mode.
FAMILY_MODES = {"vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe", "resnet_v2": "tf", "inception_v3": "tf",
                "inception_resnet_v2": "tf", "xception": "tf", "mobilenet": "tf", "mobilenet_v2": "tf",
                "nasnet": "tf", "densenet": "torch", "mobilenet_v3": "none", "efficientnet": "none",
                "efficientnet_v2": "none", "convnext": "none"}


@dataclass
class FineTuneConfig:
    """How the network is fine-tuned; :meth:`validate` checks every field with a clear message."""

    freeze: str = "none"            # "all" (head only), "none", "first:N", "until:LAYER" (that layer included)
    freeze_batchnorm: bool = True    # keep every BatchNormalization layer frozen (inference mode)
    cut_layer: str | None = None     # use the backbone only up to this layer
    head_pooling: str = "avg"        # "avg" or "flatten"
    dense: Sequence[int] = (1024,)   # hidden Dense+ReLU blocks of the head
    dropout: float = 0.5
    optimizer: str = "sgd"
    learning_rate: float = 1e-4
    momentum: float = 0.9
    head_lr_multiplier: float = 10.0
    schedule: str = "constant"
    step_epochs: int = 5             # schedule "step": multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    epochs: int = 10
    head_epochs: int = 0             # two-phase: first train the head alone (backbone frozen) this many epochs
    head_learning_rate: float = 1e-3  # phase one uses Adam at this rate
    batch_size: int = 32
    augment: Sequence[str] = ("flip", "rotation", "zoom")
    augment_strength: float = 0.1
    monitor: str = "val_accuracy"
    patience: int = 3
    min_delta: float = 0.0
    xla: bool = False
    seed: int = 0

    def validate(self) -> "FineTuneConfig":
        def bad(name, allowed):
            raise ParameterError(f"{name} must be {allowed}; got {getattr(self, name)!r}.")

        if not (self.freeze in ("all", "none") or re.fullmatch(r"first:\d+", self.freeze)
                or re.fullmatch(r"until:.+", self.freeze)):
            bad("freeze", "'all', 'none', 'first:N' or 'until:LAYER'")
        if self.head_pooling not in ("avg", "flatten"):
            bad("head_pooling", "'avg' or 'flatten'")
        if any((not isinstance(d, int)) or d < 1 for d in self.dense):
            bad("dense", "a list of positive layer widths (or empty)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"one of {OPTIMIZERS}")
        for name in ("learning_rate", "head_learning_rate", "head_lr_multiplier"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                bad(name, "a positive number")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "in [0, 1)")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        for name in ("epochs", "batch_size", "step_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        if not isinstance(self.head_epochs, int) or self.head_epochs < 0:
            bad("head_epochs", "an integer >= 0")
        unknown = set(self.augment) - {"flip", "rotation", "zoom", "translation", "contrast"}
        if unknown:
            bad("augment", "a subset of flip, rotation, zoom, translation, contrast")
        if self.monitor not in ("val_accuracy", "val_loss", "accuracy", "loss"):
            bad("monitor", "val_accuracy, val_loss, accuracy or loss")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FineTuneConfig":
        """From :meth:`as_dict` output, also of models registered before precision moved to the
        backbone spec (their ``mixed_precision`` key is dropped: see :func:`precision_of`)."""
        return cls(**{k: v for k, v in d.items() if k != "mixed_precision"})

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense"], d["augment"] = list(self.dense), list(self.augment)
        return d


# --------------------------------------------------------------------------- Keras pieces
_KERAS_PIECES: dict[str, Any] = {}


def keras_pieces() -> dict[str, Any]:
    """Classes that need Keras to be defined: built once, registered for (de)serialisation."""
    if _KERAS_PIECES:
        return _KERAS_PIECES
    keras = tf_runtime.keras()
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

    def _tf_variable(v):
        return v.value if isinstance(v, keras.Variable) else v

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
                    tv = _tf_variable(v)
                    refs.add(tv.ref())
                    # under MirroredStrategy the update sees each GPU's copy
                    refs.update(x.ref() for x in getattr(tv, "values", ()) or ())
                self._head_refs = refs

            def update_step(self, gradient, variable, learning_rate):
                # The TensorFlow backend hands tf.Variables to update_step, Keras variables elsewhere.
                if _tf_variable(variable).ref() in self._head_refs:
                    learning_rate = learning_rate * self.head_multiplier
                return super().update_step(gradient, variable, learning_rate)

            def get_config(self):
                return {**super().get_config(), "head_multiplier": self.head_multiplier}

        HeadMultiplier.__name__ = f"HeadMultiplier{base.__name__}"
        return keras.saving.register_keras_serializable(package="cnncodes")(HeadMultiplier)

    _KERAS_PIECES.update(Preprocess=Preprocess, SGD=with_head_multiplier(keras.optimizers.SGD),
                         Adam=with_head_multiplier(keras.optimizers.Adam))
    return _KERAS_PIECES


def preprocess_mode(spec: BackboneSpec) -> str:
    p = spec.preprocessing
    if p in PREPROCESS_MODES:
        return p
    if p == "auto":
        if is_model_file(spec.name):
            return "none"
        info = REGISTRY[spec.name]
        return "none" if info.builtin_preprocessing else FAMILY_MODES[info.module]
    if p in FAMILY_MODES:
        return FAMILY_MODES[p]
    raise ParameterError(f"preprocessing {p!r} has no layer form for fine-tuning; use one of {PREPROCESS_MODES}.")


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


def precision_of(spec: dict[str, Any], config: dict[str, Any]) -> str:
    """The precision a registered fine-tuned model asked for: its spec's, or, for models registered
    before one precision option existed, their ``mixed_precision`` (off -> float32)."""
    old = config.get("mixed_precision")
    if old is not None:
        return {"off": "float32"}.get(old, old)
    return spec.get("precision") or "auto"


def build_network(spec: BackboneSpec, n_classes: int, cfg: FineTuneConfig, check_device: bool = True) -> Network:
    """Backbone (cut at ``cfg.cut_layer``) + preprocessing layer + new head; freezing not applied yet.

    Every layer computes in ``spec.precision`` (mixed: float32 variables) except the last Dense and its
    softmax, which stay float32 so probabilities and the loss keep their precision."""
    spec = spec.validate().resolved()
    with tf_runtime.precision_policy(spec.precision):
        return _build_network(spec, n_classes, cfg, check_device)


def _build_network(spec: BackboneSpec, n_classes: int, cfg: FineTuneConfig, check_device: bool) -> Network:
    keras = tf_runtime.keras()
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
    head = [keras.layers.GlobalAveragePooling2D(name="head_pool") if cfg.head_pooling == "avg"
            else keras.layers.Flatten(name="head_flatten")]
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
    keras = tf_runtime.keras()
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
    keras = tf_runtime.keras()
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


# --------------------------------------------------------------------------- data
class SkipLog:
    """Files the input pipeline could not decode (recorded once each)."""

    def __init__(self):
        self.items: dict[str, str] = {}

    def add(self, path: str, reason: str) -> None:
        self.items.setdefault(path, reason)

    def as_list(self) -> list[dict[str, str]]:
        return [{"path": p, "reason": r} for p, r in sorted(self.items.items())]


def split_arrays(manifest: Manifest, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    samples = [s for s in manifest.samples if s.split == split]
    return [manifest.abspath(s) for s in samples], np.array([s.label for s in samples], np.int32), \
        [s.path for s in samples]


def make_dataset(paths: Sequence[str], labels: np.ndarray, rel: Sequence[str], size: int, resize: str,
                 batch_size: int, skips: SkipLog, *, training: bool, augment=None, seed: int = 0,
                 cache: str | None = ""):
    """``tf.data`` pipeline of (uint8 image, label) batches: decode with the project's decoder
    (bad files dropped and logged), cache, shuffle and augment when training, prefetch."""
    tf = tf_runtime.tensorflow()
    rel_of = dict(zip(paths, rel))

    def decode(path_bytes):
        path = path_bytes.decode()
        try:
            return load_image(path, size, resize), True
        except ImageError as exc:
            skips.add(rel_of.get(path, path), str(exc))
            return np.zeros((size, size, 3), np.uint8), False

    def load(path, label):
        img, ok = tf.numpy_function(decode, [path], [tf.uint8, tf.bool], stateful=False)
        img.set_shape((size, size, 3))
        ok.set_shape(())
        return img, label, ok

    def decoded(img, label, ok):
        return ok

    def drop_flag(img, label, ok):
        return img, label

    def augmented(x, y):
        return augment(tf.cast(x, tf.float32), training=True), y

    ds = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(decoded).map(drop_flag)
    if cache is not None:
        ds = ds.cache(cache)
    if training:
        ds = ds.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augment is not None:
        ds = ds.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def augmentation(cfg: FineTuneConfig):
    if not cfg.augment:
        return None
    keras = tf_runtime.keras()
    s, layers = cfg.augment_strength, []
    if "flip" in cfg.augment:
        layers.append(keras.layers.RandomFlip("horizontal", seed=cfg.seed))
    if "rotation" in cfg.augment:
        layers.append(keras.layers.RandomRotation(s, seed=cfg.seed + 1))
    if "zoom" in cfg.augment:
        layers.append(keras.layers.RandomZoom(s, seed=cfg.seed + 2))
    if "translation" in cfg.augment:
        layers.append(keras.layers.RandomTranslation(s, s, seed=cfg.seed + 3))
    if "contrast" in cfg.augment:
        layers.append(keras.layers.RandomContrast(s, seed=cfg.seed + 4))
    return keras.Sequential(layers, name="augment")


# --------------------------------------------------------------------------- training
@dataclass
class FineTuneResult:
    model_path: str
    history: list[dict[str, Any]]
    phases: list[dict[str, Any]]
    counts: dict[str, int]
    skipped: list[dict[str, str]]
    seconds: float
    resumed_from_epoch: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False
    input_size: int | None = None
    precision: str | None = None      # what the network computed in ('auto' resolved)
    devices: int = 1                   # replicas of the distribution strategy


class _EpochProgress:
    def __init__(self, progress: Callable[[int, int], None] | None, total: int, offset: int):
        self.progress, self.total, self.offset = progress, total, offset

    def callback(self):
        keras = tf_runtime.keras()
        outer = self

        class CB(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self._t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                if logs is not None:  # seconds per epoch land in the history
                    logs["epoch_seconds"] = time.perf_counter() - self._t
                if outer.progress:
                    outer.progress(outer.offset + epoch + 1, outer.total)

        return CB()


def default_strategy():
    """MirroredStrategy (one replica per GPU) where TensorFlow sees several GPUs; else None."""
    tf = tf_runtime.tensorflow()
    return tf.distribute.MirroredStrategy() if len(tf_runtime.gpus()) > 1 else None


def fine_tune(manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig, workdir: str | Path,
              resize: str = "stretch", progress: Callable[[int, int], None] | None = None,
              stop_after_epochs: int | None = None, strategy=None) -> FineTuneResult:
    """Fine-tune on ``manifest``'s train split, validating on val (or test). Writes into ``workdir``:
    ``model.keras`` (the best weights, no optimizer), ``history.csv``, ``tensorboard/``, per-phase
    backups for resuming, ``best.weights.h5``. A second call with the same ``workdir`` after a
    killed run resumes each unfinished phase from its last finished epoch.

    ``spec.precision`` applies to the whole network ('auto': mixed float16 on a GPU, float32 on a
    CPU), with dynamic loss scaling under float16. ``strategy`` (a ``tf.distribute`` strategy)
    defaults to MirroredStrategy over every GPU when there are several.

    ``stop_after_epochs`` ends training after that many epochs in this call (for tests of resume)."""
    cfg.validate()
    keras = tf_runtime.keras()
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    n_classes = len(manifest.class_names)
    tr_paths, tr_labels, tr_rel = split_arrays(manifest, "train")
    val_split = "val" if any(s.split == "val" for s in manifest.samples) else "test"
    va_paths, va_labels, va_rel = split_arrays(manifest, val_split)
    if len(np.unique(tr_labels)) < 2:
        raise DatasetError(f"the train split has images of {len(np.unique(tr_labels))} class(es); fine-tuning "
                           "needs at least two.")
    if not va_paths:
        raise DatasetError("fine-tuning needs a val (or test) split to monitor; use --val-fraction > 0 or a "
                           "dataset with val/.")
    spec = spec.validate().resolved()
    tf_runtime.check_precision(spec.precision)
    if strategy is None:
        strategy = default_strategy()
    scope = strategy.scope if strategy else contextlib.nullcontext
    with scope():
        net = build_network(spec, n_classes, cfg)
    skips = SkipLog()
    train_ds = make_dataset(tr_paths, tr_labels, tr_rel, net.size, resize, cfg.batch_size, skips, training=True,
                            augment=augmentation(cfg), seed=cfg.seed)
    val_ds = make_dataset(va_paths, va_labels, va_rel, net.size, resize, cfg.batch_size, skips, training=False)
    steps = max(1, int(np.ceil(len(tr_paths) / cfg.batch_size)))
    net.model(np.zeros((1, net.size, net.size, 3), np.float32))  # built, for BackupAndRestore
    phases = ([("head", "all", cfg.head_epochs)] if cfg.head_epochs else []) + [("finetune", cfg.freeze, cfg.epochs)]
    total_epochs = sum(p[2] for p in phases)
    history: list[dict[str, Any]] = []
    phase_info, resumed, offset, budget = [], {}, 0, stop_after_epochs
    stopped_early = False
    for phase, freeze, epochs in phases:
        done_marker = workdir / f"phase-{phase}.done.json"
        weights_after = workdir / f"phase-{phase}.weights.h5"
        if done_marker.exists() and weights_after.exists():
            net.model.load_weights(weights_after)
            info = json.loads(done_marker.read_text())
            phase_info.append(info)
            history += info.get("history", [])
            offset += epochs
            continue
        apply_freezing(net, freeze, cfg.freeze_batchnorm)
        with scope():
            opt = make_optimizer(cfg, steps, phase)
            if hasattr(opt, "set_head_variables"):
                opt.set_head_variables(net.head_variables())
            if spec.precision == "float16":  # float16 gradients underflow without dynamic loss scaling
                opt = keras.optimizers.LossScaleOptimizer(opt)
            net.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                              jit_compile=bool(cfg.xla))
        backup = workdir / f"backup-{phase}"
        start_epoch = 0
        meta = backup / "training_metadata.json"
        if meta.exists():
            start_epoch = int(json.loads(meta.read_text()).get("epoch", 0))
            resumed[phase] = start_epoch
        callbacks = [
            _EpochProgress(progress, total_epochs, offset).callback(),
            # kept until the phase is recorded as done below, so no moment exists without a checkpoint
            keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True, delete_checkpoint=False),
            keras.callbacks.CSVLogger(str(workdir / f"history-{phase}.csv"), append=True),
            keras.callbacks.TensorBoard(str(workdir / "tensorboard" / phase), histogram_freq=0, write_graph=False),
            keras.callbacks.ModelCheckpoint(str(workdir / "best.weights.h5"), monitor=cfg.monitor,
                                            save_best_only=True, save_weights_only=True),
        ]
        if phase == "finetune":
            callbacks.append(keras.callbacks.EarlyStopping(monitor=cfg.monitor, min_delta=cfg.min_delta,
                                                           patience=cfg.patience, restore_best_weights=True))
            if cfg.schedule == "plateau":
                callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=cfg.monitor, factor=cfg.step_gamma,
                                                                   patience=max(1, cfg.patience // 2)))
        run_epochs = epochs
        if budget is not None:
            run_epochs = min(epochs, start_epoch + budget)
        before = net.counts()
        h = net.model.fit(train_ds, validation_data=val_ds, epochs=run_epochs, callbacks=callbacks, verbose=0,
                          shuffle=False)  # the dataset shuffles itself
        ran = len(h.history.get("loss", []))
        rows = [{"phase": phase, "epoch": start_epoch + i + 1, **{k: float(v[i]) for k, v in h.history.items()}}
                for i in range(ran)]
        history += rows
        if budget is not None:
            budget -= ran
            if run_epochs < epochs and (start_epoch + ran) >= run_epochs:
                # stopped on request before the phase ended: leave the backup for a resume
                return FineTuneResult("", history, phase_info, before, skips.as_list(),
                                      time.perf_counter() - t0, resumed)
        if phase == "finetune":
            stopped_early = (start_epoch + ran) < epochs
        info = {"phase": phase, "freeze": freeze, "epochs_run": start_epoch + ran, "epochs": epochs,
                "counts": before, "history": rows}
        phase_info.append(info)
        net.model.save_weights(weights_after)
        atomic_write(done_marker, json.dumps(info, default=float))
        shutil.rmtree(backup, ignore_errors=True)
        offset += epochs
    plain = keras.Model(net.model.inputs, net.model.outputs, name="cnncodes_finetuned")
    model_path = workdir / "model.keras"
    with atomic_path(model_path, suffix=".keras") as tmp:
        plain.save(tmp)
    _write_history(workdir, history)
    return FineTuneResult(str(model_path), history, phase_info, net.counts(), skips.as_list(),
                          time.perf_counter() - t0, resumed, stopped_early, net.size, spec.precision,
                          strategy.num_replicas_in_sync if strategy else 1)


def _write_history(workdir: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    if not history:
        return
    df = pd.DataFrame(history)
    atomic_write(workdir / "history.csv", df.to_csv(index=False))


def plot_learning_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    from .evaluate import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            ys = [h.get(key) for h in history]
            if any(v is not None for v in ys):
                ax.plot(x, [np.nan if v is None else v for v in ys], style, marker="o", label=key)
        boundaries = [i + 0.5 for i in range(1, len(history)) if history[i]["phase"] != history[i - 1]["phase"]]
        for b in boundaries:
            ax.axvline(b, color="grey", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def load_finetuned(path: str | Path):
    keras = tf_runtime.keras()
    keras_pieces()
    return keras.models.load_model(path, compile=False)


def predict_images_array(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.asarray(model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0))


def predict_paths(model, paths: Sequence[str], size: int, resize: str, batch_size: int = 32
                  ) -> tuple[np.ndarray, list[int], list[Skip]]:
    """Class probabilities of images on disk, decoded as in training; returns (probs, ok indices, skips)."""
    probs, ok, skips = [], [], []
    for start in range(0, len(paths), batch_size):
        batch, idx = [], []
        for i in range(start, min(len(paths), start + batch_size)):
            try:
                batch.append(load_image(paths[i], size, resize))
                idx.append(i)
            except ImageError as exc:
                skips.append(Skip(paths[i], str(exc)))
        if batch:
            probs.append(predict_images_array(model, np.stack(batch), batch_size))
            ok += idx
    out = np.concatenate(probs) if probs else np.zeros((0, model.output_shape[-1]))
    return out, ok, skips


# --------------------------------------------------------------------------- evaluate + register
def evaluate_finetuned(model_path: str | Path, manifest: Manifest, size: int, resize: str, batch_size: int,
                       splits: Sequence[str] = ("train", "val", "test")) -> tuple[dict[str, Any], list[dict]]:
    """Metrics per split of a saved fine-tuned model (images decoded as in training, no augmentation)."""
    from .evaluate import evaluate_scores

    model = load_finetuned(model_path)
    metrics, skipped = {}, []
    for split in splits:
        paths, labels, _ = split_arrays(manifest, split)
        if not paths:
            continue
        probs, ok, skips = predict_paths(model, paths, size, resize, batch_size)
        skipped += [{"path": s.path, "reason": s.reason} for s in skips]
        if ok:
            metrics[split] = evaluate_scores(probs, labels[ok], manifest.class_names)
    return metrics, skipped


def register_finetuned(result: FineTuneResult, manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig,
                       resize: str, size: int, metrics: dict[str, Any], registry: str | Path,
                       name: str) -> dict[str, Any]:
    from storage import ModelRegistry

    from .extract import spec_dict

    meta = {"kind": "fine-tuned", "config": cfg.as_dict(), "spec": spec_dict(spec), **spec.identity(),
            "precision": result.precision or spec.precision, "replicas": result.devices,
            "input_size": size, "resize": resize, "preprocess_layer": preprocess_mode(spec),
            "class_names": list(manifest.class_names), "dataset": manifest.root,
            "manifest_fingerprint": manifest.fingerprint(), "counts": result.counts, "phases": [
                {k: v for k, v in p.items() if k != "history"} for p in result.phases],
            "history": result.history, "train_seconds": round(result.seconds, 2), "metrics": metrics,
            "stopped_early": result.stopped_early, "train_images": sum(1 for s in manifest.samples
                                                                        if s.split == "train")}
    record = ModelRegistry(registry).save(name, metadata=meta, file=result.model_path)
    return {"name": record.name, "version": record.version, "model_path": str(record.model_path)}
