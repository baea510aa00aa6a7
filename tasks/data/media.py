"""What kind of media a file is, judged by its name first and by its content otherwise.

The one place that decides which files a dataset scan takes: images, and sound recordings (audio, drawn
as spectrograms; :mod:`tasks.data.audio`). Two steps, both cheap:

* a file whose extension is a known image extension (:data:`IMAGE_EXTENSIONS`) is taken as an image
  without being opened, and one with a known sound extension (:data:`AUDIO_EXTENSIONS`) as audio; the decoder (:mod:`tasks.data.images`) judges its content later, so a PNG
  named ``.jpg`` is read as the PNG it is, and a text file named ``.png`` is skipped then, with its
  reason;
* any other file is sniffed: a sound file's signature (RIFF/RF64 WAVE, FLAC, Ogg, AIFF) makes it audio;
  otherwise Pillow's lazy ``Image.open`` reads its header (never its pixels). It is
  an image when Pillow identifies a format it can decode; otherwise :class:`NotMedia` says what it is
  not.

Pillow recognises a few formats (:data:`UNSIGNED_FORMATS`: TGA, GIMP brushes, IPTC, IM Tools) only by
trying to parse a header that carries no signature. Binary files of small numbers (a raw label file of
0s and 1s, say) parse as TGA often enough that they would be taken for images, and some even decode
into noise. So content of such a format is an image only when the file's name carries one of the
format's extensions (``.tga``) or the content carries a real signature (a TGA 2.0 footer): the rule
:func:`unsigned_format_reason`, which the sniff and the decoder both apply.

No pixels are decoded here and no TensorFlow is imported; Pillow is imported on the first sniff.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

IMAGE = "image"
AUDIO = "audio"
# Taken as sound by name alone; the decoder (libsndfile) judges the content later.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3")

# Taken as images by name alone: formats Pillow opens by a signature in its standard builds (JPEG 2000
# and AVIF need their codecs; without them the decoder reports the file). Everything else is sniffed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".webp",
                    ".tif", ".tiff", ".ico", ".cur", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga",
                    ".jp2", ".j2k", ".jpx", ".jpf", ".j2c", ".avif", ".qoi")

# Pillow formats identified by parsing a header that has no signature: see the module's docstring.
UNSIGNED_FORMATS = ("TGA", "GBR", "IPTC", "IMT")
# Not even tried: IM Tools has no extension to vouch for it, and its parser reads a text file line by
# line to the end (seconds for a large README) before giving up.
NEVER_TRIED = ("IMT",)
_TGA_FOOTER = b"TRUEVISION-XFILE.\x00"
SIGNATURE_BYTES = len(_TGA_FOOTER)  # how much of a file's end unsigned_format_reason needs


class NotMedia(Exception):
    """A file that is not media cnncodes can read; ``str(exc)`` is the reason, fit for a report."""


def _ext(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower() or "no extension"


def kind_from_extension(path: str | os.PathLike) -> str | None:
    """``"image"`` or ``"audio"`` when the name has a known extension of that kind, else None (the content
    decides)."""
    name = os.fspath(path).rpartition(os.sep)[2]  # Path(path).suffix, without building a Path (a scan asks per file)
    i = name.rfind(".")
    ext = name[i:].lower() if 0 < i < len(name) - 1 else ""
    return IMAGE if ext in IMAGE_EXTENSIONS else AUDIO if ext in AUDIO_EXTENSIONS else None


def describe_supported() -> str:
    """For messages: which files a scan takes."""
    return (f"files named {', '.join(IMAGE_EXTENSIONS)} (images) or {', '.join(AUDIO_EXTENSIONS)} (sound), and "
            "any other file Pillow identifies as an image or that carries a WAV, FLAC, Ogg or AIFF signature")


def audio_signature(head: bytes) -> bool:
    """True when the first 12 bytes of a file are those of a sound container libsndfile reads."""
    return (head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE") or head[:4] in (b"fLaC", b"OggS") \
        or (head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"))


def content_kind(path: str | os.PathLike) -> str:
    """The kind of a file :func:`sniff` accepted: audio by its signature, else image."""
    with open(path, "rb") as fh:
        return AUDIO if audio_signature(fh.read(12)) else IMAGE


_PIL = None
_FORMATS: list[str] = []


def _pillow():
    global _PIL
    if _PIL is None:
        from PIL import Image, ImageFile, UnidentifiedImageError

        # the size is the decoder's to judge, against its own limit; a sniff only identifies
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _PIL = Image, ImageFile, UnidentifiedImageError
    return _PIL


def pillow_formats() -> list[str]:
    """The formats to try when opening a file with Pillow (``Image.open(..., formats=...)``): every
    format this Pillow opens, in its own order, but those never taken (:data:`NEVER_TRIED`)."""
    if not _FORMATS:
        Image = _pillow()[0]
        Image.init()
        _FORMATS[:] = [f for f in Image.ID if f not in NEVER_TRIED]
    return _FORMATS


def unsigned_format_reason(fmt: str | None, name: str | os.PathLike | None, tail: bytes) -> str | None:
    """Why content that Pillow identified as ``fmt`` is not taken for an image, or None when it is.

    Only formats without a signature (:data:`UNSIGNED_FORMATS`) are refused: when ``name`` (the file's
    name, None when unknown) has none of the format's extensions and ``tail`` (the file's last
    :data:`SIGNATURE_BYTES` bytes) carries no signature."""
    if fmt not in UNSIGNED_FORMATS or (fmt == "TGA" and tail.endswith(_TGA_FOOTER)):
        return None
    Image = _pillow()[0]
    exts = sorted((e for e, f in Image.registered_extensions().items() if f == fmt), key=len)
    if name is not None and Path(name).suffix.lower() in exts:
        return None
    where = f"({_ext(name)})" if name is not None else "(bytes without a file name)"
    advice = f"if it really is one, name it {exts[0]} to use it" if exts else "it cannot be told from other data"
    return (f"not an image Pillow can identify by its content {where}: its header merely parses as {fmt}, "
            f"a format without a signature that Pillow can only guess at; {advice}")


def sniff(path: str | os.PathLike) -> str:
    """The media kind of ``path`` by its content (header only). Raises :class:`NotMedia` with the reason,
    or OSError when the file cannot be opened (missing, a folder, no permission)."""
    Image, ImageFile, UnidentifiedImageError = _pillow()
    ext = _ext(path)
    with open(path, "rb") as fh:
        head = fh.read(12)
        if not head:
            raise NotMedia("empty file (0 bytes)")
        if audio_signature(head):
            return AUDIO
        fh.seek(0)
        try:
            img = Image.open(fh, formats=pillow_formats())
        except Image.DecompressionBombError:
            return IMAGE  # identified: an image that declares a huge size; the decoder reports it
        except UnidentifiedImageError:
            raise NotMedia(f"not an image Pillow can identify ({ext})") from None
        except Exception as exc:  # a plugin that recognised the header and then choked on it
            raise NotMedia(f"not an image Pillow can read ({ext}): {exc or type(exc).__name__}") from None
        fmt = img.format or "unknown"
        if fmt in UNSIGNED_FORMATS:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - SIGNATURE_BYTES))
            reason = unsigned_format_reason(fmt, path, fh.read(SIGNATURE_BYTES))
            if reason:
                raise NotMedia(reason)
        if isinstance(img, ImageFile.StubImageFile) or (
                not img.tile and type(img).load is ImageFile.ImageFile.load):
            raise NotMedia(f"not an image: Pillow identifies it as {fmt} ({ext}) but cannot decode that into "
                           "an image")
    return IMAGE


def media_kind(path: str | os.PathLike) -> str:
    """The media kind of ``path``: by its extension when that is a known one, else by its content.
    Raises :class:`NotMedia` with the reason, or OSError when the file cannot be opened."""
    return kind_from_extension(path) or sniff(path)
