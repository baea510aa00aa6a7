"""Sound through image CNNs (issue 17): decoding every format and defect, grouped splits, the spectrogram
recipe (its pixels, its place in a store's identity), time-only pooling, and the flows end to end on tiny
generated recordings."""
from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_LAST

RATE = 8000


def tone(freq: float, seconds: float = 0.5, rate: int = RATE, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, wave: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str | None = None) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, rate, subtype=subtype, format=fmt)
    return path


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name,subtype,fmt", [
    ("u8.wav", "PCM_U8", "WAV"), ("s16.wav", "PCM_16", "WAV"), ("s24.wav", "PCM_24", "WAV"),
    ("s32.wav", "PCM_32", "WAV"), ("f32.wav", "FLOAT", "WAV"), ("f64.wav", "DOUBLE", "WAV"),
    ("x.flac", "PCM_16", "FLAC"), ("x.ogg", "VORBIS", "OGG"),
])
def test_every_format_decodes_to_the_same_tone(tmp_path, name, subtype, fmt):
    from tasks.data.audio import load_audio

    wave = tone(440.0)
    got = load_audio(write(tmp_path / name, wave, subtype=subtype, fmt=fmt), RATE)
    assert got.dtype == np.float32 and got.ndim == 1
    n = min(len(got), len(wave))
    assert abs(len(got) - len(wave)) <= 64
    # lossy Vorbis and 8-bit PCM are close, the others nearly exact
    tol = 0.08 if subtype in ("VORBIS", "PCM_U8") else 1e-3
    if subtype != "VORBIS":  # Vorbis may shift the signal by its decoder delay
        assert np.max(np.abs(got[:n] - wave[:n])) < tol
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * RATE / len(got) - 440.0) < 5


def test_stereo_is_mixed_down_and_other_rates_resampled(tmp_path):
    from tasks.data.audio import load_audio

    left, right = tone(300.0, rate=44100), tone(300.0, rate=44100, amp=0.1)
    got = load_audio(write(tmp_path / "st.wav", np.stack([left, right], axis=1), rate=44100), RATE)
    assert abs(len(got) - 0.5 * RATE) <= 2  # 0.5 s at the stated rate
    assert abs(np.max(np.abs(got)) - 0.3) < 0.02  # the mean of the channels
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * RATE / len(got) - 300.0) < 5


