"""Fine-tuning's input pipeline: the manifest's files decoded by the project's decoder (bad files skipped and
reported), cached, shuffled, augmented with Keras preprocessing layers, batched.

On the TensorFlow backend it is a ``tf.data`` pipeline (:func:`make_dataset`). On JAX and PyTorch it is a
``keras.utils.PyDataset`` (:class:`Batches`) over the same decoder, with the same steps in plain NumPy and the
same Keras augmentation layers; nothing of TensorFlow is imported there. :func:`batch_count` and
:func:`at_epoch` are what training asks of either.

The ``tf.data`` pipeline's parallelism is fixed rather than autotuned (:func:`pipeline_options`): ``model.fit`` drops
iterators (the validation set's at every evaluation; the training set's at every epoch's start when
the dataset's length is unknown), and with tf.data's autotuning on, dropping one now and then took
seconds (0.5 to 20 s measured on 2 busy cores, in about one epoch in three with augmentation),
up to doubling that epoch. With autotuning off no such wait was seen."""
from __future__ import annotations

import os
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from storage.manifest import Manifest

from .. import runtime
from ..data.images import ImageError, load_image
from ..data.inputs import InputError
from .config import FineTuneConfig


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


def parallel_calls(share: float = 1.0) -> int:
    """Threads for a parallel ``map``: ``share`` of the CPU cores, at least one."""
    return max(1, int((os.cpu_count() or 1) * share))


def pipeline_options():
    """``tf.data`` options of the fine-tuning pipelines: autotuning off (see the module's doc); the
    parallelism and buffer sizes are set in :func:`make_dataset` instead."""
    tf = runtime.tensorflow()
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def make_dataset(paths: Sequence[str], labels: np.ndarray, rel: Sequence[str], size: int, resize: str,
                 batch_size: int, skips: SkipLog, *, training: bool, augment=None, seed: int = 0,
                 cache: str | None = "", load=None, mixup: float = 0.0, n_classes: int = 0):
    """Batches of (uint8 image, label) for ``model.fit``: decode with the project's decoder (bad files dropped
    and logged in ``skips``), cache, shuffle and augment when training.

    With a cache (``cache`` not None; ``""``: in memory) the images are decoded here, before the dataset is
    returned, and :func:`batch_count` is the number of batches. ``load`` (``path -> uint8 array``,
    :func:`tasks.data.inputs.input_loader`) replaces the image decoder: sound is drawn as spectrograms.

    With ``n_classes`` the labels are one-hot rows (for a categorical loss), and with ``mixup`` > 0 as well, each
    training batch is mixed after augmentation (:func:`mixup_batch`); the image dtype is then float32.

    On the TensorFlow backend: a ``tf.data`` pipeline, prefetching two batches, fixed parallelism, no autotuning
    (:func:`pipeline_options`). On JAX and PyTorch: a :class:`Batches` (``keras.utils.PyDataset``) that always
    decodes every file here, once, into memory (``cache`` other than None is memory there; None too, so
    that the number of batches is known)."""
    if runtime.backend() == "tensorflow":
        return _tf_dataset(paths, labels, rel, size, resize, batch_size, skips, training=training, augment=augment,
                           seed=seed, cache=cache, load=load, mixup=mixup, n_classes=n_classes)
    if training and mixup > 0 and not n_classes:
        raise ValueError("mixup mixes labels: give n_classes for one-hot labels")
    images, kept = decode_all(paths, rel, size, resize, skips, load)
    return batches_class()(images, np.asarray(labels)[kept], batch_size, training=training,
                           augment=augment if training else None, seed=seed, mixup=mixup if training else 0.0,
                           n_classes=n_classes)


def batch_count(ds) -> int | None:
    """The number of batches of a dataset of :func:`make_dataset` per epoch; None when unknown (a ``tf.data``
    pipeline without a cache)."""
    if hasattr(ds, "cardinality"):
        n = int(ds.cardinality())
        return n if n >= 0 else None
    return int(ds.num_batches)


