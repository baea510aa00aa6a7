"""The stat cache of a scan: what a scan learned from each file's content, keyed by the file's stat.

A re-run of a flow on data that barely changed should cost what changed, not the dataset's size. So,
as git's index and rsync do, a scan records for each file its stat -- size, modification time and
inode-change time (nanoseconds) and inode number -- beside what reading it gave: the sha256 of its
bytes, or the reason it is not an image (:class:`~tasks.data.media.NotMedia`). The next scan lists and
stats the files (a directory listing and one ``stat`` per file, no reads) and reads again only those
whose stat differs from the record; every other file keeps its recorded hash or verdict, so it is
neither hashed nor sniffed.

What makes a record trusted:

* **Every stat field equal.** Rewriting a file changes its mtime and ctime; restoring the old mtime
  afterwards (``touch -r``, ``os.utime``, ``rsync -t``) still changes the ctime, which no program can
  set; replacing the file by another (a rename over it) changes the inode. Changing permissions or
  owner changes the ctime too: such a file is hashed again, which costs time, never correctness.
* **Not racy** (git's "racy clean" problem). A file written during the scan, after it was read, within
  the same tick of the filesystem's clock as the stat the scan took keeps the same stat with new
  content. So a file whose mtime or ctime is not older than the scan's start minus
  :data:`RACY_MARGIN_NS` (2 s: FAT's and older filesystems' timestamps have 1-2 s granularity) is not
  recorded: the next scan reads it again.
* **The same rules.** The reasons for skipping non-images depend on Pillow and on
  :mod:`tasks.data.media`; when either changed, only the hashes of files with a known image extension
  are reused, and other files are sniffed again.
* **An intact file.** The cache is written atomically (:func:`storage.files.atomic_path`) with a sha256
  of its content in its last line; a cache that is damaged, truncated, of another format version or
  of another byte order is ignored with a warning and rewritten by the scan. A cache can only ever
  save work, never change a scan's result: ``rehash=True`` (``--rehash``) ignores it and reads every
  file, for data changed behind the filesystem's back (a disk image edited offline, a clock set back,
  bit rot).

Where it lives: beside the manifest the scan writes, as ``<manifest>.statcache``
(:func:`cache_path_for`), so that each flow and store keeps its own, and deleting a run's folder deletes
it. Paths in it are absolute, so a cache never mixes up two datasets: a moved dataset is read again.

File format (version 1): a JSON header line; one line per folder, the JSON array
``[folder, names, stats, verdicts]`` where ``names`` and ``verdicts`` are joined by NUL (which no file
name holds), ``verdicts`` are 64 hex digits or ``!`` and the reason the file is not an image, and
``stats`` is base64 of 4 native int64 per file (size, mtime_ns, ctime_ns, inode); and a last JSON line
with the number of files and the sha256 of all the lines above it. A folder's records are decoded only when the scan reaches
that folder, so the cache costs about 170 bytes of memory per file.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat as statmod
import sys
from array import array
from pathlib import Path
from typing import Iterable

from storage.files import atomic_path

from .media import IMAGE_EXTENSIONS, NEVER_TRIED, UNSIGNED_FORMATS, NotMedia, kind_from_extension

FORMAT = "cnncodes-statcache"
VERSION = 1
SUFFIX = ".statcache"
RACY_MARGIN_NS = 2_000_000_000

Key = tuple  # (size, mtime_ns, ctime_ns, inode)
log = logging.getLogger("cnncodes")


class NotRegularFile(OSError):
    """A FIFO, socket or device file: never opened (reading a FIFO would wait forever)."""


def cache_path_for(manifest_path: str | os.PathLike) -> Path:
    """Where the stat cache of a scan that writes ``manifest_path`` lives: ``<manifest_path>.statcache``."""
    return Path(str(manifest_path) + SUFFIX)


def stat_key(st: os.stat_result) -> Key | OSError:
    """The key a record must match, or the error that says why the file is not read at all."""
    if statmod.S_ISREG(st.st_mode):
        ino = st.st_ino  # up to 2**64 on some filesystems: kept as the int64 it is stored as
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, ino - (1 << 64) if ino >= 1 << 63 else ino
    if statmod.S_ISDIR(st.st_mode):
        return IsADirectoryError(21, "Is a directory")
    return NotRegularFile("not a regular file (a FIFO, socket or device)")


def is_racy(key: Key, started_ns: int) -> bool:
    """Whether a file may have changed in the same clock tick as the scan that started at ``started_ns``
    (see the module's docstring): such a file is not recorded."""
    return max(key[1], key[2]) >= started_ns - RACY_MARGIN_NS


def media_rules() -> str:
    """What a cached "not an image" verdict (or a sniffed file's hash) depends on: the rules of
    :mod:`tasks.data.media` and Pillow's version."""
    try:
        from PIL import __version__ as pillow
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pillow = "none"
    text = json.dumps([IMAGE_EXTENSIONS, UNSIGNED_FORMATS, NEVER_TRIED, pillow])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CacheDamaged(ValueError):
    pass


class StatCache:
    """The records of the last scan, read from its file; :meth:`folder` decodes one folder's records."""

    def __init__(self, raw: dict[str, list[list]], same_rules: bool = True):
        self._raw = raw  # folder -> encoded records (a folder written twice has two)
        self.same_rules = same_rules
        self.files = 0

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple["StatCache | None", str]:
        """The cache at ``path`` and what became of it: ``"used"``, ``"missing"``, or ``"ignored: WHY"``
        (logged as a warning). Never raises for a bad file: a scan without a cache is only slower."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, "missing"
        except OSError as exc:
            return _ignored(path, f"it cannot be read: {exc.strerror or exc}")
        try:
            return cls._parse(data), "used"
        except CacheDamaged as exc:
            return _ignored(path, str(exc))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return _ignored(path, f"it is damaged ({type(exc).__name__}: {exc})")

    @classmethod
    def _parse(cls, data: bytes) -> "StatCache":
        if not data.endswith(b"\n") or data.count(b"\n") < 2:
            raise CacheDamaged("it is truncated or not a stat cache")
        cut = data.rindex(b"\n", 0, len(data) - 1) + 1
        trailer = json.loads(data[cut:])
        if trailer.get("sha256") != hashlib.sha256(data[:cut]).hexdigest():
            raise CacheDamaged("its checksum does not match its content (damaged or edited)")
        first = data.index(b"\n") + 1
        head = json.loads(data[:first])
        if head.get("format") != FORMAT:
            raise CacheDamaged("it is not a cnncodes stat cache")
        if head.get("version") != VERSION or head.get("byteorder") != sys.byteorder:
            raise CacheDamaged(f"it was written by another version (format {head.get('version')}, "
                               f"{head.get('byteorder')}-endian)")
        raw: dict[str, list[list]] = {}
        for line in data[first:cut].splitlines():
            rec = json.loads(line)
            if not (isinstance(rec, list) and len(rec) == 4 and all(isinstance(x, str) for x in rec)):
                raise CacheDamaged("a folder's record is malformed")
            raw.setdefault(rec[0], []).append(rec[1:])
        cache = cls(raw, same_rules=head.get("media") == media_rules())
        cache.files = int(trailer.get("files", 0))
        if not cache.same_rules:
            log.info("the rules for telling images apart (or Pillow) changed since the last scan: files "
                     "without a known image extension are sniffed again")
        return cache

    def folder(self, dirpath: str) -> dict[str, tuple[Key, str]]:
        """The records of the files directly in ``dirpath``: name -> (key, verdict). Each folder is decoded
        once; its encoded form is dropped then. A damaged folder record is ignored with a warning."""
        out: dict[str, tuple[Key, str]] = {}
        for names, stats, verdicts in self._raw.pop(dirpath, ()):
            try:
                nums = array("q")
                nums.frombytes(base64.b64decode(stats, validate=True))
                names_, verdicts_ = names.split("\0"), verdicts.split("\0")
                if not (len(names_) == len(verdicts_) and len(nums) == 4 * len(names_)):
                    raise ValueError("lengths differ")
                if not all(len(v) == 64 or v[:1] == "!" for v in verdicts_):
                    raise ValueError("a verdict is neither a sha256 nor a reason")
            except ValueError as exc:
                log.warning("stat cache: the record of %s is damaged (%s); its files are read again", dirpath, exc)
                continue
            records = zip(names_, zip(zip(nums[0::4], nums[1::4], nums[2::4], nums[3::4]), verdicts_))
            if self.same_rules:
                out.update(records)
            else:
                out.update((name, rec) for name, rec in records
                           if not rec[1].startswith("!") and kind_from_extension(name) is not None)
        return out


def _ignored(path: Path, why: str) -> tuple[None, str]:
    log.warning("stat cache %s ignored: %s. Every file is read and hashed again and the cache is rewritten; "
                "nothing to do unless this repeats (then check the disk, or delete the file).", path, why)
    return None, f"ignored: {why}"


def verdict_text(verdict: str | Exception) -> str | None:
    """How a verdict is recorded (a hash, or ``!`` and the reason), or None for one not recorded: an
    I/O error may be gone by the next scan."""
    if isinstance(verdict, str):
        return verdict
    if isinstance(verdict, NotMedia):
        return "!" + str(verdict).replace("\0", "\ufffd")
    return None


def from_text(text: str) -> str | NotMedia:
    return NotMedia(text[1:]) if text.startswith("!") else text


def write(path: str | os.PathLike, folders: Iterable[tuple[str, list[str], list[Key], list[str]]],
          started_ns: int) -> int:
    """Write a stat cache at ``path`` (atomically) from ``(folder, names, keys, verdict texts)``; returns the
    number of files recorded."""
    h = hashlib.sha256()
    files = 0
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as fh:
        def put(b: bytes) -> None:
            h.update(b)
            fh.write(b)

        put(json.dumps({"format": FORMAT, "version": VERSION, "byteorder": sys.byteorder, "media": media_rules(),
                        "started_ns": started_ns}).encode("ascii") + b"\n")
        for dirpath, names, keys, verdicts in folders:
            if not names:
                continue
            nums = array("q", [v for k in keys for v in k])
            put(json.dumps([dirpath, "\0".join(names), base64.b64encode(nums.tobytes()).decode("ascii"),
                            "\0".join(verdicts)]).encode("ascii") + b"\n")
            files += len(names)
        fh.write(json.dumps({"files": files, "sha256": h.hexdigest()}).encode("ascii") + b"\n")
    return files
