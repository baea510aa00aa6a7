"""Decoding inputs beside the model, in threads or in processes.

Pillow holds Python's GIL for part of every image (opening, the EXIF turn, converting to an array): on
a GPU machine's 16 cores, 16 threads decoded only a few times what one core does (BENCHMARKS.md,
"GPU"), while the GPU could take far more. Processes have no GIL to share, so they scale with the cores;
they cost a start (well under a second each, in parallel) and a copy of each decoded array back
(150 KB at 224 px), which is why threads stay the choice on a CPU, where the network, not the decoder,
is the bottleneck.

:class:`DecodePool` hides which: ``submit(paths)`` returns a function that waits and gives, per path,
the ``(size, size, 3)`` uint8 array or the :data:`~tasks.data.inputs.InputError` that says why the file
cannot be used. The decoded values are the same either way (the same :func:`~tasks.data.inputs.input_loader`).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

import numpy as np

from storage.errors import DatasetError, ParameterError

from .audio import AudioError, Spectrogram
from .images import DEFAULT_MAX_PIXELS, ImageError
from .inputs import InputError, input_loader

DECODE_IN = ("auto", "threads", "processes")
# "auto" takes processes only for this many inputs or more: below it, starting them costs more than
# the GIL does (a few hundred images decode in well under a second on 16 threads).
PROCESS_MINIMUM = 2048
# Inputs per task sent to a process: large enough that the pickling of the task and its reply is
# a small part of the work, small enough that a batch is spread over every process.
CHUNK = 8

_LOADER: Callable[[str], np.ndarray] | None = None  # set in each decoding process by _start


def choose(decode_in: str, workers: int, inputs: int, gpu: bool) -> str:
    """``threads`` or ``processes`` for ``decode_in``: ``auto`` takes processes where a GPU computes (the
    decoder is then the bottleneck), with at least 4 workers and :data:`PROCESS_MINIMUM` inputs, and
    never in a daemonic process (a Dask worker's), which may not start processes of its own."""
    if decode_in not in DECODE_IN:
        raise ParameterError(f"decode_in must be one of {DECODE_IN}; got {decode_in!r}.")
    daemon = multiprocessing.current_process().daemon
    if decode_in == "processes":
        if daemon:
            raise ParameterError("decode_in='processes' cannot run here: this is a daemonic process (a Dask "
                                 "worker's, say), which may not start processes. Use decode_in='threads' "
                                 "or 'auto' here.")
        return "processes"
    if decode_in == "threads" or daemon:
        return "threads"
    return "processes" if gpu and workers >= 4 and inputs >= PROCESS_MINIMUM else "threads"


def _start(media: str, size: int, resize: str, max_pixels: int, spectrogram: Spectrogram | None) -> None:
    global _LOADER
    _LOADER = input_loader(media, size, resize, max_pixels, spectrogram)


def _decode_chunk(paths: Sequence[str]) -> list[np.ndarray | tuple[str, str]]:
    """In a decoding process: each path's array, or ``(kind, reason)`` for a file that cannot be used
    (the reason as text: exception classes need not survive the trip back)."""
    assert _LOADER is not None, "decoding process not started"
    out: list[np.ndarray | tuple[str, str]] = []
    for p in paths:
        try:
            out.append(_LOADER(p))
        except InputError as exc:
            out.append(("audio" if isinstance(exc, AudioError) else "image", str(exc)))
    return out


def _context() -> multiprocessing.context.BaseContext:
    # forkserver: a process forked from a small, clean server, never from this one, whose TensorFlow
    # and threads a fork would copy half-alive; spawn where there is no forkserver (Windows, macOS default).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods and sys.platform != "darwin"
                                       else "spawn")


def _died(chunk: Sequence[str]) -> DatasetError:
    return DatasetError(
        "a decoding process died (killed, out of memory, or a decoder crashed) while decoding one of: "
        f"{', '.join(os.path.basename(p) for p in chunk)}. Nothing written so far is lost: run the command "
        "again to go on; if it happens again, decode in threads (decode_in='threads'), where a crashing "
        "decoder stops at its file, and check or remove that file.")


class DecodePool:
    """``workers`` threads or processes decoding with :func:`~tasks.data.inputs.input_loader`'s loader."""

    def __init__(self, media: str, size: int, resize: str = "stretch", max_pixels: int = DEFAULT_MAX_PIXELS,
                 spectrogram: Spectrogram | None = None, workers: int = 1, mode: str = "threads"):
        if mode not in ("threads", "processes"):
            raise ParameterError(f"mode must be 'threads' or 'processes'; got {mode!r}.")
        self.mode, self.workers = mode, max(1, int(workers))
        self._load = input_loader(media, size, resize, max_pixels, spectrogram)  # checks the arguments here
        self._pool: Executor
        if mode == "threads":
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode")
        else:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context(), initializer=_start,
                                             initargs=(media, size, resize, max_pixels, spectrogram))

    def submit(self, paths: Sequence[str]) -> Callable[[], list[np.ndarray | Exception]]:
        """Start decoding ``paths``; the returned function waits and gives each path's array or error."""
        paths = list(paths)
        if self.mode == "threads":
            futures = [self._pool.submit(self._load, p) for p in paths]

            def wait_threads() -> list[np.ndarray | Exception]:
                out: list[np.ndarray | Exception] = []
                for fut in futures:
                    try:
                        out.append(fut.result())
                    except InputError as exc:
                        out.append(exc)
                return out
            return wait_threads
        # a batch spread over every process, at most CHUNK inputs per task
        step = max(1, min(CHUNK, -(-len(paths) // self.workers)))
        chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
        pending: list[tuple[list[str], Future]] = []
        for chunk in chunks:
            try:
                pending.append((chunk, self._pool.submit(_decode_chunk, chunk)))
            except BrokenProcessPool:
                raise _died(chunk) from None

        def wait_processes() -> list[np.ndarray | Exception]:
            out: list[np.ndarray | Exception] = []
            for chunk, fut in pending:
                try:
                    results = fut.result()
                except BrokenProcessPool:
                    raise _died(chunk) from None
                for r in results:
                    if isinstance(r, tuple):
                        kind, reason = r
                        out.append(AudioError(reason) if kind == "audio" else ImageError(reason))
                    else:
                        out.append(r)
            return out
        return wait_processes

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