def at_epoch(ds, epoch: int) -> None:
    """Make the next epoch of a training dataset of :func:`make_dataset` the one numbered ``epoch`` (from 0, over
    every phase), so that a resumed run draws the order, augmentation and mixing the uninterrupted run would
    have. A :class:`Batches` draws them from (seed, epoch, batch); a ``tf.data`` pipeline starts its random
    sequence afresh with each new iterator, whatever this says."""
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)


def _tf_dataset(paths, labels, rel, size, resize, batch_size, skips, *, training, augment, seed, cache, load, mixup,
                n_classes):
    """The TensorFlow backend's :func:`make_dataset`: a ``tf.data`` pipeline."""
    tf = runtime.tensorflow()
    decode = _decoder(paths, rel, size, resize, skips, load)

    def load_one(path, label):
        img, ok = tf.numpy_function(lambda p: decode(p.decode()), [path], [tf.uint8, tf.bool], stateful=False)
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
    ds = ds.map(load_one, num_parallel_calls=parallel_calls(), deterministic=True)  # decoding: once, every core
    ds = ds.filter(decoded).map(drop_flag)
    if cache is not None:
        ds = ds.cache(cache)
        # Decoded now, once, into the cache: then the number of images that decoded is known, so the
        # dataset's cardinality is, and model.fit neither runs into the end of the data every epoch
        # nor throws away the iterator it made at the end of one for the next (see training.py).
        count = ds.with_options(pipeline_options()).reduce(np.int64(0), lambda n, *_: n + 1)
        ds = ds.apply(tf.data.experimental.assert_cardinality(int(count)))
    if training:
        ds = ds.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augment is not None:
        # every epoch, beside training: half the cores, so that it does not starve the training step
        ds = ds.map(augmented, num_parallel_calls=parallel_calls(0.5))
    if n_classes:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, n_classes)))
    if training and mixup > 0:
        if not n_classes:
            raise ValueError("mixup mixes labels: give n_classes for one-hot labels")
        # one stateless seed pair per batch, drawn anew every epoch: the same mixing for the same seed
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(lambda batch, s: mixup_batch(*batch, s, mixup))
    return ds.prefetch(2).with_options(pipeline_options())


def _decoder(paths, rel, size, resize, skips: SkipLog, load=None):
    """``path -> (uint8 image, decoded?)``: a file that fails is logged in ``skips`` (by its manifest path) and
    gives a black image and False."""
    rel_of = dict(zip(paths, rel))
    read = load if load is not None else (lambda path: load_image(path, size, resize))

    def decode(path: str):
        try:
            return read(path), True
        except (ImageError, *InputError) as exc:
            skips.add(rel_of.get(path, path), str(exc))
            return np.zeros((size, size, 3), np.uint8), False

    return decode


def decode_all(paths, rel, size, resize, skips: SkipLog, load=None) -> tuple[np.ndarray, np.ndarray]:
    """Every file decoded once (threads on every core, in order): (uint8 images of the files that decoded,
    the indices of those files). The others are logged in ``skips``."""
    decode = _decoder(paths, rel, size, resize, skips, load)
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)

    def one(i: int) -> None:
        images[i], ok[i] = decode(paths[i])

    if len(paths) > 1 and parallel_calls() > 1:
        with ThreadPoolExecutor(max_workers=parallel_calls(), thread_name_prefix="cnncodes-decode") as pool:
            list(pool.map(one, range(len(paths))))
    else:
        for i in range(len(paths)):
            one(i)
    kept = np.flatnonzero(ok)
    return (images if len(kept) == len(paths) else images[kept]), kept


