"""Fine-tuning's input pipeline: ``tf.data`` over the manifest, decoded by the project's decoder
(bad files skipped and reported), cached, shuffled, augmented with Keras preprocessing layers.

Its parallelism is fixed rather than autotuned (:func:`pipeline_options`): ``model.fit`` drops
iterators (the validation set's at every evaluation; the training set's at every epoch's start when
the dataset's length is unknown), and with tf.data's autotuning on, dropping one now and then took
seconds (0.5 to 20 s measured on 2 busy cores, in about one epoch in three with augmentation),
up to doubling that epoch. With autotuning off no such wait was seen."""
from __future__ import annotations

import os
from typing import Sequence

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
    """``tf.data`` pipeline of (uint8 image, label) batches: decode with the project's decoder
    (bad files dropped and logged), cache, shuffle and augment when training, prefetch two batches;
    fixed parallelism, no autotuning (:func:`pipeline_options`).

    With a cache (``cache`` not None; ``""``: in memory) the images are decoded here, before the
    dataset is returned, and its ``cardinality()`` is the number of batches. ``load`` (``path -> uint8
    array``, :func:`tasks.data.inputs.input_loader`) replaces the image decoder: sound is drawn as spectrograms.

    With ``n_classes`` the labels are one-hot rows (for a categorical loss), and with ``mixup`` > 0 as well, each
    training batch is mixed after augmentation (:func:`mixup_batch`); the image dtype is then float32."""
    tf = runtime.tensorflow()
    rel_of = dict(zip(paths, rel))
    read = load if load is not None else (lambda path: load_image(path, size, resize))

    def decode(path_bytes):
        path = path_bytes.decode()
        try:
            return read(path), True
        except (ImageError, *InputError) as exc:
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
    ds = ds.map(load, num_parallel_calls=parallel_calls(), deterministic=True)  # decoding: once, every core
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


def mixup_batch(x, y, seed, alpha: float):
    """mixup (Zhang et al., 2018): image ``i`` of the batch becomes ``lam_i * x_i + (1 - lam_i) * x_j`` and its
    one-hot label likewise, ``j`` a random permutation of the batch and ``lam_i ~ Beta(alpha, alpha)`` (as the
    ratio of two gamma draws); ``seed`` is a stateless seed pair."""
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
    per image, up to ``2 * strength`` of that axis wide (SpecAugment); training only."""
    keras = runtime.keras()
    tf = runtime.tensorflow()

    class BandMask(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.gen = tf.random.Generator.from_seed(seed)

        def call(self, x, training=None):
            if not training:
                return x
            n, length = tf.shape(x)[0], tf.shape(x)[axis]
            widest = tf.maximum(1, tf.cast(tf.cast(length, tf.float32) * 2.0 * strength, tf.int32))
            width = self.gen.uniform([n], 0, widest + 1, dtype=tf.int32)
            start = tf.cast(self.gen.uniform([n]) * tf.cast(length - width + 1, tf.float32), tf.int32)
            pos = tf.range(length)[None, :]
            band = (pos >= start[:, None]) & (pos < (start + width)[:, None])
            keep = tf.cast(~band, x.dtype)
            shape = [n, length, 1, 1] if axis == 1 else [n, 1, length, 1]
            return x * tf.reshape(keep, shape)

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
