"""Decode image files into upright RGB uint8 arrays of the model's input size.

Any file Pillow identifies and decodes, judged by its content, not its name
(JPEG, PNG, BMP, GIF, WebP, TIFF, ICO, PPM/PGM/PBM, TGA, JPEG 2000 where Pillow
has OpenJPEG, ...), in any mode (1-bit, grayscale, palette, RGBA, CMYK, 16-bit,
32-bit integer, float) comes out as ``(size, size, 3)`` uint8 RGB, rotated
upright by its EXIF orientation; of an animation or a multi-page file, the first
frame. A name only vouches for a format Pillow can merely guess at (a TGA
without its footer; see :mod:`tasks.data.media`). JPEGs are decoded at the
smallest DCT scale that still covers the target size (Pillow's draft mode): on a
CPU shared with the model, pixels that would be thrown away by the resize are
never decoded.

Failures raise :class:`ImageError` with a reason fit for a report; the caller
skips the file. No TensorFlow here.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from storage.errors import ParameterError

from .media import SIGNATURE_BYTES, pillow_formats, unsigned_format_reason

RESIZE_MODES = ("stretch", "crop", "pad")
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000; larger files are decompression-bomb suspects
_BACKGROUND = (255, 255, 255)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves


class ImageError(Exception):
    """A file that cannot be used as an image; ``str(exc)`` is the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        trns = img.info.get("transparency")
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range onto 8 bits
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if isinstance(trns, int):  # a transparent grey value (PNG tRNS): keep it as alpha
            alpha = np.where(np.asarray(img) == trns, 0, 255).astype(np.uint8)
            img = Image.fromarray(np.dstack([gray, alpha]), "LA")
        else:
            img = Image.fromarray(gray, "L")
    elif mode in ("L", "RGB") and "transparency" in img.info:
        try:  # a transparent colour key (PNG tRNS): composited below like alpha
            img = img.convert("RGBA")
        except (ValueError, TypeError):  # a malformed key: ignore it rather than lose the image
            pass
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        img = Image.alpha_composite(canvas, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def _first_frame(img: Image.Image) -> None:
    """Go to the first frame of an animation or multi-page file (where the file is opened already)."""
    if img.tell() != 0:
        try:
            img.seek(0)
        except EOFError:  # a format whose frames start at 1 (PSD layers): the composite is shown
            pass


def _mpx(n: int) -> str:
    """Pixel count for a message: ``9 Mpx``, ``1.5 Mpx``, ``0.25 Mpx`` (never a misleading ``0 Mpx``)."""
    return f"{n / 1e6:.3g} Mpx"


def _fit(img: Image.Image, size: int, resize: str) -> Image.Image:
    w, h = img.size
    if resize == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    if resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), _BACKGROUND)
        canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    return img.resize((size, size), Image.Resampling.BILINEAR)


def decode_image(data: bytes, size: int, resize: str = "stretch",
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str | Path | None = None) -> np.ndarray:
    """Bytes of an image file -> ``(size, size, 3)`` uint8 RGB. Raises ImageError.

    The format is judged by the content, whatever ``name`` (the file's name, if known) says; the name
    only vouches for a format Pillow can merely guess at (a TGA without its footer needs ``.tga``; see
    :func:`tasks.data.media.unsigned_format_reason`)."""
    if resize not in RESIZE_MODES:
        raise ParameterError(f"resize must be one of {RESIZE_MODES}; got {resize!r}.")
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=pillow_formats())
    except UnidentifiedImageError:
        raise ImageError("not an image: Pillow cannot identify the file format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large, refused as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncated" in str(exc).lower():
            raise ImageError(f"truncated file: the header ends early ({exc})") from None
        raise ImageError(f"corrupt image header: {exc}") from None
    guess = unsigned_format_reason(img.format, name, data[-SIGNATURE_BYTES:])
    if guess:
        raise ImageError(guess)
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"too large: {w}x{h} = {_mpx(w * h)} is over the limit of {_mpx(max_pixels)} "
                         f"(max_pixels={max_pixels}; decompression-bomb guard; raise max_pixels to use it)")
    if w == 0 or h == 0:
        raise ImageError(f"empty image ({w}x{h} pixels)")
    fmt = img.format or "image"
    try:
        if fmt in ("JPEG", "MPO"):
            img.draft("RGB", (size, size))
        _first_frame(img)
        img = ImageOps.exif_transpose(img)
        img.load()
        img = _to_rgb(img)
        img = _fit(img, size, resize)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise ImageError("truncated file: the image data ends early") from None
        if "not available" in msg:  # e.g. "decoder jpeg2k not available": this Pillow lacks the codec
            raise ImageError(f"cannot decode this {fmt} file: the installed Pillow has no "
                             f"decoder for it ({msg}); install a Pillow built with it, or convert the file")
        raise ImageError(f"cannot decode: {msg or type(exc).__name__}") from None
    if arr.shape != (size, size, 3):
        raise ImageError(f"decoded to unexpected shape {arr.shape}")
    return arr


def load_image(path: str | Path, size: int, resize: str = "stretch",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one file; raises ImageError with the reason."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found (deleted after the scan?)") from None
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    return decode_image(data, size, resize, max_pixels, name=Path(path).name)
