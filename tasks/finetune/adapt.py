"""Test-time adaptation of BatchNormalization statistics to a group of inputs (AdaBN).

A network's BatchNormalization layers normalise with the mean and variance of their inputs over the training
data. A new speaker, microphone or camera shifts those statistics, and the network sees inputs off the
distribution it learnt. AdaBN (Li et al., 2016, "Revisiting Batch Normalization for Practical Domain
Adaptation") re-estimates every BatchNormalization layer's statistics on the new group's own inputs, no label
needed, and leaves every learnt weight as it is.

:func:`adapt_batchnorm` does it for one group: one pass over the group's images in which each
BatchNormalization layer (nested models and ensembles included) normalises with the statistics of the batch at
hand and accumulates the exact mean and variance of its inputs over the whole group; the layer's moving
statistics then become those. :func:`predict_adapted` predicts group by group, each with its own statistics,
and puts the trained statistics back afterwards. Groups smaller than ``min_images`` keep the trained
statistics (a handful of images gives noisy estimates). Only layers whose statistics were learnt on the training
data adapt (:func:`batchnorm_layers`): fine-tune with ``--train-batchnorm``.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

MIN_IMAGES = 16
PASS_BATCH = 64
log = logging.getLogger(__name__)


def batchnorm_layers(model, learnt: bool = True) -> list:
    """The BatchNormalization layers of ``model``, nested models included, each once, in order; with ``learnt``
    only those whose statistics were learnt on the training data (``trainable``). A layer frozen in training
    kept its pretrained (ImageNet) statistics and the layers after it learnt against those: re-estimating them
    on a group would normalise that group unlike the training data, so they stay."""
    from .. import runtime

    bn_type = runtime.keras().layers.BatchNormalization
    out, seen = [], set()

    def walk(layer) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, bn_type) and (layer.trainable or not learnt):
            out.append(layer)
        for sub in getattr(layer, "layers", None) or []:
            walk(sub)

    walk(model)
    return out


def statistics(layers: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(la.moving_mean.numpy()), np.array(la.moving_variance.numpy())) for la in layers]


def set_statistics(layers: Sequence, stats: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    for la, (mean, var) in zip(layers, stats):
        la.moving_mean.assign(mean)
        la.moving_variance.assign(var)


class _Moments:
    """Running sums of one layer's inputs over the channel axis: count, sum and sum of squares (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.s: np.ndarray | None = None
        self.ss: np.ndarray | None = None

    def add(self, x: np.ndarray, axes: tuple[int, ...]) -> None:
        x = x.astype(np.float64)
        n = int(np.prod([x.shape[a] for a in axes]))
        s, ss = x.sum(axis=axes), np.square(x).sum(axis=axes)
        self.n += n
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / self.n
        return mean, np.maximum(self.ss / self.n - np.square(mean), 0.0)


@contextmanager
def _batch_statistics(layers: Sequence) -> Iterator[list[_Moments]]:
    """Within: each layer normalises with its batch's own statistics (whatever ``training`` says) and
    records its inputs' moments. The layers' own ``call`` comes back on exit."""
    from .. import runtime

    ops = runtime.keras().ops
    moments = [_Moments() for _ in layers]

    def patched(layer, acc: _Moments):
        def call(inputs, training=None, mask=None):
            x = ops.cast(inputs, "float32")
            axes = tuple(layer._reduction_axes)
            acc.add(ops.convert_to_numpy(x), axes)
            mean, var = ops.moments(x, axes=axes)
            out = ops.batch_normalization(x, mean, var, axis=layer.axis,
                                          offset=None if layer.beta is None else ops.cast(layer.beta, "float32"),
                                          scale=None if layer.gamma is None else ops.cast(layer.gamma, "float32"),
                                          epsilon=layer.epsilon)
            return ops.cast(out, inputs.dtype)
        return call

    for layer, acc in zip(layers, moments):
        layer.call = patched(layer, acc)
    try:
        yield moments
    finally:
        for layer in layers:
            del layer.call  # the instance attribute goes; the class's call is back


def chunks(images: np.ndarray, batch_size: int = PASS_BATCH) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def adapt_batchnorm(model, batches: Iterable[np.ndarray], layers: Sequence | None = None) -> int:
    """Set every BatchNormalization layer's moving statistics to those of its inputs over the images of
    ``batches`` (one group, e.g. :func:`chunks` of an array; the first layer's are exact whatever the batches,
    a later layer's are exact when one batch holds the group). Returns the number of images seen; with no
    BatchNormalization layer or no image, nothing changes."""
    layers = batchnorm_layers(model) if layers is None else layers
    seen = 0
    if not layers:
        return 0
    listed = isinstance(model.input, (list, tuple))  # a model saved with its inputs as a list wants one
    with _batch_statistics(layers) as moments:
        for batch in batches:
            if len(batch):
                x = np.asarray(batch, dtype=np.float32)
                model([x] if listed else x, training=False)
                seen += len(batch)
    if seen:
        set_statistics(layers, [m.result() for m in moments])
    return seen


