"""What the network sees of one file: the one switch between images and sound.

A dataset is images or sound recordings (``Manifest.media``, decided by the scan). Everything that
feeds a backbone (extraction, fine-tuning, prediction) asks :func:`input_loader` for a function
``path -> (size, size, 3) uint8`` and catches :data:`InputError`; an image is decoded and fitted
(:mod:`tasks.data.images`), a recording is decoded and drawn as a spectrogram with the backbone spec's
recipe (:mod:`tasks.data.audio`). :func:`input_identity` adds the recipe to a store's or model's identity,
so that codes of sound are never mixed with codes of images, nor codes of two recipes.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np

from .audio import AudioError, Spectrogram, load_spectrogram
from .images import DEFAULT_MAX_PIXELS, ImageError, load_image
from .media import AUDIO, IMAGE

InputError = (ImageError, AudioError)
MEDIA = (IMAGE, AUDIO)


def input_loader(media: str, size: int, resize: str = "stretch", max_pixels: int = DEFAULT_MAX_PIXELS,
                 spectrogram: Spectrogram | None = None) -> Callable[[str], np.ndarray]:
    """``path -> (size, size, 3)`` uint8 for ``media`` (raises one of :data:`InputError` with the reason)."""
    if media == AUDIO:
        return partial(load_spectrogram, size=size, recipe=spectrogram or Spectrogram())
    if media != IMAGE:
        raise ValueError(f"unknown media {media!r}; expected one of {MEDIA}")
    return partial(load_image, size=size, resize=resize, max_pixels=max_pixels)


def input_identity(identity: dict[str, Any], media: str, spectrogram: Spectrogram | None) -> dict[str, Any]:
    """``identity`` (a store's: backbone, weights, preprocessing, resize, ...) for ``media``: for sound the
    preprocessing starts with the spectrogram recipe (:meth:`Spectrogram.describe`); images keep theirs."""
    if media != AUDIO:
        return identity
    recipe = (spectrogram or Spectrogram()).describe()
    return {**identity, "preprocessing": f"{recipe} -> {identity.get('preprocessing')}"}