def _defects(root: Path) -> dict[str, str]:
    """Files with a defect -> a word their skip reason must contain."""
    write(root / "silent.wav", np.zeros(RATE // 2, np.float32))
    write(root / "long.wav", tone(200.0, seconds=3.0))
    (root / "empty.wav").write_bytes(b"")
    (root / "text.wav").write_text("not a recording at all\n" * 20)
    good = (root / "ok.wav")
    write(good, tone(500.0))
    (root / "cut.flac").write_bytes(write(root / "whole.flac", tone(500.0), fmt="FLAC").read_bytes()[:40])
    (root / "whole.flac").unlink()
    return {"silent.wav": "silent", "long.wav": "too long", "empty.wav": "empty", "text.wav": "not a sound file",
            "cut.flac": "sound"}


def test_every_defect_is_skipped_with_its_reason(tmp_path):
    from tasks.data.audio import AudioError, load_audio

    expected = _defects(tmp_path)
    for name, word in expected.items():
        with pytest.raises(AudioError) as exc:
            load_audio(tmp_path / name, RATE, max_seconds=2.0)
        assert word in str(exc.value), (name, str(exc.value))
    assert len(load_audio(tmp_path / "ok.wav", RATE, max_seconds=2.0)) == RATE // 2


# --------------------------------------------------------------------------- spectrograms
def test_mel_filters_and_power_spectrum_equal_tensorflow_signal():
    import tensorflow as tf

    from tasks.data.audio import Spectrogram, mel_matrix, power_spectrogram

    r = Spectrogram(sample_rate=RATE, n_mels=40, fmin=50.0, fmax=3500.0)
    bins = r.fft_length // 2 + 1
    ours = mel_matrix(40, bins, RATE, 50.0, 3500.0)
    theirs = tf.signal.linear_to_mel_weight_matrix(40, bins, RATE, 50.0, 3500.0).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    w = np.random.default_rng(0).normal(size=RATE // 2).astype(np.float32)
    stft = tf.signal.stft(w, r.frame_length, r.hop_length, r.fft_length).numpy()
    np.testing.assert_allclose(power_spectrogram(w, r), np.abs(stft) ** 2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("freq", [250.0, 1000.0, 3000.0])
def test_a_tone_lands_on_its_mel_row_low_frequencies_at_the_bottom(freq):
    from tasks.data.audio import Spectrogram, mel_center_hz, spectrogram_image

    r = Spectrogram(sample_rate=RATE, n_mels=32, duration=None, colormap="gray")
    img = spectrogram_image(tone(freq), r, size=32)  # one row per band: no vertical resampling
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    row = int(np.argmax(img[:, :, 0].astype(float).mean(axis=1)))
    band = int(np.argmin(np.abs(mel_center_hz(r) - freq)))
    assert abs(row - (31 - band)) <= 1, (row, 31 - band)


def test_duration_crops_and_pads_as_the_recipe_says():
    from tasks.data.audio import Spectrogram, fit_duration

    w = np.arange(10, dtype=np.float32) + 1
    r = Spectrogram(sample_rate=8000, duration=6 / 8000, fit="center", window_ms=2.0, hop_ms=1.0)
    assert fit_duration(w, r).tolist() == [3, 4, 5, 6, 7, 8]
    r = r.model_copy(update={"fit": "start"})
    assert fit_duration(w, r).tolist() == [1, 2, 3, 4, 5, 6]
    short = np.ones(4, np.float32)
    assert fit_duration(short, r).tolist() == [1, 1, 1, 1, 0, 0]
    assert fit_duration(short, r.model_copy(update={"fit": "center"})).tolist() == [0, 1, 1, 1, 1, 0]


def test_recipe_errors_name_the_setting():
    from storage.errors import ParameterError
    from tasks.data.audio import Spectrogram

    with pytest.raises(ParameterError, match="fmax must be at most half the sample rate"):
        Spectrogram(sample_rate=8000, fmax=6000)
    with pytest.raises(ParameterError, match="fmin must be below fmax"):
        Spectrogram(sample_rate=8000, fmin=4000)
    assert Spectrogram(duration="none").duration is None


def test_time_only_pooling_equals_numpy_mean_over_time(tiny_spec):
    from tasks.backbones import Extractor, build_backbone

    bb = build_backbone(tiny_spec)
    ex = Extractor(bb, [(TINY_LAST, "time-avg"), (TINY_LAST, "time-max"), (TINY_LAST, "none"),
                        (TINY_LAST, "time-avg2"), (TINY_LAST, "time-avg3")])
    batch = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    t_avg, t_max, full, t_avg2, t_avg3 = ex(batch)
    n, h, w, c = full.shape
    assert ex.shapes[0] == (h * c,) and t_avg.shape == (n, h * c)
    np.testing.assert_allclose(t_avg, full.mean(axis=2).reshape(n, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t_max, full.max(axis=2).reshape(n, -1), rtol=1e-5, atol=1e-6)
    # time segments: numpy's array_split of the time axis (the columns), each averaged; rows, then segments
    for k, got in ((2, t_avg2), (3, t_avg3)):
        want = np.stack([part.mean(axis=2) for part in np.array_split(full, k, axis=2)], axis=2)
        assert ex.shapes[2 + k - 1] == (h * k * c,) and got.shape == (n, h * k * c)
        np.testing.assert_allclose(got, want.reshape(n, -1), rtol=1e-5, atol=1e-6)
    from storage.errors import ParameterError
    from tasks.backbones import pooled_shape

    with pytest.raises(ParameterError, match="3 columns wide, fewer than the 4 time segments"):
        pooled_shape((None, 3, 3, 8), "time-avg4", "narrow")


# --------------------------------------------------------------------------- datasets
SPEAKERS = ("ann", "bob", "cid", "dee", "eve")


@pytest.fixture
def spoken(tmp_path):
    """Tiny 'spoken digits': 3 classes (a tone each, the speaker shifts its pitch a little), 5 speakers,
    2 recordings per class and speaker, as class folders, 8 kHz 16-bit WAV of 0.25 s."""
    root = tmp_path / "spoken"
    base = {"0": 400.0, "1": 900.0, "2": 1800.0}
    rng = np.random.default_rng(0)
    for k, spk in enumerate(SPEAKERS):
        for cls, f in base.items():
            for i in range(2):
                w = tone(f * (1 + 0.01 * k), seconds=0.25) + 0.01 * rng.normal(size=2000).astype(np.float32)
                write(root / cls / f"{cls}_{spk}_{i}.wav", w)
    return root


def _speaker(path: str) -> str:
    return Path(path).name.split("_")[1]


def test_grouped_split_keeps_each_speaker_in_one_split(spoken):
    from tasks.data.datasets import scan_dataset

    for seed in range(4):
        m = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.2, seed=seed, group_by=r"^\d+_([a-z]+)_")
        assert m.media == "audio" and len(m.samples) == 30
        sides = collections.defaultdict(set)
        for s in m.samples:
            sides[_speaker(s.path)].add(s.split)
        assert all(len(v) == 1 for v in sides.values()), sides
        per_split = collections.Counter(next(iter(v)) for v in sides.values())
        assert per_split == {"train": 3, "val": 1, "test": 1}, per_split
        # stratified: every class in every split
        for sp in ("train", "val", "test"):
            assert {s.label for s in m.samples if s.split == sp} == {0, 1, 2}
    ungrouped = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.2, seed=0)
    mixed = collections.defaultdict(set)
    for s in ungrouped.samples:
        mixed[_speaker(s.path)].add(s.split)
    assert any(len(v) > 1 for v in mixed.values())  # what grouping prevents


def test_csv_group_column_groups_and_straddling_splits_are_refused(spoken, tmp_path):
    from storage.errors import DatasetError
    from tasks.data.datasets import scan_dataset

    rows = [(p.relative_to(spoken).as_posix(), p.parent.name, _speaker(p.name)) for p in sorted(spoken.rglob("*.wav"))]
    path = spoken / "list.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    m = scan_dataset(path, val_fraction=0.2, test_fraction=0.2, seed=1)
    sides = collections.defaultdict(set)
    for s in m.samples:
        sides[_speaker(s.path)].add(s.split)
    assert all(len(v) == 1 for v in sides.values())
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        w.writerows([(*r, "test" if i == 0 else "train") for i, r in enumerate(rows)])
    with pytest.raises(DatasetError, match="straddle"):
        scan_dataset(path, seed=1)


def test_a_test_split_carved_from_grouped_val_takes_whole_groups(spoken):
    from tasks.data.datasets import scan_dataset

    rows = [(p.relative_to(spoken).as_posix(), p.parent.name, _speaker(p.name)) for p in sorted(spoken.rglob("*.wav"))]
    path = spoken / "list.csv"
    given = {"ann": "train", "bob": "train", "cid": "val", "dee": "val", "eve": "val"}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        w.writerows([(*r, given[r[2]]) for r in rows])
    m = scan_dataset(path, test_fraction=0.2, seed=3)
    sides = collections.defaultdict(set)
    for s in m.samples:
        sides[_speaker(s.path)].add(s.split)
    assert all(len(v) == 1 for v in sides.values()), sides
    got = {g: next(iter(v)) for g, v in sides.items()}
    assert list(got.values()).count("test") == 1  # 20% of 5 equal groups: one, taken from val
    assert {g for g, sp in got.items() if sp == "train"} == {"ann", "bob"}  # train is left as given


def test_scan_skips_defects_at_extraction_and_images_in_a_sound_dataset(spoken, tmp_path, tiny_spec):
    from PIL import Image

    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_to_store

    _defects(spoken / "0")
    Image.new("RGB", (8, 8)).save(spoken / "1" / "stray.png")
    m = scan_dataset(spoken, group_by=r"^\d+_([a-z]+)_")
    reasons = {s.path: s.reason for s in m.skipped}
    assert "sound recordings" in reasons["1/stray.png"]
    spec = tiny_spec.model_copy(update={"spectrogram": tiny_spec.spectrogram.model_copy(
        update={"sample_rate": RATE, "n_mels": 32, "max_seconds": 2.0})})
    out = extract_to_store(m, tmp_path / "s.h5", spec, [(TINY_LAST, "time-avg")], ExtractOptions(batch_size=8))
    reasons = {d["path"]: d["reason"] for d in out["skipped"]}
    for name, word in {"silent.wav": "silent", "long.wav": "too long", "empty.wav": "empty",
                       "text.wav": "not a sound file", "cut.flac": "sound"}.items():
        assert word in reasons[f"0/{name}"], (name, reasons.get(f"0/{name}"))
    assert out["computed"] == 31  # 30 recordings and ok.wav


def test_recipe_round_trip_and_a_different_recipe_is_refused(spoken, tmp_path, tiny_spec):
    from storage.errors import StoreMismatchError
    from storage.store import FeatureStore
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_to_store

    m = scan_dataset(spoken, group_by=r"^\d+_([a-z]+)_")
    recipe = tiny_spec.spectrogram.model_copy(update={"sample_rate": RATE, "n_mels": 48, "hop_ms": 8.0})
    spec = tiny_spec.model_copy(update={"spectrogram": recipe})
    store = tmp_path / "s.h5"
    extract_to_store(m, store, spec, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16))
    prov = FeatureStore(store).provenance
    assert prov["media"] == "audio" and prov["spectrogram"] == recipe.as_dict()
    assert recipe.describe() in prov["preprocessing"]
    rebuilt = BackboneSpec.model_validate(prov["spec"])
    assert rebuilt.spectrogram == recipe  # predict rebuilds the exact recipe from the store
    again = extract_to_store(m, store, rebuilt, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16))
    assert again["up_to_date"] and again["computed"] == 0
    other = spec.model_copy(update={"spectrogram": recipe.model_copy(update={"n_mels": 64})})
    with pytest.raises(StoreMismatchError, match="n_mels=48.*n_mels=64"):
        extract_to_store(m, store, other, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16))