@dataclass(frozen=True)
class SelfTraining:
    """Test-time self-training on a group, after AdaBN: the two-pass unsupervised adaptation of speech
    recognisers. The adapted model's most confident predictions on the group (``fractions[k]`` of the images
    predicted as each class in round k, the last share for any further round; class by class, so that no class
    is drowned by the easy ones) become labels; every
    network (each of an ensemble's) trains on those images for ``epochs`` epochs, Adam at ``learning_rate``,
    ``augment(seed)`` applied (a function that makes a Keras layer, called with ``training=True``; None: none);
    then AdaBN on the group again. Each of ``rounds`` starts from the trained (adapted) network with the previous
    round's predictions. No label is used. Every random draw (order, dropout, augmentation) is seeded from ``seed``
    alone, so a group self-trains alike whatever was predicted before it. ``progress(done, total)``, if given, is
    told after every epoch (the total counts every group large enough to adapt)."""

    rounds: int = 1
    epochs: int = 10
    fractions: tuple[float, ...] = (0.5,)
    learning_rate: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    augment: Any = None
    progress: Callable[[int, int], None] | None = None


def pseudo_labels(probs: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The indices (ascending) and predicted classes of the most confident ``fraction`` of the rows predicted as
    each class (rounded, at least one per class predicted)."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    keep: list[int] = []
    for c in np.unique(pred):
        idx = np.flatnonzero(pred == c)
        keep.extend(idx[np.argsort(-conf[idx], kind="stable")][:max(1, int(round(fraction * len(idx))))])
    out = np.sort(np.asarray(keep, dtype=np.int64))
    return out, pred[out]


def networks(model) -> list:
    """The networks that train one by one: each member of an ensemble (``network_K``, seen from the ensemble's
    input, so the shared preprocessing comes first), else the model itself."""
    from .. import runtime

    keras = runtime.keras()
    subs = [la for la in model.layers if la.name.startswith("network_") and isinstance(la, keras.Model)]
    if model.name != "cnncodes_ensemble" or not subs:
        return [model]
    shared = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer) and la not in subs
              and la.name != "ensemble_average"]  # the preprocessing before the members

    def alone(member):
        inp = keras.Input(model.input_shape[1:])
        h = inp
        for la in shared:
            h = la(h)
        return keras.Model(inp, member(h), name=f"{member.name}_alone")

    return [alone(la) for la in subs]


def _reseed(model, seed: int) -> None:
    """Every random-number state of ``model``'s layers (dropout's, say) set from ``seed``: they are not weights, so
    loading a model leaves them drawn at random, and each use moves them on."""
    for i, v in enumerate(v for v in model.variables if v.name.endswith("seed_generator_state")):
        v.assign(np.array([seed, 1 + i], dtype=v.dtype))


def self_train(model, images: np.ndarray, how: SelfTraining, layers: Sequence | None = None,
               name: str = "", epoch_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """:class:`SelfTraining` on one group's ``images`` (uint8 or float, as the model takes them); ``model`` is
    adapted to them already. The model is left self-trained and adapted (:func:`by_group` puts the trained
    weights back). Returns per round the pseudo-labels' count and how many predictions the round changed."""
    from .. import runtime
    from .data import batches_class, set_seed

    keras = runtime.keras()
    tf = runtime.tensorflow() if runtime.backend() == "tensorflow" else None
    layers = batchnorm_layers(model) if layers is None else layers
    n_classes = int(model.output_shape[-1])
    start = model.get_weights()
    predict = lambda: np.asarray(model.predict(images.astype(np.float32), batch_size=how.batch_size,  # noqa: E731
                                               verbose=0))
    probs = predict()
    rounds = []
    nets = networks(model)  # they share the model's variables: set_weights below resets them too
    for k in range(how.rounds):
        keep, labels = pseudo_labels(probs, how.fractions[min(k, len(how.fractions) - 1)])
        model.set_weights(start)
        t = time.perf_counter()
        for j, net in enumerate(nets):
            log.info("self-training on group %s: round %d of %d, network %d of %d, %d of %d images pseudo-labelled, "
                     "%d epochs", name, k + 1, how.rounds, j + 1, len(nets), len(keep), len(images), how.epochs)
            seed = how.seed + 1000 * (k + 1) + j
            set_seed(seed)
            _reseed(net, seed)
            augment = how.augment(seed) if how.augment is not None else None
            if tf is not None:
                ds = tf.data.Dataset.from_tensor_slices((images[keep], tf.one_hot(labels, n_classes)))
                ds = ds.shuffle(len(keep), seed=seed).batch(how.batch_size).map(
                    lambda x, y: (tf.cast(x, tf.float32), y))
                if augment is not None:
                    ds = ds.map(lambda x, y: (augment(x, training=True), y))
                ds = ds.prefetch(2)
            else:  # JAX, PyTorch: the batches of fine-tuning's PyDataset (shuffled, augmented, one-hot; seeded)
                ds = batches_class()(images[keep].astype(np.float32), labels, how.batch_size, training=True,
                                     augment=augment, seed=seed, n_classes=n_classes)
            net.compile(optimizer=keras.optimizers.Adam(how.learning_rate), loss="categorical_crossentropy")
            done = [keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: epoch_done())] if epoch_done else []
            net.fit(ds, epochs=how.epochs, verbose=0, shuffle=False, callbacks=done)
        adapt_batchnorm(model, chunks(images), layers)
        before, probs = probs.argmax(axis=1), predict()
        rounds.append({"pseudo_labels": int(len(keep)), "changed": int(np.sum(probs.argmax(axis=1) != before)),
                       "seconds": round(time.perf_counter() - t, 1)})
    return {"images": int(len(images)), "rounds": rounds}