def _draw_seed(*parts: int) -> int:
    """A 31-bit seed drawn from ``parts`` (the same parts, the same seed; any change of one, another)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def set_seed(seed: int) -> None:
    """``keras.utils.set_random_seed``, but on JAX and PyTorch without importing TensorFlow (Keras' seeds
    TensorFlow wherever it is installed, importing it): Python's, NumPy's and PyTorch's generators, from which
    Keras draws the seeds of the layers and initialisers given none."""
    keras = runtime.keras()
    if runtime.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    if runtime.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def reseed(model, seed: int) -> None:
    """Every random-number state of ``model``'s layers (Keras ``SeedGenerator`` states) set from ``seed``, each
    layer's its own: what the layers draw next depends on ``seed`` alone."""
    states = [v for v in model.variables if v.name.endswith("seed_generator_state")]
    for i, v in enumerate(states):
        v.assign(np.array([_draw_seed(seed, i), 0], dtype=v.dtype))


_BATCHES: dict[str, Any] = {}


def batches_class():
    """:class:`Batches`, a ``keras.utils.PyDataset`` (defined once Keras is imported on its backend)."""
    if "Batches" in _BATCHES:
        return _BATCHES["Batches"]
    keras = runtime.keras()

    class Batches(keras.utils.PyDataset):
        """Batches of decoded images held in memory, for the backends other than TensorFlow. Training: every
        epoch a new order (seeded by (seed, epoch)), then per batch the augmentation (the Keras layers,
        ``training=True``, their random states set from (seed, epoch, batch)), one-hot labels and mixup (a NumPy
        generator seeded by (seed, epoch, batch)): a batch is a function of the seed, its epoch and its index,
        whichever thread draws it and whenever. ``epoch`` counts the epochs ended (``on_epoch_end``);
        :meth:`set_epoch` sets it (a resumed run)."""

        def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool,
                     augment=None, seed: int = 0, mixup: float = 0.0, n_classes: int = 0):
            super().__init__(workers=1, use_multiprocessing=False)
            self.images, self.labels = images, np.asarray(labels)
            self.batch_size, self.training = int(batch_size), training
            self.augment, self.seed, self.mixup, self.n_classes = augment, int(seed), float(mixup), int(n_classes)
            self.epoch = 0
            self._order = self._draw_order()
            self._lock = threading.Lock()  # the augmentation's random states are one per model

        def __len__(self) -> int:
            return -(-len(self.images) // self.batch_size)

        def _draw_order(self) -> np.ndarray:
            if not self.training:
                return np.arange(len(self.images))
            return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)
            self._order = self._draw_order()

        def on_epoch_end(self) -> None:
            self.set_epoch(self.epoch + 1)

        def __getitem__(self, index: int):
            if not 0 <= index < len(self):
                raise IndexError(f"batch {index} of {len(self)}")
            take = self._order[index * self.batch_size:(index + 1) * self.batch_size]
            x, y = self.images[take], self.labels[take]
            if self.augment is not None:
                with self._lock:
                    reseed(self.augment, _draw_seed(self.seed, self.epoch, index))
                    x = keras.ops.convert_to_numpy(self.augment(x.astype(np.float32), training=True))
            if self.n_classes:
                y = np.eye(self.n_classes, dtype=np.float32)[y]
            if self.mixup > 0:
                rng = np.random.default_rng([self.seed, self.epoch, index, 1])
                x, y = mixup_arrays(x, y, rng, self.mixup)
            return x, y

    _BATCHES["Batches"] = Batches
    return Batches


def mixup_batch(x, y, seed, alpha: float):
    """mixup (Zhang et al., 2018): image ``i`` of the batch becomes ``lam_i * x_i + (1 - lam_i) * x_j`` and its
    one-hot label likewise, ``j`` a random permutation of the batch and ``lam_i ~ Beta(alpha, alpha)`` (as the
    ratio of two gamma draws); ``seed`` is a stateless seed pair. TensorFlow ops (in ``tf.data``);
    :func:`mixup_arrays` is the same in NumPy."""
    tf = runtime.tensorflow()
    x = tf.cast(x, tf.float32)
    n = tf.shape(x)[0]
    seed = tf.cast(seed, tf.int64)
    u = tf.random.stateless_gamma([n], seed=seed, alpha=alpha)
    v = tf.random.stateless_gamma([n], seed=seed + 1, alpha=alpha)
    lam = u / (u + v + 1e-12)
    perm = tf.argsort(tf.random.stateless_uniform([n], seed=seed + 2))
    lx, ly = tf.reshape(lam, [-1, 1, 1, 1]), tf.reshape(lam, [-1, 1])
    return lx * x + (1.0 - lx) * tf.gather(x, perm), ly * y + (1.0 - ly) * tf.gather(y, perm)


