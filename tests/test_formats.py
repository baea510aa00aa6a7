"""Image formats judged by content, not by extension (issue 15): a corpus of every colour mode, many
formats and the usual defects, generated here with Pillow/numpy (nothing downloaded), scanned and decoded
through the project's own path (scan_dataset / scan_images -> load_image).

What must hold: nothing crashes; every file Pillow can read comes out as (size, size, 3) uint8 RGB of the
right colour; every other file is skipped with its reason, by the scan (files without a known image
extension are sniffed there) or by the decoder (files with one are judged when decoded)."""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from storage.errors import DatasetError
from tasks.data import media
from tasks.data.datasets import scan_dataset, scan_images
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image

# decode_image silences these at import, but pytest resets warning filters for each test
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

SIZE = 12  # decoded size; the corpus images are 24 x 24, so stretching halves them exactly
W = H = 24
RED, BLUE, WHITE = (220, 20, 20), (20, 30, 220), (255, 255, 255)
HAS_JP2 = features.check("jpg_2000")


@dataclass
class Expect:
    """What must become of a corpus file: ``image`` (decoded, mean colour ``colour``), ``scan`` (skipped by
    the scan, reason containing ``reason``), ``decode`` (scanned, then refused by the decoder with
    ``reason``) or ``ignored`` (neither: hidden files)."""
    fate: str
    colour: tuple | None = None
    reason: str = ""
    tol: float = 6


def image(colour, tol=6):
    return Expect("image", colour=colour, tol=tol)


def at_scan(reason):
    return Expect("scan", reason=reason)


