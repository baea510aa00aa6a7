"""Fast checked reads of a group's features: a 64-bit xxh3 sum per storage chunk, beside HDF5's Fletcher-32.

HDF5 checks a chunk's Fletcher-32 one byte pair at a time, inside its single-threaded filter pipeline:
on codes already in the page cache that more than doubled the time of ``read_features``
(``benchmarks/store.py``). So every features dataset of a new store also has a ``sums`` dataset,
``(chunks, 2) uint64``: for each storage chunk, the xxh3-64 of the bytes of its rows and how many
rows that covers. The readers read each chunk's bytes as they lie in the file (no filter pipeline,
``preadv`` at the places HDF5's chunk index gives), and check each chunk's xxh3 in a second thread while
the next ones are read (xxh3 runs at tens of GB/s and lets go
of the GIL). A chunk whose sum does not match (damage, or a writer extending the last chunk right now)
is read again the checked way (:func:`storage.format.read_rows`: Fletcher-32, retries, and a
:class:`~storage.errors.StoreDamagedError` naming the rows when it is damaged), so this path returns
exactly what the checked path returns, faster. ``sums`` itself carries Fletcher-32.

Fletcher-32 stays on every dataset: ``h5py`` users, ``h5dump`` and ``cnncodes store verify`` check it.
Groups written before ``sums`` existed (or where ``xxhash`` is not installed) are read the checked way.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import h5py
import numpy as np

from .errors import StoreDamagedError
from .format import read_rows

SUMS = "sums"
SUM_DTYPE = "u8"
BLOCK_BYTES = 8 << 20  # read this much per HDF5 call; the other thread checks the block before
THREAD_BYTES = 32 << 20  # below this, check inline (a thread costs more than it saves)

_HASH: Any = None


def hasher() -> Callable[[Any], int] | None:
    """xxh3-64 of a C-contiguous buffer, or None where ``xxhash`` is not installed."""
    global _HASH
    if _HASH is None:
        try:
            from xxhash import xxh3_64_intdigest
            _HASH = xxh3_64_intdigest
        except ImportError:  # pragma: no cover - xxhash is a dependency; a bare h5py install still reads
            _HASH = False
    return _HASH or None


def _sum(h: Callable[[Any], int], rows: np.ndarray) -> int:
    return h(np.ascontiguousarray(rows))


def create_sums(g: h5py.Group) -> h5py.Dataset:
    """The empty ``sums`` dataset of a new group (before SWMR mode: datasets cannot be created after)."""
    return g.create_dataset(SUMS, shape=(0, 2), maxshape=(None, 2), chunks=(4096, 2), dtype=SUM_DTYPE,
                            fletcher32=True)


def update_sums(g: h5py.Group, start: int, new: np.ndarray) -> None:
    """Record the sums of the chunks that rows ``[start, start + len(new))`` (just written, ``new``)
    touch; the rows before ``start`` in the first of them are read back. Nothing where the group has no
    ``sums`` or xxhash is missing."""
    h = hasher()
    if SUMS not in g or h is None or not len(new):
        return
    ds = g["features"]
    per = int(ds.chunks[0])
    stop = start + len(new)
    first, last = start // per, (stop - 1) // per
    head = first * per
    data = np.concatenate([read_rows(ds, head, start), new]) if start > head else np.asarray(new)
    values = np.empty((last - first + 1, 2), dtype=np.uint64)
    for i, c in enumerate(range(first, last + 1)):
        lo, hi = c * per - head, min((c + 1) * per, stop) - head
        values[i] = (_sum(h, data[lo:hi]), hi - lo)
    sums = g[SUMS]
    if sums.shape[0] < last + 1:
        sums.resize(last + 1, axis=0)
    sums[first:last + 1] = values


def rebuild_sums(g: h5py.Group, n: int) -> None:
    """Sums of every chunk of rows ``[0, n)`` (after a copy, a repair or dropped rows), creating the
    dataset where it is missing; outside SWMR mode only."""
    if hasher() is None:
        return
    if SUMS not in g:
        create_sums(g)
    g[SUMS].resize(0, axis=0)
    step = _block_rows(g["features"])
    for start in range(0, n, step):
        update_sums(g, start, read_rows(g["features"], start, min(n, start + step)))


def trim_sums(g: h5py.Group, n: int) -> None:
    """After rows past ``n`` were dropped: the sums of whole chunks stay, the last partial one is redone."""
    if SUMS not in g or hasher() is None:
        return
    per = int(g["features"].chunks[0])
    g[SUMS].resize(-(-n // per), axis=0)
    head = (n // per) * per
    if n > head:
        update_sums(g, head, read_rows(g["features"], head, n))


def _block_rows(ds: h5py.Dataset) -> int:
    """Rows of whole storage chunks to read at a time: about BLOCK_BYTES, at least one chunk."""
    per = int(ds.chunks[0])
    return max(per, (BLOCK_BYTES // max(1, per * _row_bytes(ds))) * per)


def _row_bytes(ds: h5py.Dataset) -> int:
    return int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize


def _raw_readable(ds: h5py.Dataset) -> bool:
    """True when a stored chunk of ``ds`` is its rows' bytes followed by the 4 bytes of Fletcher-32 (no
    compression or shuffle, native byte order): then the rows are read as they lie in the file."""
    return (bool(ds.chunks) and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]) and bool(ds.fletcher32)
            and ds.compression is None and not ds.shuffle and not ds.scaleoffset and ds.dtype.isnative)


def _chunk_table(ds: h5py.Dataset, first: int, count: int) -> dict[int, tuple[int, int, int]]:
    """``{chunk number: (byte offset, stored size, filter mask)}`` of chunks ``[first, count)``: one walk
    over the chunk index when the range is a fair share of it, else one lookup per chunk."""
    per = int(ds.chunks[0])
    table: dict[int, tuple[int, int, int]] = {}
    total = -(-int(ds.shape[0]) // per)
    if (count - first) * 8 >= total:
        def visit(info) -> None:
            c = int(info.chunk_offset[0]) // per
            if first <= c < count:
                table[c] = (int(info.byte_offset), int(info.size), int(info.filter_mask))

        ds.id.chunk_iter(visit)
    else:
        rest = (0,) * (ds.ndim - 1)
        for c in range(first, count):
            info = ds.id.get_chunk_info_by_coord((c * per, *rest))
            if info.byte_offset is not None:
                table[c] = (int(info.byte_offset), int(info.size), int(info.filter_mask))
    return table


def read_summed(g: h5py.Group, n: int, start: int = 0, stop: int | None = None) -> np.ndarray | None:
    """Rows ``[start, stop)`` (default all ``n`` committed rows) of ``g["features"]``, checked by the
    sums, or None where the group cannot be read this way (the caller reads the checked way).

    The chunks' places in the file come from HDF5's chunk index; their bytes are read with ``preadv`` on
    HDF5's own file descriptor, runs of adjacent chunks in one call, each chunk's rows straight into the
    result and its 4 bytes of Fletcher-32 aside (no filter pipeline and no chunk cache: a later checked
    read of a chunk really reads and checks the file). Another thread checks each block's xxh3 sums while
    the next block is read. A chunk whose sum does not match (damage, a writer extending the last chunk
    right now, a short read) is read again the checked way, which raises StoreDamagedError when the chunk
    is damaged. Whole chunks are read: a range that starts or ends inside one reads all of it
    (:func:`worth_summing` says when that pays)."""
    import os

    stop = n if stop is None else stop
    h = hasher()
    ds = g["features"]
    if (h is None or SUMS not in g or not n or stop <= start or stop > n or not _raw_readable(ds)
            or not hasattr(os, "preadv")):  # (Windows has no preadv: the checked way)
        return None
    per = int(ds.chunks[0])
    row = _row_bytes(ds)
    size = per * row  # bytes of one chunk's rows; the file holds them plus 4 bytes of Fletcher-32
    first, count = start // per, -(-stop // per)
    sums_ds = g[SUMS]
    sums_ds.refresh()
    if sums_ds.shape[0] < count:
        return None
    try:
        sums = read_rows(sums_ds, first, count)
        table = _chunk_table(ds, first, count)
        fd = ds.file.id.get_vfd_handle()
    except (StoreDamagedError, OSError, RuntimeError, ValueError, TypeError):  # the checked way
        return None
    base = first * per  # the first row in the result
    top = min(count * per, n)  # rows past it are not committed
    out = np.empty((top - base, *ds.shape[1:]), dtype=ds.dtype)
    flat = memoryview(out.reshape(-1).view(np.uint8))
    trailer, spill = bytearray(4), bytearray(size)
    bad: list[int] = []

    def check(chunks: list[int]) -> None:
        for c in chunks:
            lo, hi = c * per - base, min((c + 1) * per, n) - base
            if int(sums[c - first, 1]) != hi - lo or _sum(h, out[lo:hi]) != int(sums[c - first, 0]):
                bad.append(c)

    pool = ThreadPoolExecutor(1, thread_name_prefix="cnncodes-sums") if out.nbytes > THREAD_BYTES else None
    pending = []
    batch: list[int] = []
    buffers: list[Any] = []
    at_file = expected = 0

    def flush() -> None:
        nonlocal batch, buffers, expected
        if batch:
            got = os.preadv(fd, buffers, at_file)
            if got != expected:  # the file ends early (cut or being rewritten): those chunks the checked way
                bad.extend(batch)
            elif pool is None:
                check(batch)
            else:
                pending.append(pool.submit(check, batch))
        batch, buffers, expected = [], [], 0

    try:
        for c in range(first, count):
            place = table.get(c)
            if place is None or place[2] or place[1] != size + 4:  # missing or not stored as expected
                flush()
                bad.append(c)
                continue
            offset = place[0]
            if batch and (offset != at_file + expected or expected + size + 4 > BLOCK_BYTES
                          or len(buffers) > 1000):
                flush()
            if not batch:
                at_file = offset
            lo = (c * per - base) * row
            hi = (min((c + 1) * per, n) - base) * row
            buffers.append(flat[lo:hi])
            if hi - lo < size:  # the last chunk holds rows past the committed ones
                buffers.append(memoryview(spill)[:size - (hi - lo)])
            buffers.append(trailer)
            batch.append(c)
            expected += size + 4
        flush()
        for p in pending:
            p.result()
    except (OSError, RuntimeError, ValueError):  # the file cannot be read this way: the checked way
        return None
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    for c in sorted(set(bad)):
        lo, hi = c * per, min((c + 1) * per, n)
        out[lo - base:hi - base] = read_rows(ds, lo, hi)
    return out if start == base and stop == top else out[start - base:stop - base]


def worth_summing(ds: h5py.Dataset, start: int, stop: int, n: int) -> bool:
    """Whether reading rows ``[start, stop)`` as whole chunks (:func:`read_summed`) reads little more than
    the rows: the range is chunk-aligned, or spans at least four chunks."""
    if not ds.chunks:
        return False
    per = int(ds.chunks[0])
    return stop - start >= 4 * per or (start % per == 0 and (stop % per == 0 or stop == n))


class SumChecker:
    """Checks a group's sums against its rows as ``store verify`` reads them, block by block in order
    (``feed``); chunks whose rows could not be read are left out. ``stale`` lists the chunks whose sum
    does not match rows that pass Fletcher-32 (the sums are out of date: readers read those chunks the
    slower, checked way); ``damaged`` says the sums dataset itself fails its checksum."""

    def __init__(self, g: h5py.Group, n: int):
        self.stale: list[int] = []
        self.damaged = False
        self.per, self.n = (int(g["features"].chunks[0]) if g["features"].chunks else 1), n
        # a checksummed group written before sums existed: read the slower way until repair adds them
        self.missing = SUMS not in g and bool(g["features"].fletcher32) and hasher() is not None
        self.active = SUMS in g and hasher() is not None and n > 0
        if not self.active:
            return
        import xxhash

        self._new = xxhash.xxh3_64
        count = -(-n // self.per)
        if g[SUMS].shape[0] < count:
            self.stale = list(range(g[SUMS].shape[0], count))
            count = g[SUMS].shape[0]
        try:
            self.sums = read_rows(g[SUMS], 0, count)
        except StoreDamagedError:
            self.damaged, self.active = True, False
            return
        self._next = 0
        self._h = self._new()

    def feed(self, start: int, rows: np.ndarray) -> None:
        if not self.active:
            return
        if start != self._next:  # rows were skipped (damaged): restart at the next whole chunk
            self._h, self._next = None, start
        pos = start
        while pos < start + len(rows):
            c = pos // self.per
            end = min((c + 1) * self.per, self.n, start + len(rows))
            if pos == c * self.per:
                self._h = self._new()
            if self._h is not None:
                self._h.update(np.ascontiguousarray(rows[pos - start:end - start]))
                if end == min((c + 1) * self.per, self.n) and c < len(self.sums):
                    if (self._h.intdigest() != int(self.sums[c, 0])
                            or int(self.sums[c, 1]) != end - c * self.per):
                        self.stale.append(c)
                    self._h = None
            pos = end
        self._next = start + len(rows)

    def rows(self) -> list[tuple[int, int]]:
        """The row ranges of the stale chunks."""
        return [(c * self.per, min((c + 1) * self.per, self.n)) for c in sorted(set(self.stale))]


def sums_need_rebuild(g: h5py.Group, n: int) -> bool:
    """True when the group's sums are missing (a checksummed group written before them), fail their own
    checksum, do not cover its ``n`` rows, or do not match them (rows read the checked way; damaged rows are left to the caller)."""
    checker = SumChecker(g, n)
    if checker.damaged or checker.stale or checker.missing:
        return True
    if not checker.active:
        return False
    step = _block_rows(g["features"])
    for start in range(0, n, step):
        try:
            checker.feed(start, read_rows(g["features"], start, min(n, start + step)))
        except StoreDamagedError:
            continue
    return bool(checker.stale)
