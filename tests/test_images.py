"""tasks.data.images: any image file -> (size, size, 3) uint8 upright RGB, or ImageError with a reason.

Every case is generated here with Pillow/numpy; no TensorFlow.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from storage.errors import ParameterError
from tasks.data.images import RESIZE_MODES, ImageError, decode_image, load_image

# decode_image silences these at import, but pytest resets warning filters for each test
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 40), (20, 30, 220), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return Image.fromarray(a, "RGB")


def assert_colour(pixels: np.ndarray, colour, tol: float = 12):
    """Mean colour of ``pixels`` (..., 3) is ``colour`` within ``tol`` per channel."""
    mean = pixels.reshape(-1, 3).astype(float).mean(0)
    assert np.all(np.abs(mean - np.asarray(colour, float)) <= tol), (mean, colour)


def check_output(arr: np.ndarray, size: int):
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8


# -- colour modes ----------------------------------------------------------------------------

def test_uniform_grayscale_decodes_to_equal_channels_of_that_value(tmp_path):
    path = save(Image.new("L", (37, 23), 100), tmp_path / "gray.png")
    arr = load_image(path, 16)
    check_output(arr, 16)
    assert np.abs(arr.astype(int) - 100).max() <= 1


def test_grayscale_gradient_channels_equal_and_track_gray(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16x16, columns 0..240
    path = save(Image.fromarray(gray, "L"), tmp_path / "grad.png")
    arr = load_image(path, 16)  # same size: no resampling
    check_output(arr, 16)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert np.array_equal(arr[..., 0], gray)


def test_palette_image_keeps_its_colours(tmp_path):
    img = halves(32, 32, RED, GREEN).quantize(colors=4)
    assert img.mode == "P"
    arr = load_image(save(img, tmp_path / "pal.png"), 32)
    check_output(arr, 32)
    assert_colour(arr[:, :14], RED, tol=3)
    assert_colour(arr[:, 18:], GREEN, tol=3)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_composites_onto_white(tmp_path, fmt):
    idx = np.zeros((24, 24), np.uint8)
    idx[:, 12:] = 1  # right half: palette entry 1, declared transparent
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 255, 0, 0, 0] + [0] * (256 * 3 - 6))  # 0 = blue, 1 = black
    data = encode(img, fmt, transparency=1)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info  # the case under test
    arr = decode_image(data, 24)
    check_output(arr, 24)
    assert_colour(arr[:, :10], (0, 0, 255), tol=2)
    assert_colour(arr[:, 14:], WHITE, tol=2)  # transparent black -> white background, not black


def test_rgba_transparent_areas_are_white_and_opaque_areas_keep_colour(tmp_path):
    a = np.zeros((20, 40, 4), np.uint8)
    a[:, :20] = GREEN + (255,)
    a[:, 20:] = (10, 10, 10, 0)  # fully transparent, dark colour underneath
    arr = load_image(save(Image.fromarray(a, "RGBA"), tmp_path / "rgba.png"), 20, resize="stretch")
    check_output(arr, 20)
    assert_colour(arr[:, :8], GREEN, tol=2)
    assert_colour(arr[:, 12:], WHITE, tol=2)


def test_half_transparent_rgba_is_blended_with_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[...] = (0, 0, 0, 128)  # black at 50% -> mid grey on white
    arr = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"), 8)
    assert np.all(np.abs(arr.astype(int) - 127) <= 2)


@pytest.mark.parametrize("kind", ["L", "RGB", "I;16"])
def test_colour_key_transparency_is_white_like_alpha(tmp_path, kind):
    """PNG tRNS on a grey/RGB/16-bit image marks one value transparent; it must come out white
    like the transparent parts of RGBA and palette images (it used to come out black)."""
    if kind == "L":
        a = np.full((8, 8), 60, np.uint8)
        a[:, 4:] = 0
        img, key, opaque = Image.fromarray(a, "L"), 0, (60, 60, 60)
    elif kind == "RGB":
        a = np.zeros((8, 8, 3), np.uint8)
        a[:, :4] = GREEN
        img, key, opaque = Image.fromarray(a, "RGB"), (0, 0, 0), GREEN
    else:
        a = np.full((8, 8), 257 * 60, np.uint16)
        a[:, 4:] = 0
        img, key, opaque = Image.fromarray(a), 0, (60, 60, 60)
    data = encode(img, "PNG", transparency=key)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    arr = decode_image(data, 8)
    assert_colour(arr[:, :4], opaque, tol=1)
    assert_colour(arr[:, 4:], WHITE, tol=0)


def test_cmyk_jpeg_decodes_to_plausible_rgb(tmp_path):
    img = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan
    img.paste((0, 0, 0, 255), (0, 16, 32, 32))  # bottom half: pure black ink
    path = save(img, tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    arr = load_image(path, 32)
    check_output(arr, 32)
    top = arr[:12].reshape(-1, 3).astype(float).mean(0)
    assert top[0] < 40 and top[1] > 215 and top[2] > 215, top  # cyan: no red, full green and blue
    assert arr[20:].astype(float).mean() < 40  # black stays black (not inverted)


@pytest.mark.parametrize("value, expected", [(65535, 255), (32896, 128), (257 * 77, 77), (0, 0)])
def test_16bit_png_maps_onto_8_bits(tmp_path, value, expected):
    img = Image.fromarray(np.full((12, 20), value, np.uint16))
    path = save(img, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    arr = load_image(path, 8)
    check_output(arr, 8)
    assert np.abs(arr.astype(int) - expected).max() <= 1  # 32896 -> 128, not clipped to 255


def test_16bit_gradient_keeps_its_order_and_scale(tmp_path):
    v = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    path = save(Image.fromarray(v), tmp_path / "ramp16.tif")
    arr = load_image(path, 16)
    assert np.array_equal(arr[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


def test_32bit_integer_image_over_255_is_scaled_not_clipped(tmp_path):
    a = np.full((10, 10), 32896, np.int32)
    a[:, 5:] = 65535
    path = save(Image.fromarray(a, "I"), tmp_path / "int32.tif")
    assert Image.open(path).mode == "I"
    arr = load_image(path, 10)
    assert np.abs(arr[:, :5].astype(int) - 128).max() <= 1
    assert np.all(arr[:, 5:] == 255)


def test_1bit_image_is_black_and_white(tmp_path):
    a = np.zeros((16, 16), bool)
    a[:, 8:] = True
    img = Image.fromarray(a).convert("1")
    assert img.mode == "1"
    for ext in ("png", "bmp"):
        arr = load_image(save(img, tmp_path / f"bits.{ext}"), 16)
        check_output(arr, 16)
        assert np.all(arr[:, :8] == 0) and np.all(arr[:, 8:] == 255), ext


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff_maps_to_8_bits(tmp_path, scale):
    """Float images in [0, 1] are scaled to [0, 255]; float images already in [0, 255] are kept."""
    ramp = np.linspace(0, 1, 16, dtype=np.float32)[None].repeat(16, 0) * scale
    path = tmp_path / "float.tif"
    try:
        Image.fromarray(ramp, "F").save(path)
    except (OSError, ValueError, KeyError) as exc:  # pragma: no cover - depends on the Pillow build
        pytest.skip(f"Pillow cannot write float TIFF here: {exc}")
    assert Image.open(path).mode == "F"
    arr = load_image(path, 16)
    check_output(arr, 16)
    expected = np.rint(np.linspace(0, 255, 16))
    assert np.abs(arr[0, :, 0].astype(float) - expected).max() <= 1
    assert np.all(np.diff(arr[0, :, 0].astype(int)) > 0)


# -- orientation ------------------------------------------------------------------------------

def _exif_jpeg(path, orientation: int | None):
    img = halves(80, 40)  # stored: wide, left red, right blue
    kw = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(path, "JPEG", **kw)
    return path


def test_jpeg_without_exif_is_not_rotated(tmp_path):
    arr = load_image(_exif_jpeg(tmp_path / "plain.jpg", None), 32)
    assert_colour(arr[:, :12], RED)
    assert_colour(arr[:, 20:], BLUE)


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    path = _exif_jpeg(tmp_path / f"rot{orientation}.jpg", orientation)
    assert Image.open(path).getexif().get(0x0112) == orientation
    arr = load_image(path, 32)
    check_output(arr, 32)
    assert_colour(arr[:12], top)
    assert_colour(arr[20:], bottom)
    # upright the image is tall (40 wide, 80 high): padding goes left and right, not above and below
    padded = load_image(path, 32, resize="pad")
    check_output(padded, 32)
    assert_colour(padded[:, :6], WHITE, tol=1)
    assert_colour(padded[:, -6:], WHITE, tol=1)
    assert_colour(padded[:12, 12:20], top)


def test_exif_orientation_3_turns_upside_down(tmp_path):
    arr = load_image(_exif_jpeg(tmp_path / "rot3.jpg", 3), 32)
    assert_colour(arr[:, :12], BLUE)
    assert_colour(arr[:, 20:], RED)


# -- formats ----------------------------------------------------------------------------------

def _quadrants(n: int = 32) -> tuple[Image.Image, dict]:
    a = np.empty((n, n, 3), np.uint8)
    h = n // 2
    colours = {"tl": RED, "tr": GREEN, "bl": BLUE, "br": (240, 220, 30)}
    a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:] = colours["tl"], colours["tr"], colours["bl"], colours["br"]
    return Image.fromarray(a, "RGB"), colours


FORMATS = [("png", {}, 2), ("bmp", {}, 2), ("tiff", {}, 2), ("gif", {}, 12), ("jpg", {"quality": 95}, 12),
           ("webp", {"lossless": True}, 2), ("webp", {"quality": 90}, 16)]


@pytest.mark.parametrize("ext, kw, tol", FORMATS, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(FORMATS)])
def test_common_formats_decode_with_their_colours(tmp_path, ext, kw, tol):
    if ext == "webp" and not features.check("webp"):  # pragma: no cover
        pytest.skip("Pillow built without WebP")
    img, colours = _quadrants(32)
    path = save(img, tmp_path / f"quad.{ext}", **kw)
    arr = load_image(path, 32)
    check_output(arr, 32)
    assert_colour(arr[2:14, 2:14], colours["tl"], tol)
    assert_colour(arr[2:14, 18:30], colours["tr"], tol)
    assert_colour(arr[18:30, 2:14], colours["bl"], tol)
    assert_colour(arr[18:30, 18:30], colours["br"], tol)


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE, GREEN)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3  # really animated
    arr = load_image(path, 20)
    check_output(arr, 20)
    assert_colour(arr, RED, tol=8)


def test_load_image_equals_decode_image_of_the_bytes(tmp_path):
    img, _ = _quadrants(40)
    path = save(img, tmp_path / "q.png")
    assert np.array_equal(load_image(path, 24, "crop"), decode_image(path.read_bytes(), 24, "crop"))


# -- resizing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("resize", RESIZE_MODES)
@pytest.mark.parametrize("wh", [(90, 30), (30, 90), (50, 50), (7, 3)])
def test_every_resize_mode_gives_the_target_shape(resize, wh):
    img = Image.new("RGB", wh, RED)
    arr = decode_image(encode(img, "PNG"), 24, resize=resize)
    check_output(arr, 24)


def test_pad_leaves_white_bands_above_and_below_a_wide_image():
    arr = decode_image(encode(Image.new("RGB", (120, 30), RED), "PNG"), 40, resize="pad")
    # 120x30 fits as 40x10 in the middle: rows 15..24 red, the rest white
    assert np.all(arr[:14] == 255) and np.all(arr[26:] == 255)
    assert_colour(arr[16:24], RED, tol=1)


def test_pad_leaves_white_bands_left_and_right_of_a_tall_image():
    arr = decode_image(encode(Image.new("RGB", (30, 120), BLUE), "PNG"), 40, resize="pad")
    assert np.all(arr[:, :14] == 255) and np.all(arr[:, 26:] == 255)
    assert_colour(arr[:, 16:24], BLUE, tol=1)


def _three_bands(w: int = 150, h: int = 50) -> bytes:
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 3], a[:, w // 3: 2 * w // 3], a[:, 2 * w // 3:] = BLUE, GREEN, RED
    return encode(Image.fromarray(a, "RGB"), "PNG")


def test_crop_keeps_the_centre():
    arr = decode_image(_three_bands(), 30, resize="crop")
    check_output(arr, 30)
    assert_colour(arr, GREEN, tol=3)  # the centre square is all green: the sides are cut off


def test_stretch_keeps_everything():
    arr = decode_image(_three_bands(), 30, resize="stretch")
    assert_colour(arr[:, :8], BLUE, tol=3)
    assert_colour(arr[:, 12:18], GREEN, tol=3)
    assert_colour(arr[:, 22:], RED, tol=3)


def test_invalid_resize_mode_is_a_parameter_error():
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(ParameterError, match="resize must be one of"):
        decode_image(data, 8, resize="squash")
    with pytest.raises(ValueError):  # ParameterError is also a ValueError
        decode_image(data, 8, resize="")


# -- JPEG draft mode ----------------------------------------------------------------------------

def _large_jpeg(w: int = 2000, h: int = 1600) -> bytes:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)], -1)
    a[: h // 3, : w // 4] = RED
    return encode(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB"), "JPEG", quality=90)


@pytest.fixture
def draft_sizes(monkeypatch):
    """Record the size a JPEG is decoded at after Pillow's draft() call."""
    from PIL import JpegImagePlugin

    seen = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = original(self, mode, size)
        seen.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