def at_decode(reason):
    return Expect("decode", reason=reason)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(mode: str, left, right) -> Image.Image:
    img = Image.new(mode, (W, H), left)
    img.paste(Image.new(mode, (W // 2, H), right), (W // 2, 0))
    return img


def mean_of(left, right):
    return tuple((a + b) / 2 for a, b in zip(left, right))


def over_white(colour, alpha):
    return tuple(c * alpha / 255 + 255 * (1 - alpha / 255) for c in colour)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tga_without_footer(colour) -> bytes:
    """A valid uncompressed 24-bit TGA 1.0 (no footer, so no signature): 18-byte header, then BGR rows."""
    header = struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, W, H, 24, 0x20)
    return header + bytes(colour[::-1]) * (W * H)


def noise(n: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (n, n, 3), dtype=np.uint8), "RGB")


def build_corpus(cls: Path) -> dict[str, Expect]:
    """Write the corpus into the class folder ``cls``; returns each file's name and what must become of it."""
    cls.mkdir(parents=True)
    out: dict[str, Expect] = {}

    def put(name: str, data: bytes, expect: Expect):
        (cls / name).write_bytes(data)
        out[name] = expect

    red = Image.new("RGB", (W, H), RED)
    # -- every colour mode ----------------------------------------------------------------------
    put("mode_1.png", encode(halves("1", 0, 1), "PNG"), image((127.5,) * 3))
    put("mode_L.png", encode(Image.new("L", (W, H), 80), "PNG"), image((80,) * 3))
    put("mode_P.png", encode(red.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), image(RED))
    pal = halves("P", 0, 1)
    pal.putpalette(list(RED) + list(BLUE) + [0] * 762)
    put("mode_P_transparent.png", encode(pal, "PNG", transparency=1), image(mean_of(RED, WHITE)))  # not blue
    put("mode_RGB.png", encode(red, "PNG"), image(RED))
    put("mode_RGBA.png", encode(Image.new("RGBA", (W, H), BLUE + (128,)), "PNG"), image(over_white(BLUE, 128)))
    put("mode_LA.png", encode(Image.new("LA", (W, H), (80, 255)), "PNG"), image((80,) * 3))
    put("mode_CMYK.jpg", encode(red.convert("CMYK"), "JPEG", quality=95), image(RED, tol=10))
    put("mode_CMYK.tif", encode(red.convert("CMYK"), "TIFF"), image(RED))
    put("mode_I16.png", encode(Image.new("I;16", (W, H), 30000), "PNG"), image((30000 / 257,) * 3))
    put("mode_I.tif", encode(Image.new("I", (W, H), 80), "TIFF"), image((80,) * 3))
    put("mode_F.tif", encode(Image.new("F", (W, H), 0.5), "TIFF"), image((127.5,) * 3))
    # -- formats -------------------------------------------------------------------------------
    put("baseline.jpg", encode(red, "JPEG", quality=95), image(RED, tol=10))
    put("progressive.jpg", encode(red, "JPEG", quality=95, progressive=True), image(RED, tol=10))
    put("bitmap.bmp", encode(red, "BMP"), image(RED))
    blue = Image.new("RGB", (W, H), BLUE)
    put("animated.gif", encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0),
        image(RED))  # the first frame
    put("lossless.webp", encode(red, "WEBP", lossless=True), image(RED))
    put("pages.tif", encode(red, "TIFF", save_all=True, append_images=[blue]), image(RED))  # the first page
    put("icon.ico", encode(red.convert("RGBA"), "ICO", sizes=[(16, 16), (24, 24)]), image(RED))
    put("pixmap.ppm", encode(red, "PPM"), image(RED))
    put("graymap.pgm", encode(Image.new("L", (W, H), 80), "PPM"), image((80,) * 3))
    put("bitmap.pbm", encode(halves("1", 0, 1), "PPM"), image((127.5,) * 3))
    put("targa.tga", encode(red, "TGA"), image(RED))
    put("targa_rle.tga", encode(red, "TGA", compression="tga_rle"), image(RED))
    put("targa_v1.tga", tga_without_footer(RED), image(RED))  # no signature, vouched for by its name
    put("quite_ok.qoi", encode(red, "QOI"), image(RED))
    if HAS_JP2:
        put("jpeg2000.jp2", encode(red, "JPEG2000"), image(RED))
    # no known image extension: judged by content during the scan
    put("paintbrush.pcx", encode(red, "PCX"), image(RED))
    put("silicon.sgi", encode(red, "SGI"), image(RED))
    put("direct_draw.dds", encode(red.convert("RGBA"), "DDS"), image(RED))
    put("png_without_extension", encode(red, "PNG"), image(RED))
    put("jpeg_named.dat", encode(red, "JPEG", quality=95), image(RED, tol=10))
    put("png_named.txt", encode(blue, "PNG"), image(BLUE))
    put("targa_v2_named.bin", encode(red, "TGA"), image(RED))  # the TGA 2.0 footer is a signature
    # the name lies: read as what the content is
    put("png_named.jpg", encode(blue, "PNG"), image(BLUE))
    put("jpeg_named.png", encode(red, "JPEG", quality=95), image(RED, tol=10))
    # -- defects -------------------------------------------------------------------------------
    put("zero.jpg", b"", at_decode("empty file (0 bytes)"))
    put("zero.dat", b"", at_scan("empty file (0 bytes)"))
    jpeg, png = encode(noise(), "JPEG"), encode(noise(), "PNG")
    put("truncated.jpg", jpeg[: len(jpeg) // 2], at_decode("truncated"))
    put("truncated.png", png[: len(png) // 2], at_decode("truncated"))
    rng = np.random.default_rng(0)
    put("garbage.png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), at_decode("not an image"))
    put("garbage.bin", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        at_scan("not an image Pillow can identify (.bin)"))
    put("text.png", b"these are my notes, not a photo\n" * 20, at_decode("not an image"))
    put("notes.txt", b"labels: cats and dogs\n", at_scan("not an image Pillow can identify (.txt)"))
    put("README", b"no extension here\n", at_scan("not an image Pillow can identify (no extension)"))
    buf = io.BytesIO()
    np.save(buf, np.arange(50, dtype=np.float32))
    put("array.npy", buf.getvalue(), at_scan("not an image Pillow can identify (.npy)"))
    put("paper.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        at_scan("not an image Pillow can identify (.pdf)"))
    put("weights.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 512,
        at_scan("Pillow identifies it as HDF5 (.h5) but cannot decode"))
    put("clip.mpg", b"\x00\x00\x01\xb3\x14\x00\xf0\x13" + b"\0" * 512,
        at_scan("Pillow identifies it as MPEG (.mpg) but cannot decode"))
    # a TGA 1.0 has no signature: under another name it is bytes that merely parse as TGA
    put("targa_v1_named.bin", tga_without_footer(RED), at_scan("merely parses as TGA"))
    put("targa_v1_named.png", tga_without_footer(RED), at_decode("merely parses as TGA"))
    put("bomb.png", png_header_only(10_000, 10_000), at_decode("too large: 10000x10000"))
    put("bomb_named.dat", png_header_only(10_000, 10_000), at_decode("too large: 10000x10000"))
    put("bomb_beyond_pillow.png", png_header_only(30_000, 30_000), at_decode("too large"))  # Pillow's own guard
    (cls / "folder.jpg").mkdir()  # a folder named like an image: a folder, scanned as one (empty here)
    os.symlink(cls / "gone.jpg", cls / "broken.jpg")
    out["broken.jpg"] = at_scan("broken symbolic link")
    os.symlink(cls / "gone.dat", cls / "broken.dat")
    out["broken.dat"] = at_scan("broken symbolic link")
    os.symlink(cls / "mode_RGB.png", cls / "link_to_image.png")
    out["link_to_image.png"] = image(RED)
    put(".hidden.png", encode(red, "PNG"), Expect("ignored"))
    return out


def pillow_reads(path: Path) -> bool:
    """The oracle: Pillow alone opens and decodes the file, within the project's pixel limit."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > DEFAULT_MAX_PIXELS:
                return False
            img.load()
        return True
    except Exception:
        return False


def outcomes(manifest) -> tuple[dict[str, str], dict[str, np.ndarray], dict[str, str]]:
    """Scan skips, decoded arrays and decode refusals by file name, through the project's decode path.
    Anything but an array or an ImageError (a crash) fails the test here."""
    scan = {s.path.rsplit("/", 1)[-1]: s.reason for s in manifest.skipped}
    decoded, refused = {}, {}
    for s in manifest.samples:
        name = s.path.rsplit("/", 1)[-1]
        try:
            decoded[name] = load_image(manifest.abspath(s), SIZE)
        except ImageError as exc:
            refused[name] = str(exc)
    return scan, decoded, refused


@pytest.fixture
def corpus(tmp_path):
    data = tmp_path / "data"
    expect = build_corpus(data / "things")
    (data / "other").mkdir()
    Image.new("RGB", (W, H), BLUE).save(data / "other" / "one.png")  # a second class
    return data, expect


def check_fates(expect: dict[str, Expect], scan, decoded, refused):
    for name, e in expect.items():
        where = {"scan": scan.get(name), "decoded": name in decoded, "refused": refused.get(name)}
        if e.fate == "image":
            assert name in decoded, (name, where)
            arr = decoded[name]
            assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8, (name, arr.shape, arr.dtype)
            mean = arr.reshape(-1, 3).astype(float).mean(0)
            assert np.all(np.abs(mean - np.asarray(e.colour, float)) <= e.tol), (name, mean, e.colour)
        elif e.fate == "scan":
            assert name in scan and e.reason in scan[name], (name, e.reason, where)
        elif e.fate == "decode":
            assert name in refused and e.reason in refused[name], (name, e.reason, where)
        else:
            assert not where["scan"] and not where["decoded"] and not where["refused"], (name, where)
    # every file is accounted for, and only once
    named = {n for n, e in expect.items() if e.fate != "ignored"}
    assert set(scan) | set(decoded) | set(refused) == named
    assert not (set(scan) & (set(decoded) | set(refused)))


def test_corpus_every_readable_image_is_featurised_and_every_other_file_skipped_with_its_reason(corpus):
    data, expect = corpus
    m = scan_dataset(data)
    assert m.class_names == ["other", "things"]
    scan, decoded, refused = outcomes(m)
    assert decoded.pop("one.png").shape == (SIZE, SIZE, 3)  # the other class
    check_fates(expect, scan, decoded, refused)
    # the oracle: exactly the files Pillow itself reads are featurised, but for the one kind refused by
    # design (a TGA 1.0 under another name: bytes that merely parse as TGA, as binary data often does)
    cls = data / "things"
    readable = {n for n in expect if not n.startswith(".") and (cls / n).is_file() and pillow_reads(cls / n)}
    assert readable - set(decoded) == {"targa_v1_named.bin", "targa_v1_named.png"}
    assert set(decoded) <= readable
    assert "folder.jpg" not in scan and "folder.jpg" not in decoded  # a folder, walked as one


def test_the_corpus_is_what_it_claims(corpus):
    """The corpus's files really have the modes, formats and frames their names say (else the test above
    would prove less than it claims)."""
    cls = corpus[0] / "things"

    def info(name):
        with Image.open(cls / name) as img:
            return img.format, img.mode, getattr(img, "n_frames", 1), img.info

    modes = {"mode_1.png": "1", "mode_L.png": "L", "mode_P.png": "P", "mode_P_transparent.png": "P",
             "mode_RGB.png": "RGB", "mode_RGBA.png": "RGBA", "mode_LA.png": "LA", "mode_CMYK.jpg": "CMYK",
             "mode_CMYK.tif": "CMYK", "mode_I16.png": "I;16", "mode_I.tif": "I", "mode_F.tif": "F"}
    for name, mode in modes.items():
        assert info(name)[1] == mode, (name, info(name)[1])
    assert "transparency" in info("mode_P_transparent.png")[3]
    assert info("progressive.jpg")[3].get("progressive") and not info("baseline.jpg")[3].get("progressive")
    assert info("animated.gif")[2] == 2 and info("pages.tif")[2] == 2
    formats = {"icon.ico": "ICO", "pixmap.ppm": "PPM", "graymap.pgm": "PPM", "bitmap.pbm": "PPM",
               "targa.tga": "TGA", "targa_v1.tga": "TGA", "quite_ok.qoi": "QOI", "paintbrush.pcx": "PCX",
               "silicon.sgi": "SGI", "direct_draw.dds": "DDS", "png_named.jpg": "PNG", "jpeg_named.png": "JPEG",
               "lossless.webp": "WEBP", "bitmap.bmp": "BMP"}
    if HAS_JP2:
        formats["jpeg2000.jp2"] = "JPEG2000"
    for name, fmt in formats.items():
        assert info(name)[0] == fmt, (name, info(name)[0])
    assert info("graymap.pgm")[1] == "L" and info("bitmap.pbm")[1] == "1"
    assert not (cls / "targa_v1.tga").read_bytes().endswith(b"TRUEVISION-XFILE.\x00")
    assert (cls / "targa.tga").read_bytes().endswith(b"TRUEVISION-XFILE.\x00")


def test_predict_scan_judges_the_corpus_the_same_way(corpus):
    data, expect = corpus
    m = scan_images(data / "things")
    scan, decoded, refused = outcomes(m)
    check_fates(expect, scan, decoded, refused)


def test_listed_folder_missing_file_and_broken_link_are_skipped_with_their_reasons(corpus):
    data, _ = corpus
    rows = ["path,label", "things/mode_RGB.png,a", "things/folder.jpg,a", "things/broken.jpg,b",
            "things/gone.png,b", "things/notes.txt,b", "other/one.png,b"]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    m = scan_dataset(data / "list.csv")
    reasons = {s.path: s.reason for s in m.skipped}
    assert sorted(s.path for s in m.samples) == ["other/one.png", "things/mode_RGB.png"]
    assert reasons["things/folder.jpg"] == "a folder, not a file"
    assert reasons["things/broken.jpg"].startswith("broken symbolic link: its target")
    assert "gone.jpg" in reasons["things/broken.jpg"]
    assert reasons["things/gone.png"] == "file not found"
    assert reasons["things/notes.txt"] == "not an image Pillow can identify (.txt)"


def test_one_image_file_is_taken_by_its_content(corpus):
    data, _ = corpus
    m = scan_images(data / "things" / "jpeg_named.dat")
    assert [s.path for s in m.samples] == ["jpeg_named.dat"]
    with pytest.raises(DatasetError, match=r"neither a folder, an image \(not an image Pillow can identify "
                                           r"\(\.bin\)\), nor a \.txt/\.csv list"):
        scan_images(data / "things" / "garbage.bin")


def test_class_folders_without_an_image_are_left_out_with_the_reasons(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (W, H), RED).save(tmp_path / "cats" / "c.png")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "notes" / "labels.bin").write_bytes(bytes(100))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "b.png").write_text("not a png")  # an image by name: judged by the decoder
    (tmp_path / "gone").mkdir()
    os.symlink(tmp_path / "nowhere.png", tmp_path / "gone" / "g.png")
    m = scan_dataset(tmp_path)
    reasons = {s.path: s.reason for s in m.skipped}
    assert m.class_names == ["broken", "cats"]
    assert reasons["notes/"] == "empty class folder: no images, class left out"
    assert reasons["notes/labels.bin"] == "not an image Pillow can identify (.bin)"
    assert reasons["gone/"] == "class folder with no readable image (see its files' reasons), class left out"
    assert "broken/" not in reasons

    only_notes = tmp_path / "only_notes"
    (only_notes / "notes").mkdir(parents=True)
    (only_notes / "notes" / "todo.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images found in .*only_notes \(supported types: files named "
                                           r"\.jpg, .*notes/todo\.txt: not an image Pillow can identify"):
        scan_dataset(only_notes)


def test_binary_data_that_pillow_takes_for_tga_is_not_taken_for_an_image(tmp_path):
    """Raw label files of 0s and 1s parse as TGA in Pillow now and then (no signature to check); the scan
    takes none of them, and says why."""
    rng = np.random.default_rng(0)
    cls = tmp_path / "labels"
    cls.mkdir()
    for i in range(150):
        (cls / f"labels_{i:03d}.bin").write_bytes(rng.integers(0, 2, int(rng.integers(100, 3000)), np.uint8).tobytes())
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (W, H), RED).save(tmp_path / "cats" / "c.png")
    taken_by_pillow = []
    for f in sorted(cls.iterdir()):
        try:
            with Image.open(f) as img:
                taken_by_pillow.append((f.name, img.format))
        except Exception:
            pass
    assert len(taken_by_pillow) >= 3 and {fmt for _, fmt in taken_by_pillow} == {"TGA"}  # the trap is real
    m = scan_dataset(tmp_path)
    assert [s.path for s in m.samples] == ["cats/c.png"]
    reasons = {s.path: s.reason for s in m.skipped}
    for name, _ in taken_by_pillow:
        assert "merely parses as TGA" in reasons[f"labels/{name}"] and "name it .tga" in reasons[f"labels/{name}"]


def test_the_scan_reads_headers_only(corpus, monkeypatch):
    """Sniffing never decodes pixels: with Pillow's decoding disabled the scan still identifies every image
    (the decompression bomb and the truncated PNG included, which would not decode)."""
    data, expect = corpus

    def no_decoding(self, *a, **k):
        raise AssertionError("the scan decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    m = scan_dataset(data)
    scanned = {s.path.rsplit("/", 1)[-1] for s in m.samples}
    assert {"bomb_named.dat", "png_without_extension", "paintbrush.pcx", "targa_v2_named.bin"} <= scanned
    assert scanned == {"one.png"} | {n for n, e in expect.items() if e.fate in ("image", "decode")}


def test_media_kind_takes_known_extensions_by_name_and_the_rest_by_content(tmp_path):
    assert media.media_kind(tmp_path / "not_there.JPG") == "image"  # by name alone: the file is not opened
    assert media.media_kind(tmp_path / "not_there.ico") == "image"
    (tmp_path / "pic").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert media.media_kind(tmp_path / "pic") == "image"
    (tmp_path / "pic.md").write_text("# a heading\n")
    with pytest.raises(media.NotMedia, match=r"not an image Pillow can identify \(\.md\)"):
        media.media_kind(tmp_path / "pic.md")
    with pytest.raises(FileNotFoundError):
        media.media_kind(tmp_path / "not_there.bin")


@pytest.mark.skipif(not HAS_JP2, reason="this Pillow cannot write JPEG 2000 (no OpenJPEG)")
def test_a_format_this_pillow_has_no_decoder_for_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "x.jp2"
    path.write_bytes(encode(Image.new("RGB", (W, H), RED), "JPEG2000"))
    assert load_image(path, SIZE).shape == (SIZE, SIZE, 3)
    monkeypatch.delattr(Image.core, "jpeg2k_decoder")  # as a Pillow built without OpenJPEG
    with pytest.raises(ImageError, match=r"cannot decode this JPEG2000 file: the installed Pillow has no decoder "
                                         r"for it \(decoder jpeg2k not available\); install a Pillow built with it"):
        load_image(path, SIZE)