def test_spectrogram_command_writes_the_image_the_network_sees(spoken, tmp_path):
    from PIL import Image

    from cnncodes.cli import main
    from tasks.data.audio import Spectrogram, load_spectrogram

    src = next(spoken.rglob("*.wav"))
    out = tmp_path / "s.png"
    assert main(["spectrogram", str(src), "--output", str(out), "--input-size", "96", "--backbone", "mobilenet_v2",
                 "--sample-rate", str(RATE), "--n-mels", "40"]) == 0
    png = np.asarray(Image.open(out))
    expected = load_spectrogram(src, 96, Spectrogram(sample_rate=RATE, n_mels=40))
    assert png.shape == (96, 96, 3) and np.array_equal(png, expected)
    assert main(["spectrogram", str(tmp_path / "nothing.wav"), "--output", str(out)]) == 2


# --------------------------------------------------------------------------- transfer, fine-tuning
def test_similarity_and_probe_take_each_layers_best_pooling():
    from tasks.decide.transfer import SizeMeasure, decide, measure_similarity

    rows = [{"layer": "early", "pooling": "avg", "mean": 0.50}, {"layer": "early", "pooling": "time-avg", "mean": 0.80},
            {"layer": "late", "pooling": "avg", "mean": 0.40}, {"layer": "late", "pooling": "time-avg", "mean": 0.60}]
    sim = measure_similarity(rows, "late", 0.02, pretrained=True)
    assert sim.late_score == 0.60 and sim.late_pooling == "time-avg"
    assert sim.best_early_layer == "early" and sim.best_early_pooling == "time-avg" and not sim.similar
    size = SizeMeasure(train_images=100, per_class={"a": 50, "b": 50}, median_per_class=50, smallest_class=50,
                       threshold=500, large=False)
    d = decide(size, sim)
    assert d.case == 2 and (d.probe_layer, d.probe_pooling) == ("early", "time-avg")
    assert decide(size, sim, force_case=1).probe_pooling == "time-avg"  # the late layer's best


