"""Sound as images: decode recordings, and render the spectrogram image a backbone sees.

An image CNN takes sound once the sound is a picture: a spectrogram (time across, frequency up,
energy as brightness) "resembles a 2D image". This module owns both halves of that:

* **decoding** (:func:`load_audio`): any file libsndfile reads through ``soundfile`` (WAV in PCM
  8/16/24/32-bit and float, WAV-extensible, RF64, FLAC, OGG Vorbis, AIFF, MP3 where the bundled
  libsndfile has it), mixed down to mono (the mean of the channels) and resampled to the recipe's
  rate with a polyphase filter (:func:`scipy.signal.resample_poly`). A file that is empty, unreadable,
  has no samples, is silent (peak below -80 dBFS) or is longer than ``max_seconds`` (judged from its
  header, before any sample is read) raises :class:`AudioError` with a reason fit for a report: the
  caller skips the file, as with images.
* **the recipe** (:class:`Spectrogram`): sample rate, window, hop, kind (log-mel or linear STFT), mel
  bands, frequency range, a fixed duration with its crop/pad policy, and the dynamic range. It is part
  of every store's identity (:meth:`Spectrogram.describe`), so codes of two recipes are never mixed.
* **rendering** (:func:`spectrogram_image`): framing with a periodic Hann window, the power spectrum
  by ``numpy.fft.rfft``, the mel filterbank of :func:`mel_matrix` (the HTK mel scale and triangles
  of ``tf.signal.linear_to_mel_weight_matrix``, which a test checks it equals), decibels relative to
  the loudest bin clipped at ``top_db`` below it, mapped onto 0-255 like an 8-bit image, low
  frequencies at the bottom, resized to the backbone's square input, and repeated into three channels
  (``gray``) or coloured by a matplotlib colour map (``colormap``).
  The family's own ``preprocess_input`` then applies as to a photo.

NumPy rather than TensorFlow computes the spectrogram: it runs in the decoding threads of extraction
and inside ``tf.data``'s ``numpy_function`` during fine-tuning, where calling TensorFlow again from
Python is a known way to deadlock; its FFT releases the GIL, so the threads run side by side.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from storage.errors import ParameterError

from ..settings import Settings

AUDIO = "audio"
# Taken as sound by name alone (the decoder judges the content later); other files are sniffed.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3")
SILENCE_DBFS = -80.0  # a recording whose peak stays below this is silent
COLORMAPS = ("gray", "viridis", "magma", "turbo")


class AudioError(Exception):
    """A file that cannot be used as a sound recording; ``str(exc)`` is the reason."""


class Spectrogram(Settings):
    """The spectrogram recipe: how a sound recording becomes the backbone's input image (used when the data is
    audio; recorded in the store, so codes of different recipes are never mixed)."""

    kind: Literal["mel", "stft"] = Field("mel", description="log-mel spectrogram, or the linear-frequency STFT "
                                                            "(log power)")
    sample_rate: int = Field(16000, ge=1000, le=384000, description="recordings are resampled to this rate (Hz)")
    window_ms: float = Field(25.0, gt=0, description="analysis window length in milliseconds (Hann)")
    hop_ms: float = Field(10.0, gt=0, description="step between windows in milliseconds")
    n_mels: int = Field(128, ge=1, le=1024, description="mel bands (kind mel)")
    fmin: float = Field(0.0, ge=0, description="lowest frequency shown (Hz)")
    fmax: float | None = Field(None, gt=0, description="highest frequency shown (Hz; default: half the sample rate)")
    duration: float | None = Field(1.0, gt=0, description="seconds shown in every image: longer recordings are "
                                                          "cropped, shorter ones padded with silence; 'none' shows "
                                                          "each recording whole, stretched to the width")
    fit: Literal["center", "start"] = Field("center", description="where a recording sits in the fixed duration: "
                                                                  "'center' crops or pads both ends equally, 'start' "
                                                                  "keeps the beginning and crops or pads the end")
    trim_db: float | None = Field(None, gt=0, description="cut leading and trailing parts quieter than this many "
                                                         "decibels below the loudest window before fitting the "
                                                         "duration ('none': keep them)")
    top_db: float = Field(80.0, gt=0, description="dynamic range shown: from the loudest bin of each recording down "
                                                  "to this many decibels below it (the bottom of the scale)")
    colormap: Literal[COLORMAPS] = Field("viridis", description="how decibels become colours: 'gray' (the same "
                                                              "grey in all three channels) or a matplotlib "
                                                              "colour map, whose hues an ImageNet network tells apart")
    max_seconds: float = Field(600.0, gt=0, description="longer recordings are skipped (absurdly long files)")

    @model_validator(mode="before")
    @classmethod
    def _none(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for k in ("fmax", "duration", "trim_db"):
                if isinstance(data.get(k), str) and data[k].lower() in ("none", "null", ""):
                    data[k] = None
        return data

    @model_validator(mode="after")
    def _check(self) -> "Spectrogram":
        nyquist = self.sample_rate / 2
        top = self.top_hz
        if top > nyquist:
            raise ParameterError(f"fmax must be at most half the sample rate ({nyquist:g} Hz at --sample-rate "
                                 f"{self.sample_rate}); got {top:g}. Lower --fmax or raise --sample-rate.")
        if self.fmin >= top:
            raise ParameterError(f"fmin must be below fmax; got fmin {self.fmin:g} Hz and fmax {top:g} Hz.")
        if self.frame_length < 16:
            raise ParameterError(f"window_ms {self.window_ms:g} is only {self.frame_length} samples at "
                                 f"{self.sample_rate} Hz; give at least 16 samples (a longer --window-ms).")
        if self.hop_length < 1:
            raise ParameterError(f"hop_ms {self.hop_ms:g} is under one sample at {self.sample_rate} Hz; raise it.")
        if self.duration is not None and self.duration > self.max_seconds:
            raise ParameterError(f"duration {self.duration:g} s is longer than max_seconds {self.max_seconds:g} s: "
                                 "no recording could fill it. Raise --max-seconds or lower --duration.")
        return self

    @property
    def top_hz(self) -> float:
        return float(self.fmax) if self.fmax is not None else self.sample_rate / 2

    @property
    def frame_length(self) -> int:
        return int(round(self.window_ms * self.sample_rate / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.hop_ms * self.sample_rate / 1000))

    @property
    def fft_length(self) -> int:
        return 1 << (self.frame_length - 1).bit_length()

    def recipe(self) -> dict[str, Any]:
        """What decides the pixels (``max_seconds`` only decides which files are skipped)."""
        return self.model_dump(mode="json", exclude={"max_seconds"})

    def describe(self) -> str:
        """One line that names the recipe in a store's identity: two recipes, two strings."""
        r = self.recipe()
        return "spectrogram(" + ",".join(f"{k}={r[k]}" for k in sorted(r)) + ")"