def test_large_jpeg_is_decoded_at_a_reduced_scale_and_matches_full_decode(draft_sizes):
    data = _large_jpeg()
    arr = decode_image(data, 64)
    check_output(arr, 64)
    assert draft_sizes and draft_sizes[-1][0] <= 500 and draft_sizes[-1][1] <= 400  # 1/4 scale or less
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    ref = np.asarray(full, dtype=float)
    assert np.abs(arr.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)).max() < 3
    assert np.abs(arr.astype(float) - ref).mean() < 6  # same picture, not only the same mean
    assert_colour(arr[2:18, 2:12], RED, tol=20)  # the red corner survives, in place


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_draft_never_decodes_below_the_target_size(draft_sizes, resize):
    data = encode(Image.new("RGB", (2400, 600), GREEN), "JPEG", quality=85)  # very wide
    arr = decode_image(data, 224, resize=resize)
    check_output(arr, 224)
    w, h = draft_sizes[-1]
    assert w >= 224 and h >= 224, (w, h)  # the short side still covers the target for crop
    assert (w, h) == (1200, 300)  # halved: a quarter (600x150) would be too small for crop


# -- bad files --------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path, 16)


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not an image"):
        decode_image(data, 16)


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a photo\n" * 20)
    with pytest.raises(ImageError, match="not an image"):
        load_image(path, 16)