def test_sound_gets_spectrogram_augmentations_never_flips():
    import tensorflow as tf

    from tasks.finetune import FineTuneConfig
    from tasks.finetune.data import augmentation, augmentations_for

    cfg = FineTuneConfig(augment=("flip", "rotation", "zoom"), augment_strength=0.2)
    assert augmentations_for(cfg, "image") == ("flip", "rotation", "zoom")
    assert augmentations_for(cfg, "audio") == ("time-mask", "freq-mask", "time-shift")
    assert augmentations_for(cfg.model_copy(update={"augment": ("contrast", "time-mask")}), "audio") == \
        ("contrast", "time-mask")
    layers = augmentation(cfg.model_copy(update={"augment": ("freq-mask",)}), "audio")
    x = tf.ones((4, 20, 30, 3)) * 200.0
    y = layers(x, training=True).numpy()
    assert np.array_equal(layers(x, training=False).numpy(), x.numpy())
    for img in y:  # whole rows blacked out, at most 2 x 0.2 x 20 of them, every column alike
        rows_off = np.flatnonzero(img[:, :, 0].max(axis=1) == 0)
        assert len(rows_off) <= 8 and np.all((img[rows_off] == 0))
        assert np.all(img[np.setdiff1d(np.arange(20), rows_off)] == 200.0)