# --------------------------------------------------------------------------- decoding
def _soundfile():
    import soundfile

    return soundfile


def load_audio(path: str | Path, sample_rate: int, max_seconds: float = 600.0) -> np.ndarray:
    """Read one recording as mono float32 at ``sample_rate`` (values in [-1, 1]). Raises AudioError."""
    sf = _soundfile()
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise AudioError("file not found (deleted after the scan?)") from None
    except OSError as exc:
        raise AudioError(f"unreadable: {exc.strerror or exc}") from None
    if size == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        info = sf.info(str(p))
    except (RuntimeError, sf.LibsndfileError if hasattr(sf, "LibsndfileError") else RuntimeError) as exc:
        raise AudioError(f"not a sound file libsndfile can read ({p.suffix.lower() or 'no extension'}): "
                         f"{_short(exc)}") from None
    except OSError as exc:
        raise AudioError(f"unreadable: {exc.strerror or exc}") from None
    rate, frames = int(info.samplerate), int(info.frames)
    if rate <= 0 or frames <= 0:
        raise AudioError(f"empty recording: no samples ({info.format} {info.subtype}, {frames} frames)")
    seconds = frames / rate
    if seconds > max_seconds:
        raise AudioError(f"too long: {seconds:.1f} s is over the limit of {max_seconds:g} s (max_seconds; raise "
                         "--max-seconds to use it, or cut the recording into pieces)")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError) as exc:
        raise AudioError(f"cannot decode this {info.format} file: {_short(exc)}") from None
    if data.size == 0:
        raise AudioError("empty recording: no samples could be decoded")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(wave)):
        wave = np.nan_to_num(wave, nan=0.0, posinf=1.0, neginf=-1.0)
    peak = float(np.max(np.abs(wave)))
    if peak <= 10 ** (SILENCE_DBFS / 20):
        level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
        raise AudioError(f"silent recording ({level}, below {SILENCE_DBFS:g} dBFS): nothing to show")
    return resample(wave, int(rate), sample_rate)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:200]


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` from ``rate`` to ``target`` Hz by polyphase filtering (exact for integer ratios)."""
    if rate == target:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def trim(wave: np.ndarray, recipe: Spectrogram) -> np.ndarray:
    """``wave`` without the leading and trailing windows quieter than ``trim_db`` below the loudest one."""
    n, hop = recipe.frame_length, recipe.hop_length
    if recipe.trim_db is None or len(wave) <= n:
        return wave
    count = 1 + (len(wave) - n) // hop
    frames = np.lib.stride_tricks.as_strided(wave, (count, n), (wave.strides[0] * hop, wave.strides[0]),
                                             writeable=False)
    db = 10.0 * np.log10(np.maximum(np.mean(frames.astype(np.float64) ** 2, axis=1), 1e-20))
    loud = np.flatnonzero(db >= db.max() - recipe.trim_db)
    return wave[loud[0] * hop: loud[-1] * hop + n]


def fit_duration(wave: np.ndarray, recipe: Spectrogram) -> np.ndarray:
    """Trim (``trim_db``), then crop or pad ``wave`` to the recipe's duration (unchanged when it has none)."""
    wave = trim(wave, recipe)
    if recipe.duration is None:
        return wave
    n = int(round(recipe.duration * recipe.sample_rate))
    have = len(wave)
    if have >= n:
        start = (have - n) // 2 if recipe.fit == "center" else 0
        return wave[start:start + n]
    before = (n - have) // 2 if recipe.fit == "center" else 0
    return np.pad(wave, (before, n - have - before))


# --------------------------------------------------------------------------- spectrograms
def _hz_to_mel(f):
    return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)


@lru_cache(maxsize=16)
def mel_matrix(n_mels: int, n_bins: int, sample_rate: int, fmin: float, fmax: float) -> np.ndarray:
    """``(n_bins, n_mels)`` triangular filters on the HTK mel scale, as
    ``tf.signal.linear_to_mel_weight_matrix`` builds them (the DC bin gets no weight)."""
    nyquist = sample_rate / 2.0
    bins_hz = np.linspace(0.0, nyquist, n_bins)[1:]
    bins_mel = _hz_to_mel(bins_hz)[:, None]
    edges = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2)
    lower, center, upper = edges[:-2][None, :], edges[1:-1][None, :], edges[2:][None, :]
    lower_slope = (bins_mel - lower) / (center - lower)
    upper_slope = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
    return np.pad(weights, [[1, 0], [0, 0]]).astype(np.float32)


def mel_center_hz(recipe: Spectrogram) -> np.ndarray:
    """The centre frequency of each mel band, lowest first."""
    edges = np.linspace(_hz_to_mel(recipe.fmin), _hz_to_mel(recipe.top_hz), recipe.n_mels + 2)
    return 700.0 * np.expm1(edges[1:-1] / 1127.0)


@lru_cache(maxsize=16)
def _window(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)  # periodic Hann, as tf.signal


def power_spectrogram(wave: np.ndarray, recipe: Spectrogram) -> np.ndarray:
    """``(frames, fft_length // 2 + 1)`` power spectrum, frames as ``tf.signal.stft`` cuts them (no padding at
    the end; a recording shorter than one window is padded to one)."""
    n, hop, nfft = recipe.frame_length, recipe.hop_length, recipe.fft_length
    if len(wave) < n:
        wave = np.pad(wave, (0, n - len(wave)))
    count = 1 + (len(wave) - n) // hop
    frames = np.lib.stride_tricks.as_strided(wave, (count, n), (wave.strides[0] * hop, wave.strides[0]),
                                             writeable=False)
    spec = np.fft.rfft(frames * _window(n), n=nfft, axis=1)
    return (spec.real ** 2 + spec.imag ** 2).astype(np.float32)


def spectrogram(wave: np.ndarray, recipe: Spectrogram) -> np.ndarray:
    """``(bands, frames)`` power per band, lowest band first: mel bands (kind mel) or the STFT bins between
    fmin and fmax (kind stft)."""
    power = power_spectrogram(fit_duration(np.asarray(wave, np.float32), recipe), recipe)
    n_bins = power.shape[1]
    if recipe.kind == "mel":
        bands = power @ mel_matrix(recipe.n_mels, n_bins, recipe.sample_rate, float(recipe.fmin),
                                   float(recipe.top_hz))
    else:
        hz = np.linspace(0.0, recipe.sample_rate / 2, n_bins)
        bands = power[:, (hz >= recipe.fmin) & (hz <= recipe.top_hz)]
    return bands.T


def to_image(bands: np.ndarray, recipe: Spectrogram, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8: decibels relative to the loudest bin, ``top_db`` below it the bottom of the
    scale, the loudest its top; low frequencies at the bottom (row ``size - 1``), time from left to right; grey,
    or coloured by ``recipe.colormap``."""
    from PIL import Image

    db = 10.0 * np.log10(np.maximum(bands, 1e-10))
    db = np.clip(db - db.max(), -recipe.top_db, 0.0)
    gray = ((db + recipe.top_db) * (255.0 / recipe.top_db)).astype(np.float32)[::-1]  # high bands first: on top
    img = Image.fromarray(np.ascontiguousarray(gray), "F").resize((size, size), Image.Resampling.BILINEAR)
    out = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
    if recipe.colormap != "gray":
        return _palette(recipe.colormap)[out]
    return np.repeat(out[:, :, None], 3, axis=2)


@lru_cache(maxsize=8)
def _palette(name: str) -> np.ndarray:
    """``(256, 3)`` uint8: the colour of each grey level under the matplotlib colour map ``name``."""
    import matplotlib

    return np.rint(matplotlib.colormaps[name](np.arange(256) / 255.0)[:, :3] * 255).astype(np.uint8)


def spectrogram_image(wave: np.ndarray, recipe: Spectrogram, size: int) -> np.ndarray:
    """The image the network sees for ``wave`` (mono float32 at the recipe's rate)."""
    return to_image(spectrogram(wave, recipe), recipe, size)


def load_spectrogram(path: str | Path, size: int, recipe: Spectrogram) -> np.ndarray:
    """Read one recording and render it: ``(size, size, 3)`` uint8. Raises AudioError."""
    return spectrogram_image(load_audio(path, recipe.sample_rate, recipe.max_seconds), recipe, size)


def write_png(path: str | Path, output: str | Path, size: int, recipe: Spectrogram) -> dict[str, Any]:
    """Write the image the network sees for the recording ``path`` (``cnncodes spectrogram``). Raises
    DatasetError when the file cannot be used (the reason a scan would give)."""
    from PIL import Image

    from storage.errors import DatasetError
    from storage.files import atomic_path

    try:
        wave = load_audio(path, recipe.sample_rate, recipe.max_seconds)
    except AudioError as exc:
        raise DatasetError(f"cannot draw {path}: {exc}.") from None
    img = spectrogram_image(wave, recipe, size)
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ParameterError(f"--output must name a .png file; got {str(output)!r}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return {"file": str(path), "output": str(out.resolve()), "size": size, "seconds": len(wave) / recipe.sample_rate,
            "sample_rate": recipe.sample_rate, "recipe": recipe.recipe()}