def _noise(n: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (n, n, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_reported_as_truncated(tmp_path, fmt):
    data = encode(_noise(), fmt)
    decode_image(data, 16)  # the whole file is fine
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        load_image(path, 16)
    reason = str(info.value).lower()
    assert "truncated" in reason or "cannot decode" in reason, reason


def test_jpeg_cut_inside_its_header_is_an_image_error():
    data = encode(_noise(), "JPEG")
    with pytest.raises(ImageError, match="(?i)truncated|corrupt"):
        decode_image(data[:200], 16)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFF tags
def test_cut_and_corrupted_files_raise_only_image_errors():
    """Whatever the damage, the caller sees an array of the right shape or an ImageError."""
    rng = np.random.default_rng(7)
    img = _noise(24)
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {})):
        data = encode(img.convert("P") if fmt == "GIF" else img, fmt, **kw)
        variants = [data[:c] for c in np.linspace(1, len(data) - 1, 12).astype(int)]
        for _ in range(12):
            d = bytearray(data)
            for i in rng.integers(0, min(len(d), 256), 3):
                d[i] = int(rng.integers(0, 256))
            variants.append(bytes(d))
        for v in variants:
            try:
                check_output(decode_image(v, 8), 8)
            except ImageError as exc:
                assert str(exc), fmt


