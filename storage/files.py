"""Files written safely: one atomic write and one file lock for the whole project (standard library only).

* :func:`atomic_path` - a temporary name beside a target for any writer (h5py, pyarrow, Keras,
  Matplotlib...); on success the file is fsynced and renamed into place, on failure removed.
  A crash at any point leaves either the old file or the new one under the target's name.
* :func:`atomic_write` / :func:`atomic_write_json` - bytes, text or JSON written that way.
* :class:`FileLock` - an exclusive ``flock`` on a lock file, blocking or not; the kernel drops it
  when the process dies, so a killed holder never leaves a stale lock. :func:`lock_is_held` asks
  whether someone holds one, without taking it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

INCOMPLETE = ".incomplete"  # temporary files end with this (plus the ``suffix`` a writer needs)


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def temp_beside(target: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh hidden name beside ``target`` (not created), unique to this process and call."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{INCOMPLETE}{suffix}")


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write a file at; when the block ends without an
    exception the file is fsynced and renamed to ``target`` (replacing it), otherwise it is removed.
    ``suffix`` ends the temporary name, for writers that choose the format by it (``.png``, ``.keras``).

    >>> with atomic_path("out/table.parquet") as tmp:   # doctest: +SKIP
    ...     df.to_parquet(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically: the old content or the new, never a part."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, **dumps)``."""
    return atomic_write(path, json.dumps(obj, **dumps))


class FileLockBusy(OSError):
    """The lock is held by another process (only raised by a non-blocking acquire)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(errno.EAGAIN, f"{path} is held by {holder}")
        self.path = path
        self.holder = holder


class FileLock:
    """An exclusive lock on the file ``path`` (created if need be), also a context manager (blocking).

    While held, the file says who holds it (``pid N on HOST since TIME``); a non-blocking
    :meth:`acquire` that finds it held raises :class:`FileLockBusy` carrying that text. The kernel
    releases the lock when its holder exits or is killed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = None

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self, blocking: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise FileLockBusy(self.path, holder) from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename} since {now_iso()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_is_held(path: str | os.PathLike) -> bool:
    """True when a process holds the :class:`FileLock` at ``path``. The lock file is only probed: opened
    read-only, never created, share-locked for an instant (a non-blocking acquire in that instant finds
    the lock busy: the store writer retries for half a second for that reason)."""
    try:
        fh = open(path, "rb")
    except OSError:
        return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False
    finally:
        fh.close()