def _counter(progress: Callable[[int, int], None], total: int) -> Callable[[], None]:
    count = [0]

    def tick() -> None:
        count[0] += 1
        progress(min(count[0], total), total)

    return tick


def by_group(model, groups: Sequence[Any], batches: Callable[[list[int]], Iterable[np.ndarray]],
             predict: Callable[[list[int]], None], min_images: int = MIN_IMAGES,
             self_training: SelfTraining | None = None) -> dict[str, Any]:
    """The loop of adapted prediction, whatever holds the images: for each group (``groups[i]`` names item i's),
    the trained statistics, then AdaBN on ``batches(indices)`` when the group has at least ``min_images`` items
    (and that many were seen), with ``self_training`` then :func:`self_train` on the group's images (held in memory
    for it), then ``predict(indices)``. The trained statistics (and weights) are back on return. Returns a summary:
    layers, groups adapted and groups kept, with their sizes, and each self-trained group's rounds."""
    layers = batchnorm_layers(model)
    trained = statistics(layers)
    weights = model.get_weights() if self_training is not None else None
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    adapted: dict[str, int] = {}
    kept: dict[str, int] = {}
    trained_on: dict[str, Any] = {}
    tick = None
    if self_training is not None and self_training.progress is not None:
        tick = _counter(self_training.progress, (sum(len(idx) >= min_images for idx in members.values())
                                                 * self_training.rounds * len(networks(model)) * self_training.epochs))
    try:
        for g, idx in members.items():
            if weights is not None:
                model.set_weights(weights)
            set_statistics(layers, trained)
            seen = adapt_batchnorm(model, batches(idx), layers) if layers and len(idx) >= min_images else 0
            if seen < min_images:
                set_statistics(layers, trained)
                kept[g] = seen or len(idx)
            else:
                adapted[g] = seen
                if self_training is not None:
                    trained_on[g] = self_train(model, np.concatenate([b for b in batches(idx) if len(b)]),
                                               self_training, layers, name=g, epoch_done=tick)
            predict(idx)
    finally:
        if weights is not None:
            model.set_weights(weights)
        set_statistics(layers, trained)
    summary = {"batchnorm_layers": len(layers), "adapted_groups": adapted, "kept_groups": kept,
               "min_images": min_images}
    if self_training is not None:
        summary["self_training"] = {"rounds": self_training.rounds, "epochs": self_training.epochs,
                                    "fractions": list(self_training.fractions),
                                    "learning_rate": self_training.learning_rate, "groups": trained_on}
    return summary


def predict_adapted(model, images: np.ndarray, groups: Sequence[Any], batch_size: int = 32,
                    min_images: int = MIN_IMAGES, self_training: SelfTraining | None = None
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Class probabilities of ``images``, each group (``groups[i]`` names image i's) predicted after the
    network's BatchNormalization statistics were adapted to that group's images, and with ``self_training``
    the network self-trained on them (:func:`by_group`). Returns (probabilities, the summary)."""
    if len(groups) != len(images):
        raise ValueError(f"{len(images)} images but {len(groups)} group names")
    probs = np.zeros((len(images), int(model.output_shape[-1])), dtype=np.float32)

    def predict(idx: list[int]) -> None:
        probs[idx] = model.predict(images[idx].astype(np.float32), batch_size=batch_size, verbose=0)

    summary = by_group(model, groups, lambda idx: chunks(images[idx]), predict, min_images, self_training)
    return probs, summary