def test_a_colour_map_colours_the_grey_image_and_changes_the_identity():
    import matplotlib

    from tasks.data.audio import Spectrogram, spectrogram_image

    gray = Spectrogram(sample_rate=RATE, n_mels=32, colormap="gray")
    coloured = gray.model_copy(update={"colormap": "viridis"})
    g, c = spectrogram_image(tone(700.0), gray, 48), spectrogram_image(tone(700.0), coloured, 48)
    expected = np.rint(matplotlib.colormaps["viridis"](g[:, :, 0] / 255.0)[:, :, :3] * 255).astype(np.uint8)
    assert np.array_equal(c, expected)
    assert gray.describe() != coloured.describe()


def test_cross_validation_is_grouped_where_the_data_has_groups():
    """A feature that only identifies the speaker scores high under ordinary folds and at chance under
    grouped ones: what a C search or layer sweep on sound must not be fooled by."""
    from tasks.probe.linear import LinearConfig, cv_score

    rng = np.random.default_rng(0)
    speakers = np.repeat(np.arange(6), 20)
    y = np.tile(np.arange(2), 60)
    # each speaker says each class in its own way: the features identify (speaker, class) pairs only
    codes = {(s, c): rng.normal(size=16) * 3 for s in range(6) for c in range(2)}
    X = np.stack([codes[(s, c)] + rng.normal(size=16) * 0.1 for s, c in zip(speakers, y)])
    cfg = LinearConfig(classifier="softmax", cv_folds=3)
    plain, _ = cv_score(X, y, cfg, 1.0)
    grouped, _ = cv_score(X, y, cfg, 1.0, groups=speakers.astype(str))
    assert plain > 0.95 and grouped < 0.8, (plain, grouped)


def test_extraction_keeps_the_groups_beside_the_store_for_the_probe(spoken, tmp_path, tiny_spec):
    from storage.store import FeatureStore
    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_to_store, groups_path
    from tasks.probe.train import row_groups

    m = scan_dataset(spoken, group_by=r"^\d+_([a-z]+)_")
    assert set(m.groups.values()) == set(SPEAKERS)
    store = tmp_path / "s.h5"
    spec = tiny_spec.model_copy(update={"spectrogram": tiny_spec.spectrogram.model_copy(update={"sample_rate": RATE})})
    extract_to_store(m, store, spec, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16))
    codes = FeatureStore(store).read(TINY_LAST, "avg", split=["train", "val"])
    groups = row_groups(store, codes)
    assert groups is not None and [str(g) for g in groups] == [_speaker(p.decode() if isinstance(p, bytes) else p)
                                                               for p in codes.paths]
    groups_path(store).write_text("{not json")  # damaged: said, and the folds fall back to ungrouped
    with pytest.warns(UserWarning, match="cannot be read.*not grouped.*cnncodes extract"):
        assert row_groups(store, codes) is None
    ungrouped = scan_dataset(spoken)
    extract_to_store(ungrouped, store, spec, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16))
    assert not groups_path(store).exists() and row_groups(store, codes) is None


@pytest.mark.slow  # fine-tunes a network: the full suite, not the edit-test loop
def test_fine_tuning_learns_tones_from_spectrograms_with_their_augmentations(spoken, tmp_path, small_cnn):
    """The fine-tuning pipeline draws the recordings with the spec's recipe (never the image decoder),
    applies the spectrogram augmentations, and the saved model, evaluated and asked to predict through the
    same drawing, tells the three tones apart on speakers it never heard."""
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, evaluate_finetuned, fine_tune, load_finetuned
    from tasks.finetune.evaluation import predict_paths

    m = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.2, seed=0, group_by=r"^\d+_([a-z]+)_")
    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01",
                        spectrogram={"sample_rate": RATE, "n_mels": 32, "colormap": "gray", "duration": None})
    cfg = FineTuneConfig(dense=[16], dropout=0.0, batch_size=6, augment=["flip", "time-mask"], epochs=30,
                         patience=30, optimizer="adam", learning_rate=3e-3, head_pooling="time-avg")
    res = fine_tune(m, spec, cfg, tmp_path / "run")
    assert not res.skipped
    metrics, skipped = evaluate_finetuned(res.model_path, m, 32, "stretch", 6, spectrogram=spec.spectrogram)
    assert not skipped and metrics["test"]["accuracy"] >= 0.8, {k: v["accuracy"] for k, v in metrics.items()}
    test = [m.abspath(s) for s in m.samples if s.split == "test"]
    probs, ok, skips = predict_paths(load_finetuned(res.model_path), test, 32, "stretch", 6, "audio",
                                     spec.spectrogram)
    assert len(ok) == len(test) and probs.shape == (len(test), 3)