def mixup_arrays(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, alpha: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mixup_batch` on NumPy arrays, its draws from ``rng``: float32 images and labels."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    n = len(x)
    u, v = rng.gamma(alpha, size=n), rng.gamma(alpha, size=n)
    lam = (u / (u + v + 1e-12)).astype(np.float32)
    perm = np.argsort(rng.uniform(size=n), kind="stable")
    lx, ly = lam.reshape(-1, 1, 1, 1), lam.reshape(-1, 1)
    return lx * x + (1.0 - lx) * x[perm], ly * y + (1.0 - ly) * y[perm]


IMAGE_ONLY = ("flip", "rotation", "zoom")  # they move frequencies of a spectrogram: never applied to sound
SPECTROGRAM_AUGMENTATIONS = ("time-mask", "freq-mask", "time-shift")


def augmentations_for(cfg: FineTuneConfig, media: str) -> tuple[str, ...]:
    """The augmentations that apply to ``media``: for sound, flips, rotations and zooms are left out (a flipped
    spectrogram plays the sound backwards or upside down in pitch), and when none of the chosen ones is left,
    SpecAugment's masks and a time shift (:data:`SPECTROGRAM_AUGMENTATIONS`) are used instead."""
    chosen = tuple(cfg.augment)
    if media != "audio" or not chosen:
        return chosen
    kept = tuple(a for a in chosen if a not in IMAGE_ONLY)
    return kept if any(a in SPECTROGRAM_AUGMENTATIONS for a in kept) else kept + SPECTROGRAM_AUGMENTATIONS


def _band_mask(axis: int, strength: float, seed: int):
    """A Keras layer that blacks out (0) one random band of rows (axis 1: frequency) or columns (axis 2: time)
    per image, up to ``2 * strength`` of that axis wide (SpecAugment); training only. Keras ops and a Keras
    ``SeedGenerator``: it runs on every backend, and inside ``tf.data`` on TensorFlow."""
    keras = runtime.keras()
    ops = keras.ops

    class BandMask(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, x, training=None):
            if not training:
                return x
            n, length = ops.shape(x)[0], int(x.shape[axis])
            widest = max(1, int(length * 2.0 * strength))
            width = keras.random.randint((n,), 0, widest + 1, dtype="int32", seed=self.seed_generator)
            start = ops.cast(keras.random.uniform((n,), seed=self.seed_generator)
                             * ops.cast(length - width + 1, "float32"), "int32")
            pos = ops.arange(length, dtype="int32")[None, :]
            band = ops.logical_and(pos >= start[:, None], pos < (start + width)[:, None])
            keep = ops.cast(ops.logical_not(band), x.dtype)
            return x * (keep[:, :, None, None] if axis == 1 else keep[:, None, :, None])

    return BandMask(name="freq_mask" if axis == 1 else "time_mask")


def augmentation(cfg: FineTuneConfig, media: str = "image"):
    chosen = augmentations_for(cfg, media)
    if not chosen:
        return None
    keras = runtime.keras()
    s, layers = cfg.augment_strength, []
    if "time-mask" in chosen:
        layers.append(_band_mask(2, s, cfg.seed + 5))
    if "freq-mask" in chosen:
        layers.append(_band_mask(1, s, cfg.seed + 6))
    if "time-shift" in chosen:
        layers.append(keras.layers.RandomTranslation(0.0, s, fill_mode="constant", fill_value=0.0, seed=cfg.seed + 7,
                                                     name="time_shift"))
    cfg = cfg.model_copy(update={"augment": tuple(a for a in chosen if a not in SPECTROGRAM_AUGMENTATIONS)})
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
