"""The on-disk format of feature stores: layout, encoding, fingerprints and the shard index.

Every module that touches a store's bytes takes these names and helpers from here:
the reader (:mod:`storage.reader`), the writer (:mod:`storage.writer`), the sharded
reader (:mod:`storage.sharded`), the tools (:mod:`storage.tools`) and verification (:mod:`storage.verify`).

Layout of one store (one file per dataset, backbone and weights)::

    /                       attrs: format, backbone, backbone_args, weights, weights_digest,
                                   input_size, preprocessing, resize, precision, class_names,
                                   dataset, created, updated, versions, ...
    /<layer>/<pooling>/     one group per cut point and pooling; attrs: layer, pooling,
                            feature_shape, dtype, manifest_fingerprint, created, updated
        features  (N, *feature_shape)  float32 or float16, chunked by rows
        path      (N,)  S512     image path relative to the dataset root (UTF-8)
        sha256    (N,)  S64      sha256 of the image file's bytes
        label     (N,)  int32    index into the root's class_names
        split     (N,)  S8       train / val / test
        committed (1,)  int64    rows [0, committed) are complete; later rows are not to be trusted
        state     (1,)  S64      fingerprint of the manifest the group was completed for ("" while not)
        sums      (C, 2) uint64  only in groups written by earlier versions (xxh3 sums of the feature
                                 chunks, for reads that skipped HDF5's filter): nothing reads it now
    /_updated  (1,)  S32   time of the last finished run;  /_skipped (n,) S1024  files skipped, JSON [path, reason]

Attributes hold int and float as they are; lists, dicts, tuples and None as JSON text; text as
fixed-length UTF-8 (:func:`set_attrs` / :func:`decode`; stores written before checksums hold
variable-length text, which reads the same).

Checksums: every dataset is chunked and carries HDF5's Fletcher-32 filter (``committed``, ``state`` and
``_updated`` too, as one-row chunked datasets), and HDF5's own structures (superblock v3, object headers,
chunk indexes) carry theirs; text attributes sit in the object headers, not in the global heap, which
has none. A chunk that fails its checksum is a :class:`~storage.errors.StoreDamagedError` naming the
rows (:func:`read_rows`, :func:`damaged_rows`). Opening checks the superblock and the file's length
first and bounds HDF5's metadata read retries (:func:`open_file`), so a damaged file is an error in
bounded time, never an endless retry.

Writing follows the single-writer / multiple-reader (SWMR) protocol of HDF5:
every group and dataset a run needs is created first, then the file switches
to SWMR mode and rows are only appended; what a run records at its end goes
into datasets made for it (attributes cannot change in SWMR mode, and reopening
the file outside SWMR would need readers to let go of it). No variable-length
strings: HDF5's global heap is not safe for concurrent readers. After each batch the data is flushed
and *then* ``committed`` is advanced, so a reader, or a run resumed after a
SIGKILL, never trusts a half-written batch. A lock file (``<store>.lock``) enforces one writer.

A sharded store is a small HDF5 index file at the store's path (written by a sharded extraction)::

    /   attrs: format = "cnncodes-store-index/1", shards = JSON list of shard files relative
               to the index's folder, and the shards' provenance (backbone, weights, class_names, ...)

Each shard is an ordinary store with its own single writer. This module imports neither
TensorFlow nor Prefect.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .errors import StoreDamagedError, StoreError
from .files import atomic_path, lock_is_held, now_iso

STORE_FORMAT = "cnncodes-store/1"
INDEX_FORMAT = "cnncodes-store-index/1"
LIBVER = ("v110", "latest")  # v110 is the oldest format with SWMR; readable by HDF5 >= 1.10
POOLINGS = ("avg", "max", "flatten", "none")
DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "gzip", "lzf")
ROW_DATASETS = ("features", "path", "sha256", "label", "split")
PATH_BYTES = 512
SKIP_BYTES = 1024
PATH_DTYPE = f"S{PATH_BYTES}"
SHA_DTYPE = "S64"
LABEL_DTYPE = "i4"
SPLIT_DTYPE = "S8"
SKIP_DTYPE = f"S{SKIP_BYTES}"
UPDATED_DTYPE = "S32"
UPDATED, SKIPPED = "_updated", "_skipped"  # root datasets a run writes at its end

BLOCK_BYTES = 64 << 20  # the store tools and verify read at most this many bytes of rows at a time

# Root attributes that identify what produced the features: a run whose values
# differ must not write into this store.
IDENTITY_KEYS = ("backbone", "backbone_args", "weights", "init_seed", "weights_digest", "input_size",
                 "preprocessing", "resize", "precision")

__all__ = [
    "COMPRESSIONS", "DTYPES", "IDENTITY_KEYS", "INDEX_FORMAT", "LIBVER", "POOLINGS", "ROW_DATASETS", "STORE_FORMAT",
    "decode", "decode_attrs", "decode_paths", "encode", "encode_paths", "group_fingerprint", "group_name",
    "is_index", "iter_groups", "layer_names", "normalise", "now_iso", "open_file", "read_index", "run_state",
    "write_index",
    "SWMR_WRITE_FLAG", "checked", "clear_open_flags", "damage_error", "damaged_rows", "lookup3", "open_swmr", "read_rows", "rows_text", "set_attrs",
    "superblock", "writer_holds", "BLOCK_BYTES", "decode_texts", "row_bytes", "rows_per_block",
]


# --------------------------------------------------------------------------- names and encoding


def group_name(layer: str, pooling: str) -> str:
    return f"{layer}/{pooling}"


def encode(value: Any) -> Any:
    """An attribute value as stored: lists, dicts, tuples and None as JSON text, the rest as is."""
    if isinstance(value, (dict, list, tuple)) or value is None:
        return json.dumps(value, sort_keys=True)
    return value


def decode(value: Any) -> Any:
    """An attribute value as read: bytes as text, NumPy scalars as Python ones, JSON text parsed."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "[{n" and value not in ("",):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def set_attrs(obj: h5py.HLObject, values: dict[str, Any]) -> None:
    """Write attributes as :func:`encode` makes them, text as fixed-length UTF-8: it then lives in the
    object header, under its checksum (h5py's default, variable-length text, goes to HDF5's global heap,
    which has none: a damaged byte there would read as another value)."""
    for k, v in values.items():
        v = encode(v)
        if isinstance(v, str):
            raw = v.encode("utf-8")
            v = np.array(raw, dtype=f"S{max(1, len(raw))}")
        obj.attrs[k] = v


def normalise(d: dict[str, Any]) -> dict[str, Any]:
    """The form values take after a round trip through the file (tuples become lists, ...)."""
    return {k: decode(encode(v)) for k, v in d.items()}


def decode_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    """All attributes of a file, group or dataset, decoded."""
    return {k: decode(v) for k, v in obj.attrs.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def encode_paths(paths: Sequence[str]) -> np.ndarray:
    """Image paths as fixed-length UTF-8; StoreError naming the first one that does not fit."""
    raw = [p.encode("utf-8") for p in paths]
    long = [p for p in raw if len(p) > PATH_BYTES]
    if long:
        raise StoreError(f"image path {long[0].decode()!r} is {len(long[0])} bytes long; a store keeps paths of "
                         f"up to {PATH_BYTES} bytes (relative to the dataset root). Shorten the folder names.")
    return np.asarray(raw, dtype=PATH_DTYPE)


def decode_paths(raw: np.ndarray) -> np.ndarray:
    """Fixed-length UTF-8 bytes -> an object array of str (``tolist`` drops the padding in C)."""
    if raw.dtype.kind != "S":
        return np.asarray([p.decode("utf-8") if isinstance(p, bytes) else p for p in raw], dtype=object)
    return np.fromiter(map(bytes.decode, raw.tolist()), dtype=object, count=len(raw))


def decode_texts(values: np.ndarray) -> np.ndarray:
    """Stored text (bytes or str) -> an object array of str, bytes that are not UTF-8 replaced: for
    checking and showing rows whose contents may be damaged."""
    return np.asarray([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values],
                      dtype=object)


# --------------------------------------------------------------------------- reading the layout


# --------------------------------------------------------------------------- opening a file safely

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 retries a metadata read whose checksum fails (a reader racing a writer) and doubles a sleep
# between tries: its SWMR default of 100 tries sleeps 2**100 ns on a damaged file - a hang. 24 tries
# sleep at most 2**24 ns (~17 ms) per damaged block, plenty for a racing writer.
READ_ATTEMPTS = 24
WRITER_WAIT_S = 10.0  # how long a reader waits for a writer that holds the file while preparing it
_READ_ATTEMPTS_SET: Any = None  # H5Pset_metadata_read_attempts once found (False: not available)


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: the checksum HDF5 puts on its metadata (superblock v2/v3...)."""
    m = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & m

    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    i = 0
    while length > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & m
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & m
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & m
        a = (a - c) & m; a ^= rot(c, 4); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= rot(a, 6); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= rot(b, 8); b = (b + a) & m  # noqa: E702
        a = (a - c) & m; a ^= rot(c, 16); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= rot(a, 19); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= rot(b, 4); b = (b + a) & m  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    c ^= b; c = (c - rot(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & m  # noqa: E702
    return c


def superblock(path: str | os.PathLike) -> dict[str, Any]:
    """What the HDF5 superblock of ``path`` says: ``version``, ``offset`` (where it is), ``eof`` (the
    address the file must reach), ``flags`` (file consistency flags: a writer has it open) and
    ``size`` (the file's real size). StoreError naming the file when it has no intact superblock or is
    shorter than the superblock says: a cut file (an interrupted copy, a full disk)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            offset = 0
            while True:  # HDF5 looks at 0, 512, 1024, 2048, ... (a user block may come first)
                fh.seek(offset)
                head = fh.read(96)
                if head[:8] == HDF5_SIGNATURE or offset * 2 > max(size, 512):
                    break
                offset = 512 if offset == 0 else offset * 2
    except FileNotFoundError:
        raise StoreError(f"no feature store at {path}. Run `cnncodes extract` to create one.") from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}. Check the path and its permissions.") from exc
    again = "re-create it with `cnncodes extract` (or restore a good copy)"
    if head[:8] != HDF5_SIGNATURE:
        what = "empty" if size == 0 else f"{size} bytes with no HDF5 signature"
        raise StoreError(f"{path} is not an HDF5 file ({what}): it is not a store, or its first bytes were "
                         f"cut or overwritten. Check the path, or {again}.")
    version = head[8]
    if version in (2, 3):
        so = head[9]
        if so not in (2, 4, 8) or head[10] not in (2, 4, 8):
            raise StoreError(f"the superblock of {path} is damaged (offsets of {so} bytes). {again[0].upper()}"
                             f"{again[1:]}.")
        end = 12 + 4 * so
        if len(head) < end + 4:
            raise StoreError(f"{path} is cut short: {size} bytes, not even a whole superblock. The copy or write "
                             f"that made it was interrupted; {again}.")
        stored = int.from_bytes(head[end:end + 4], "little")
        if lookup3(head[:end]) != stored:
            raise StoreError(f"the superblock of {path} is damaged (its checksum does not match): the file's "
                             f"first bytes were overwritten. {again[0].upper()}{again[1:]}.")
        flags = head[11]
        base, eof = (int.from_bytes(head[12 + k * so:12 + (k + 1) * so], "little") for k in (0, 2))
    elif version in (0, 1):
        so = head[13]
        pos = 24 if version == 0 else 28
        if so not in (2, 4, 8) or len(head) < pos + 4 * so:
            raise StoreError(f"the superblock of {path} is damaged or cut short. {again[0].upper()}{again[1:]}.")
        flags = int.from_bytes(head[20:24], "little")
        base, eof = (int.from_bytes(head[pos + k * so:pos + (k + 1) * so], "little") for k in (0, 2))
    else:
        raise StoreError(f"the superblock of {path} has version {version}, which this HDF5 does not write: the "
                         f"file is damaged or of a newer format. {again[0].upper()}{again[1:]}.")
    if base + eof > size:
        raise StoreError(f"{path} is cut short: {size} bytes, but its HDF5 superblock says it ends at byte "
                         f"{base + eof}. The copy or write that made it was interrupted (a full disk?); {again}.")
    return {"version": version, "offset": offset, "flags": flags, "eof": base + eof, "size": size}


SWMR_WRITE_FLAG = 0x04  # superblock v2/v3 file consistency flags: 0x01 open for writing, 0x04 in SWMR mode


def clear_open_flags(path: str | os.PathLike) -> None:
    """Clear the "open for writing" flags of a v2/v3 superblock (and mend its checksum), as ``h5clear -s``
    does: for a file whose writer was killed. Only while holding the store's writer lock."""
    sb = superblock(path)
    if sb["version"] not in (2, 3) or not sb["flags"]:
        return
    with open(path, "r+b") as fh:
        fh.seek(sb["offset"])
        head = bytearray(fh.read(12 + 4 * 8 + 4))
        so = head[9]
        end = 12 + 4 * so
        head[11] = 0
        head[end:end + 4] = lookup3(bytes(head[:end])).to_bytes(4, "little")
        fh.seek(sb["offset"])
        fh.write(bytes(head[:end + 4]))
        fh.flush()
        os.fsync(fh.fileno())


def writer_holds(path: str | os.PathLike) -> bool:
    """True when a cnncodes writer holds the lock of the store at ``path`` (``<store>.lock``), probed
    without taking it (:func:`storage.files.lock_is_held`)."""
    return lock_is_held(Path(path).with_name(Path(path).name + ".lock"))


def _set_read_attempts(fapl: Any, attempts: int) -> bool:
    """H5Pset_metadata_read_attempts on ``fapl`` (h5py does not wrap it): reached through the HDF5 library
    h5py's extensions are linked to. False where it cannot be found (the pre-checks still apply)."""
    global _READ_ATTEMPTS_SET
    if _READ_ATTEMPTS_SET is None:
        try:
            import ctypes

            fn = ctypes.CDLL(h5py.h5p.__file__).H5Pset_metadata_read_attempts
            fn.argtypes = [ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _READ_ATTEMPTS_SET = fn
        except (OSError, AttributeError):
            _READ_ATTEMPTS_SET = False
    if not _READ_ATTEMPTS_SET:
        return False
    return _READ_ATTEMPTS_SET(fapl.id, attempts) >= 0


def _swmr_fapl() -> Any:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_LATEST)
    _set_read_attempts(fapl, READ_ATTEMPTS)
    return fapl


def open_swmr(path: str | os.PathLike) -> h5py.File:
    """``h5py.File(path, "r", swmr=True)`` with metadata read retries bounded (:data:`READ_ATTEMPTS`)."""
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=_swmr_fapl())
    return h5py.File(fid)


def open_file(path: str | os.PathLike, wait: float = WRITER_WAIT_S) -> h5py.File:
    """Open a store file for reading alongside a writer (SWMR), in bounded time whatever its state.

    The superblock and the file's length are checked first (a cut or overwritten file is a StoreError
    at once, never an endless retry inside HDF5); metadata read retries are bounded. Only a file that a
    cnncodes writer holds (its lock file is locked) is waited for, up to ``wait`` seconds."""
    path = Path(path)
    deadline = time.monotonic() + wait
    while True:
        try:
            superblock(path)
            return open_swmr(path)
        except (StoreError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise StoreError(f"no feature store at {path}. Run `cnncodes extract` to create one.") from None
            held = writer_holds(path)
            text = str(exc).lower()
            busy = held or "unable to lock" in text  # another (non-cnncodes) program holds it
            if busy and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if isinstance(exc, StoreError) and not held:
                if "no feature store" in str(exc):
                    raise
                raise StoreDamagedError(f"cannot open feature store: {exc}", path=str(path)) from None
            if busy:
                raise StoreError(f"feature store {path} is held by a writer ({exc}) and did not become readable "
                                 f"within {wait:.0f} s. Try again when the writer has started appending or has "
                                 "finished.") from exc
            if "already open" in text:
                raise StoreError(f"feature store {path} was left open by a writer that stopped while preparing it "
                                 f"({exc}). Run the same `cnncodes extract` again: it recovers the file.") from exc
            raise StoreError(f"cannot open feature store {path}: {exc}. The file is damaged or not an HDF5 file "
                             "written by cnncodes: run `cnncodes store verify` on it, or re-create it with "
                             "`cnncodes extract`.") from exc


# --------------------------------------------------------------------------- reading rows, finding damage

# A chunk that fails its checksum is read again (a writer may be rewriting it right now), from the
# file, never after ``Dataset.refresh()``: with HDF5 1.14.6, a refresh after a failed read, while another
# handle of the dataset is open, makes the next read return the damaged chunk's bytes without an error.
READ_TRIES = 3

def where(ds: h5py.Dataset) -> tuple[str, str, str]:
    """(file, group, dataset name) of ``ds``."""
    group, _, name = ds.name.strip("/").rpartition("/")
    return str(ds.file.filename), group, name


def rows_text(ranges: Sequence[tuple[int, int]], first: int = 5) -> str:
    """[start, stop) ranges as ``rows 0-1023, 4096-4099`` (inclusive), the first few."""
    parts = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges[:first]]
    more = f" and {len(ranges) - first} more range(s)" if len(ranges) > first else ""
    return ("row " if len(ranges) == 1 and ranges[0][1] - ranges[0][0] == 1 else "rows ") + ", ".join(parts) + more


def _readable(ds: h5py.Dataset, start: int, stop: int) -> bool:
    for attempt in range(READ_TRIES):
        try:
            ds[start:stop]
            return True
        except (OSError, RuntimeError, ValueError):
            if attempt + 1 < READ_TRIES:
                time.sleep(0.02)
    return False


def damaged_rows(ds: h5py.Dataset, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of ``ds`` that cannot be read back as written (their chunk fails its
    checksum, or the chunk index is damaged), chunk by chunk; [] when every row reads."""
    stop = int(ds.shape[0]) if stop is None else int(stop)
    if stop <= start:
        return []
    step = int(ds.chunks[0]) if ds.chunks else stop - start
    out: list[tuple[int, int]] = []
    a = (start // step) * step
    while a < stop:
        lo, hi = max(a, start), min(stop, a + step)
        if not _readable(ds, lo, hi):
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        a += step
    return out


def damage_error(ds: h5py.Dataset, start: int, stop: int, exc: BaseException) -> StoreDamagedError:
    """A StoreDamagedError naming the file, group, dataset and the damaged rows of [start, stop)."""
    path, group, name = where(ds)
    try:
        ranges = damaged_rows(ds, start, stop) or [(start, stop)]
    except Exception:  # the dataset itself cannot be inspected
        ranges = [(start, stop)]
    return StoreDamagedError(
        f"{path}: group {group or '/'}, dataset {name}: {rows_text(ranges)} cannot be read back as written "
        f"({exc}). The file is damaged there; nothing of it was returned. `cnncodes store verify {path}` lists "
        f"every damaged range, `cnncodes store repair {path}` drops the damaged rows, and the next "
        "`cnncodes extract` of the same data recomputes them.", path=path, group=group, dataset=name, rows=ranges)


def read_rows(ds: h5py.Dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``ds[start:stop]``, read again briefly if a chunk fails its checksum (a writer may be rewriting it),
    else a StoreDamagedError naming the file, group, dataset and rows."""
    stop = int(ds.shape[0]) if stop is None else int(stop)
    for attempt in range(READ_TRIES):
        try:
            return ds[start:stop]
        except (OSError, RuntimeError) as exc:
            last = exc
            if attempt + 1 < READ_TRIES:
                time.sleep(0.02)
    raise damage_error(ds, start, stop, last)


def checked(ds: h5py.Dataset) -> bool:
    """True when ``ds`` carries HDF5's Fletcher-32 checksum (every dataset of a store since it was added)."""
    return bool(ds.fletcher32)


def layer_names(f: h5py.File) -> list[str]:
    """The layers of a store: root names not starting with '_' (those are run records)."""
    return sorted(k for k in f.keys() if not k.startswith("_"))


def iter_groups(f: h5py.File) -> Iterator[tuple[str, str, Any]]:
    """(layer, pooling, object) of each layer group; a layer that is not a group (damage) comes as
    (layer, "", object)."""
    for layer in layer_names(f):
        if not isinstance(f[layer], h5py.Group):
            yield layer, "", f[layer]
            continue
        for pooling in sorted(f[layer].keys()):
            yield layer, pooling, f[layer][pooling]


def row_bytes(ds: h5py.Dataset) -> int:
    """Bytes of one row of ``ds``."""
    return int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize


def rows_per_block(rows: int, bytes_per_row: int) -> int:
    """``rows`` to read at a time, fewer where that many rows of ``bytes_per_row`` each would pass
    BLOCK_BYTES (at least 1); StoreError for ``rows`` < 1."""
    if rows < 1:
        raise StoreError(f"rows per chunk must be >= 1, got {rows}.")
    return int(max(1, min(rows, BLOCK_BYTES // max(1, bytes_per_row))))


def group_fingerprint(g: h5py.Group) -> str:
    """The manifest fingerprint a group was completed for ("" while not): the ``state`` dataset,
    or the ``manifest_fingerprint`` attribute of stores written before it existed."""
    st = g["state"] if "state" in g else None  # (get() would hide a damaged object as absent)
    if isinstance(st, h5py.Dataset) and st.shape and st.shape[0]:
        return _text(read_rows(st, 0, 1)[0])
    return str(decode(g.attrs.get("manifest_fingerprint")) or "")


def run_state(f: h5py.File) -> dict[str, Any]:
    """What the last finished run recorded: ``updated`` (time) and ``skipped`` ([path, reason] pairs),
    where the store has them."""
    out: dict[str, Any] = {}
    upd = f[UPDATED] if UPDATED in f else None  # (get() would hide a damaged object as absent)
    if isinstance(upd, h5py.Dataset) and upd.shape and upd.shape[0]:
        out["updated"] = _text(read_rows(upd, 0, 1)[0])
    sk = f[SKIPPED] if SKIPPED in f else None
    if isinstance(sk, h5py.Dataset):
        out["skipped"] = [_skip_entry(x) for x in read_rows(sk)]
    return out


def _skip_entry(raw: Any) -> Any:
    text = _text(raw)
    try:
        return json.loads(text)
    except ValueError:  # cut at SKIP_BYTES: keep the text
        return text


# --------------------------------------------------------------------------- the shard index


def write_index(path: str | os.PathLike, shards: Sequence[str | os.PathLike], attrs: dict[str, Any]) -> Path:
    """Write the index at ``path`` (atomically) listing ``shards`` relative to it, with ``attrs``."""
    path = Path(path)
    rel = [os.path.relpath(Path(s).resolve(), path.resolve().parent) for s in shards]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = INDEX_FORMAT
            f.attrs["shards"] = json.dumps(rel)
            for k, v in attrs.items():
                f.attrs[k] = encode(v)
    return path


def is_index(path: str | os.PathLike) -> bool:
    """True when ``path`` is the index of a sharded store."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == INDEX_FORMAT
    except (OSError, RuntimeError, KeyError, ValueError):  # not HDF5, or damaged: not an index
        return False


def read_index(path: str | os.PathLike) -> list[Path]:
    """The shard files an index lists, resolved (OSError, KeyError or ValueError when unreadable)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        rel = json.loads(f.attrs["shards"])
    return [(path.parent / r).resolve() for r in rel]