def test_new_recordings_of_a_pinned_speaker_join_that_speakers_split(spoken):
    from tasks.data.datasets import scan_dataset

    first = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.2, seed=0, group_by=r"^\d+_([a-z]+)_")
    pinned = {s.sha256: s.split for s in first.samples}
    side = {_speaker(s.path): s.split for s in first.samples}
    rng = np.random.default_rng(5)
    for spk in SPEAKERS:  # a third recording per class and speaker, and a new speaker
        for cls, f in {"0": 400.0, "1": 900.0, "2": 1800.0}.items():
            write(spoken / cls / f"{cls}_{spk}_9.wav", tone(f * 1.02, seconds=0.3) + 0.02 * rng.normal(size=2400))
            write(spoken / cls / f"{cls}_zed_{spk}.wav", tone(f, seconds=0.3) + 0.02 * rng.normal(size=2400))
    again = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.2, seed=0, pinned=pinned,
                         group_by=r"^\d+_([a-z]+)_")
    for s in again.samples:
        if _speaker(s.path) in side:
            assert s.split == side[_speaker(s.path)], s
    assert len({s.split for s in again.samples if _speaker(s.path) == "zed"}) == 1


def test_a_sharded_extraction_keeps_the_groups_beside_its_index(spoken, tmp_path, tiny_spec):
    from storage.store import open_store
    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_shard, finish_sharded, groups_path
    from tasks.probe.train import row_groups

    m = scan_dataset(spoken, group_by=r"^\d+_([a-z]+)_")
    spec = tiny_spec.model_copy(update={"spectrogram": tiny_spec.spectrogram.model_copy(update={"sample_rate": RATE})})
    store = tmp_path / "sharded.h5"
    parts = [extract_shard(m, store, i, 2, spec, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16)) for i in range(2)]
    finish_sharded(store, 2, m, parts)
    assert groups_path(store).is_file()
    codes = open_store(store).read(TINY_LAST, "avg")
    groups = row_groups(store, codes)
    assert groups is not None and [str(g) for g in groups] == [_speaker(p.decode() if isinstance(p, bytes) else p)
                                                               for p in codes.paths]


def test_a_lineage_remembers_its_grouping_and_retrain_uses_it(spoken, tmp_path, tiny_spec, monkeypatch):
    """The regular expression that grouped the first training's files (speakers) is recorded in the
    lineage's splits.json and the model's metadata; a retrain (a schedule passes no --group-by) groups new
    recordings the same way."""
    import flows.retrain as flow_module
    from storage import ModelRegistry
    from tasks.data.datasets import scan_dataset
    from tasks.decide.retrain import split_settings
    from tasks.extract import ExtractOptions, extract_to_store
    from tasks.probe.linear import LinearConfig
    from tasks.probe.train import fit_probe

    regex = r"^\d+_([a-z]+)_"
    m = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.2, seed=0, group_by=regex)
    assert m.group_by == regex
    store = tmp_path / "s.h5"
    spec = tiny_spec.model_copy(update={"spectrogram": tiny_spec.spectrogram.model_copy(update={"sample_rate": RATE})})
    extract_to_store(m, store, spec, [(TINY_LAST, "avg")], ExtractOptions(batch_size=16))
    reg = tmp_path / "registry"
    fit_probe(store, TINY_LAST, "avg", LinearConfig(C=1.0), reg, name="digits")
    assert ModelRegistry(reg).splits("digits")["group_by"] == regex
    assert ModelRegistry(reg).load("digits")[1].metadata["split"]["group_by"] == regex
    assert split_settings(reg, "digits")["group_by"] == regex

    seen = []

    class Stop(Exception):
        pass

    def scan(*args, group_by=None, **kwargs):
        seen.append(group_by)
        raise Stop

    monkeypatch.setattr(flow_module, "scan_dataset", scan)
    monkeypatch.setattr(flow_module, "retrain_split_settings", split_settings)  # the task's plain function
    from tasks.settings import Output

    for given, expected in ((None, regex), (r"^(\d+)_", r"^(\d+)_")):
        with pytest.raises(Stop):
            flow_module.retrain.fn(str(spoken), "digits", Output(out=str(tmp_path), registry=str(reg)), group_by=given)
        assert seen.pop() == expected


