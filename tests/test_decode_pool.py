"""Decoding in processes (beside a GPU) gives what decoding in threads gives, and fails as clearly."""
from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest

from conftest import TINY_LAST
from storage import FeatureStore
from storage.errors import DatasetError, ParameterError
from tasks.data import decode_pool
from tasks.data.datasets import scan_dataset
from tasks.data.decode_pool import PROCESS_MINIMUM, DecodePool, choose
from tasks.data.images import ImageError
from tasks.extract import ExtractOptions, extract_to_store


def _files(texture_data, tmp_path):
    files = sorted(str(p) for p in texture_data.rglob("*.jpg"))
    assert len(files) >= 12
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 a JPEG header and nothing else")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return files[:6] + [str(bad)] + files[6:12] + [str(empty), str(tmp_path / "gone.png")]


def test_processes_decode_exactly_what_threads_decode_and_name_the_same_errors(texture_data, tmp_path):
    files = _files(texture_data, tmp_path)
    results = {}
    for mode in ("threads", "processes"):
        with DecodePool("image", 64, resize="crop", workers=3, mode=mode) as pool:
            first, second = pool.submit(files[:7]), pool.submit(files[7:])  # two batches in flight
            results[mode] = first() + second()
    threads, processes = results["threads"], results["processes"]
    assert len(threads) == len(processes) == len(files)
    errors = 0
    for path, a, b in zip(files, threads, processes):
        if isinstance(a, np.ndarray):
            assert isinstance(b, np.ndarray) and b.shape == (64, 64, 3) and b.dtype == np.uint8, path
            np.testing.assert_array_equal(a, b)
        else:
            errors += 1
            assert isinstance(a, ImageError) and type(b) is type(a) and str(b) == str(a) and str(a), path
    assert errors == 3  # the cut JPEG, the empty file, the file that is gone: skips with reasons, not a stop


def test_a_decoding_process_that_dies_is_a_clear_error_naming_its_files(texture_data, tmp_path):
    files = _files(texture_data, tmp_path)[:4]
    with DecodePool("image", 32, workers=2, mode="processes") as pool:
        pool.submit(files)()  # the processes are up
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DatasetError) as err:
            pool.submit(files)()
    msg = str(err.value)
    assert "decoding process died" in msg and os.path.basename(files[0]) in msg
    assert "decode_in='threads'" in msg and "run the command again" in msg


def test_choose_takes_processes_only_where_they_pay_and_may_start(monkeypatch):
    big = PROCESS_MINIMUM
    assert choose("auto", 16, big, gpu=True) == "processes"
    assert choose("auto", 16, big, gpu=False) == "threads"  # on a CPU the network, not the decoder, is slow
    assert choose("auto", 16, big - 1, gpu=True) == "threads"  # starting processes would cost more
    assert choose("auto", 2, big, gpu=True) == "threads"
    assert choose("threads", 16, big, gpu=True) == "threads"
    assert choose("processes", 1, 1, gpu=False) == "processes"
    with pytest.raises(ParameterError, match="decode_in must be one of"):
        choose("fork", 4, 10, gpu=False)

    class Daemon:
        daemon = True
    monkeypatch.setattr(multiprocessing, "current_process", lambda: Daemon())
    assert choose("auto", 16, big, gpu=True) == "threads"  # a Dask worker may not start processes
    with pytest.raises(ParameterError, match="daemonic process"):
        choose("processes", 16, big, gpu=True)


def test_extraction_decoding_in_processes_writes_the_codes_threads_write(tmp_path, texture_data, tiny_spec):
    m = scan_dataset(texture_data, seed=3)
    with pytest.raises(ParameterError, match="decode_in"):
        ExtractOptions(decode_in="forks")
    stores = {}
    for mode in ("threads", "processes"):
        stores[mode] = tmp_path / f"{mode}.h5"
        s = extract_to_store(m, stores[mode], tiny_spec, [(TINY_LAST, "avg")],
                             ExtractOptions(batch_size=8, decode_in=mode, decode_workers=2))
        assert s["decode_in"] == mode and s["computed"] == len(m.samples)
    a, b = (FeatureStore(stores[k]).read(TINY_LAST, "avg") for k in ("threads", "processes"))
    assert list(a.paths) == list(b.paths)
    np.testing.assert_array_equal(a.features, b.features)  # the same pixels in, the same codes out


def test_pool_refuses_an_unknown_mode():
    with pytest.raises(ParameterError, match="threads' or 'processes'"):
        DecodePool("image", 32, mode="fork")
    assert decode_pool.DECODE_IN == ("auto", "threads", "processes")


def test_sound_decodes_in_processes_with_the_recipe_given(tmp_path):
    import soundfile as sf

    from tasks.data.audio import AudioError, Spectrogram

    t = np.arange(4000) / 8000
    files = []
    for i, freq in enumerate((300.0, 1200.0)):
        files.append(str(tmp_path / f"tone{i}.wav"))
        sf.write(files[-1], (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 8000)
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(4000, np.float32), 8000)
    files.append(str(silent))
    recipe = Spectrogram(n_mels=32, duration=0.5)
    results = {}
    for mode in ("threads", "processes"):
        with DecodePool("audio", 48, spectrogram=recipe, workers=2, mode=mode) as pool:
            results[mode] = pool.submit(files)()
    for a, b in zip(results["threads"][:2], results["processes"][:2]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results["processes"][0], results["processes"][1])  # the two tones differ
    assert isinstance(results["processes"][2], AudioError) and str(results["processes"][2]) == str(results["threads"][2])