def test_image_over_max_pixels_is_refused_with_the_limit(tmp_path):
    path = save(Image.new("L", (3000, 3000)), tmp_path / "huge.png")
    with pytest.raises(ImageError) as info:
        load_image(path, 16, max_pixels=1_000_000)
    reason = str(info.value)
    assert "3000x3000" in reason and "limit" in reason and "max_pixels" in reason
    assert "1 Mpx" in reason and "9 Mpx" in reason
    check_output(load_image(path, 16, max_pixels=9_000_000), 16)  # at the limit: accepted


def test_limit_below_one_megapixel_is_written_correctly():
    """The message used to say 'over the limit of 0 Mpx' for limits under 0.5 Mpx."""
    data = encode(Image.new("L", (1000, 1000)), "PNG")
    with pytest.raises(ImageError) as info:
        decode_image(data, 16, max_pixels=250_000)
    reason = str(info.value)
    assert "0.25 Mpx" in reason and "0 Mpx" not in reason.replace("0.25 Mpx", "")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but holds a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    data = _png_header_only(10_000, 10_000)  # 100 Mpx claimed in ~100 bytes
    with pytest.raises(ImageError) as info:
        decode_image(data, 16)  # default limit
    reason = str(info.value)
    assert "too large" in reason and "10000x10000" in reason, reason  # refused, not 'truncated'


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "gone.jpg", 16)


def test_folder_instead_of_file_is_unreadable(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="unreadable"):
        load_image(tmp_path / "dir.jpg", 16)