BY_SPEAKER = r"^\d+_([a-z]+)_"


def _grouped_finetune(spoken, tmp_path, small_cnn, monkeypatch, **settings):
    """Fine-tune on the tiny spoken digits, speakers kept apart by split, with ``settings`` (AdaBN on), then
    evaluate, register (model ``tones``) and report: (manifest, registry, the result)."""
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, evaluate_register_report, evaluation, fine_tune

    monkeypatch.setattr(evaluation, "MIN_IMAGES", 4)  # a tiny speaker has 6 recordings
    m = scan_dataset(spoken, val_fraction=0.2, test_fraction=0.4, seed=0, group_by=BY_SPEAKER)
    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01",
                        spectrogram={"sample_rate": RATE, "n_mels": 32, "colormap": "gray", "duration": None})
    cfg = FineTuneConfig(**{"dense": [], "batch_size": 6, "monitor": "none", "optimizer": "adam",
                            "learning_rate": 3e-3, "freeze_batchnorm": False, "adapt_batchnorm": True, **settings})
    r = fine_tune(m, spec, cfg, tmp_path / "run")
    trained = {"model_path": r.model_path, "history": r.history, "phases": r.phases, "counts": r.counts,
               "skipped": r.skipped, "seconds": r.seconds, "input_size": r.input_size, "precision": r.precision}
    reg = tmp_path / "registry"
    return m, reg, evaluate_register_report(trained, m, spec, cfg, "stretch", reg, "tones", tmp_path / "reports")


@pytest.mark.slow  # fine-tunes a network: the full suite, not the edit-test loop
def test_adapt_batchnorm_evaluates_each_test_speaker_adapted_and_predict_adapts_the_same_groups(
        spoken, tmp_path, small_cnn, monkeypatch):
    """--adapt-batchnorm: the registered model's val and test metrics come from predictions made speaker by
    speaker after AdaBN, the report says so beside the trained statistics' accuracy, and `predict` with the
    same grouping of file names reproduces those predictions; with every file as one group it does not."""
    import pandas as pd

    from tasks.predict import predict_images

    m, reg, res = _grouped_finetune(spoken, tmp_path, small_cnn, monkeypatch, augment=[], epochs=3)
    test_speakers = {s.path: _speaker(s.path) for s in m.samples if s.split == "test"}
    assert len(set(test_speakers.values())) >= 2
    for split in ("val", "test"):
        a = res["metrics"][split]["adaptation"]
        want = pd.Series([_speaker(s.path) for s in m.samples if s.split == split]).value_counts().to_dict()
        assert a["adapted_groups"] == want and a["kept_groups"] == {} and a["batchnorm_layers"] == 3
        n = sum(want.values())  # an accuracy over exactly the split's files: a whole number of them right
        assert a["unadapted_accuracy"] * n == pytest.approx(round(a["unadapted_accuracy"] * n), abs=1e-6)
    assert "adaptation" not in res["metrics"]["train"]
    assert "AdaBN" in Path(res["report"]).read_text()
    # predict, grouped by the same pattern, gives the evaluation's predictions, file by file
    listing = tmp_path / "test.txt"
    listing.write_text("\n".join(m.abspath(s) for s in m.samples if s.split == "test"))
    grouped = predict_images(listing, reg, "tones", None, tmp_path / "grouped.csv", group_by=BY_SPEAKER)
    assert grouped["adaptation"]["adapted_groups"] == pd.Series(list(test_speakers.values())).value_counts().to_dict()
    outcomes = pd.read_csv(res["metrics"]["test"]["outcomes"])
    got = pd.read_csv(tmp_path / "grouped.csv")
    got["name"] = got["path"].map(lambda p: Path(p).name)
    outcomes["name"] = outcomes["path"].map(lambda p: Path(p).name)
    merged = outcomes.merge(got, on="name", suffixes=("_eval", "_pred"))
    assert len(merged) == len(test_speakers)
    assert (merged["predicted_eval"].astype(str) == merged["predicted_pred"].astype(str)).all()
    # the same groups from a CSV's group column
    table = tmp_path / "test.csv"
    table.write_text("path,group\n" + "".join(f"{m.abspath(s)},{_speaker(s.path)}\n" for s in m.samples
                                               if s.split == "test"))
    by_column = predict_images(table, reg, "tones", None, tmp_path / "column.csv")
    assert by_column["adaptation"]["adapted_groups"] == grouped["adaptation"]["adapted_groups"]
    np.testing.assert_allclose(pd.read_csv(tmp_path / "column.csv")[[c for c in got.columns if c.startswith("p_")]],
                               got[[c for c in got.columns if c.startswith("p_")]], atol=1e-5)
    # one group of all the files: other statistics, other probabilities
    predict_images(listing, reg, "tones", None, tmp_path / "one.csv")
    one = pd.read_csv(tmp_path / "one.csv")
    cols = [c for c in got.columns if c.startswith("p_")]
    assert np.abs(one[cols].to_numpy() - got[cols].to_numpy()).max() > 1e-4
    # an export predicts with the trained statistics, and its model card says so with both accuracies
    from tasks.export import export_model
    from tasks.settings import ExportOptions

    export_model(reg, "tones", None, tmp_path / "export", ExportOptions(format="keras"))
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    unadapted = res["metrics"]["test"]["adaptation"]["unadapted_accuracy"]
    assert "carries the trained statistics" in card and f"{100 * unadapted:.1f}%" in card


@pytest.mark.slow  # fine-tunes a network: the full suite, not the edit-test loop
def test_self_training_evaluates_each_test_speaker_self_trained_and_predict_serves_the_same(
        spoken, tmp_path, small_cnn, monkeypatch):
    """--self-train on an ensemble: each val/test speaker is adapted (AdaBN), then every network trains on that
    speaker's own confident predictions; the metrics record it beside AdaBN alone, the reports say so, and
    `predict` grouped alike reproduces the evaluation's predictions."""
    import pandas as pd

    from tasks.export import export_model
    from tasks.predict import predict_images
    from tasks.settings import ExportOptions

    m, reg, res = _grouped_finetune(spoken, tmp_path, small_cnn, monkeypatch, epochs=2, ensemble=2, self_train=1,
                                    self_train_epochs=2, self_train_learning_rate=1e-3)
    test_speakers = {s.path: _speaker(s.path) for s in m.samples if s.split == "test"}
    a = res["metrics"]["test"]["adaptation"]
    assert set(a["self_training"]["groups"]) == set(test_speakers.values()) == set(a["adapted_groups"])
    assert all(len(g["rounds"]) == 1 and 1 <= g["rounds"][0]["pseudo_labels"] < g["images"]
               for g in a["self_training"]["groups"].values())
    n = len(test_speakers)  # accuracies over exactly the test files: a whole number of them right
    for key in ("adabn_accuracy", "unadapted_accuracy"):
        assert a[key] * n == pytest.approx(round(a[key] * n), abs=1e-6), (key, a[key], n)
    assert "self-trained on each adapted group" in Path(res["report"]).read_text()
    listing = tmp_path / "test.txt"
    listing.write_text("\n".join(m.abspath(s) for s in m.samples if s.split == "test"))
    got = predict_images(listing, reg, "tones", None, tmp_path / "grouped.csv", group_by=BY_SPEAKER)
    assert set(got["adaptation"]["self_training"]["groups"]) == set(test_speakers.values())
    outcomes = pd.read_csv(res["metrics"]["test"]["outcomes"])
    table = pd.read_csv(tmp_path / "grouped.csv")
    merged = outcomes.assign(name=outcomes["path"].map(lambda p: Path(p).name)).merge(
        table.assign(name=table["path"].map(lambda p: Path(p).name)), on="name", suffixes=("_eval", "_pred"))
    assert len(merged) == len(test_speakers)
    assert (merged["predicted_eval"].astype(str) == merged["predicted_pred"].astype(str)).all()
    export_model(reg, "tones", None, tmp_path / "export", ExportOptions(format="keras"))
    assert "--self-train 1" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
