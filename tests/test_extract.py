"""Extraction into the feature store: multi-layer passes, incremental runs, crash safety, mixing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, TINY, TINY_EARLY, TINY_LAST
from storage import FeatureStore, StoreLockedError, StoreMismatchError
from storage.format import decode
from storage.store import GroupSpec, StoreWriter
from tasks.backbones import BackboneSpec
from tasks.data.datasets import scan_dataset
from tasks.extract import ExtractOptions, extract_to_store, normalise_cuts
from tasks.data.synthetic import make_dataset, make_image


def assert_same_codes(a, b):
    """Equal up to float round-off, relative to the codes' own scale (random-weight codes can be tiny)."""
    scale = float(np.abs(b).max())
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def by_path(codes):
    order = np.argsort(codes.paths.astype(str))
    return codes.paths.astype(str)[order], codes.features[order], codes.labels[order], codes.splits[order]


def test_extract_writes_every_image_with_labels_and_provenance(tmp_path, texture_data, tiny_spec):
    m = scan_dataset(texture_data, seed=3)
    store = tmp_path / "s.h5"
    s = extract_to_store(m, store, tiny_spec, [(TINY_LAST, "avg")])
    assert s["computed"] == len(m.samples) == 36 and s["skipped"] == []
    fs = FeatureStore(store)
    codes = fs.read(TINY_LAST, "avg")
    assert codes.features.shape == (36, 1280) and codes.features.dtype == np.float32
    assert np.isfinite(codes.features).all() and codes.features.std() > 0
    expected = {smp.path: (smp.label, smp.split, smp.sha256) for smp in m.samples}
    for p, lab, sp, h in zip(codes.paths, codes.labels, codes.splits, codes.sha256):
        assert expected[p] == (lab, sp, h)
    prov = fs.provenance
    assert prov["backbone"] == "mobilenet_v2" and prov["backbone_args"] == {"alpha": 0.35}
    assert prov["input_size"] == 96 and prov["weights"] == "none" and len(prov["weights_digest"]) == 64
    assert prov["preprocessing"] == "keras.applications.mobilenet_v2.preprocess_input"
    assert prov["class_names"] == m.class_names and "tensorflow" in prov["versions"]
    assert set(codes.splits) == {"train", "val", "test"}
    # reading one split returns only that split's rows
    val = fs.read(TINY_LAST, "avg", split="val")
    assert len(val) == int(np.sum(codes.splits == "val")) and set(val.splits) == {"val"}


def test_one_multi_layer_pass_equals_single_layer_passes(tmp_path, texture_data, tiny_spec):
    m = scan_dataset(texture_data)
    both = tmp_path / "both.h5"
    s = extract_to_store(m, both, tiny_spec, [(TINY_LAST, "avg"), (TINY_EARLY, "max"), (TINY_EARLY, "none")])
    assert s["computed"] == 36  # one pass: each image through the backbone once
    for layer, pooling in [(TINY_LAST, "avg"), (TINY_EARLY, "max"), (TINY_EARLY, "none")]:
        single = tmp_path / f"{pooling}.h5"
        extract_to_store(m, single, tiny_spec, [(layer, pooling)], ExtractOptions(batch_size=5))
        pa, fa, la, _ = by_path(FeatureStore(both).read(layer, pooling))
        pb, fb, lb, _ = by_path(FeatureStore(single).read(layer, pooling))
        assert (pa == pb).all() and (la == lb).all()
        assert_same_codes(fa, fb)
    assert FeatureStore(both).read(TINY_EARLY, "none").features.shape == (36, 24, 24, 48)


def test_rerun_on_grown_dataset_runs_backbone_only_on_new_and_changed_images(tmp_path, texture_data, tiny_spec):
    store = tmp_path / "s.h5"
    cuts = [(TINY_LAST, "avg"), (TINY_EARLY, "avg")]
    first = extract_to_store(scan_dataset(texture_data), store, tiny_spec, cuts)
    assert first["computed"] == 36
    before = {p: f for p, f in zip(*by_path(FeatureStore(store).read(TINY_LAST))[:2])}

    again = extract_to_store(scan_dataset(texture_data), store, tiny_spec, cuts)
    assert again["up_to_date"] and again["computed"] == 0

    classes = sorted(p.name for p in texture_data.iterdir())
    for i in range(5):  # 5 new images
        make_image("stripes", (50, 50), 1000 + i).save(texture_data / classes[0] / f"new_{i}.jpg")
    changed = sorted((texture_data / classes[1]).iterdir())[0]
    make_image("rings", (50, 60), 77).save(changed, format="JPEG")  # same path, new content
    removed = sorted((texture_data / classes[2]).iterdir())[:2]
    for p in removed:
        p.unlink()

    grown = extract_to_store(scan_dataset(texture_data), store, tiny_spec, cuts)
    assert grown["computed"] == 6          # 5 new + 1 changed, nothing else went through the backbone
    assert grown["removed"] == 3           # 2 deleted + the changed image's old row
    codes = FeatureStore(store).read(TINY_LAST)
    assert len(codes) == 36 + 5 - 2 and len(set(codes.paths)) == len(codes)
    paths, feats, _, _ = by_path(codes)
    rel_changed = changed.relative_to(texture_data).as_posix()
    for p, f in zip(paths, feats):
        if p in before and p != rel_changed:
            assert np.array_equal(f, before[p]), "an unchanged image's codes were recomputed or moved"
    new = dict(zip(paths, feats))[rel_changed]
    assert not np.allclose(new, before[rel_changed], rtol=1e-3, atol=0)
    assert not ({p.relative_to(texture_data).as_posix() for p in removed} & set(paths))


def test_bad_files_are_skipped_and_reported_not_fatal(tmp_path, texture_data, tiny_spec):
    cls = sorted(p for p in texture_data.iterdir())[0]
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "text.png").write_text("definitely not a png")
    good = sorted(cls.glob("*.jpg"))[1].read_bytes()
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cls / "notes.txt").write_text("hello")
    store = tmp_path / "s.h5"
    s = extract_to_store(scan_dataset(texture_data), store, tiny_spec, [(TINY_LAST, "avg")])
    reasons = {d["path"].split("/")[-1]: d["reason"] for d in s["skipped"]}
    assert set(reasons) == {"zero.jpg", "text.png", "truncated.jpg", "notes.txt"}
    assert "empty" in reasons["zero.jpg"] and "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.jpg"] and "not an image Pillow can identify (.txt)" in reasons["notes.txt"]
    assert s["computed"] == 36 and len(FeatureStore(store).read(TINY_LAST)) == 36
    # the up-to-date path still reports them
    again = extract_to_store(scan_dataset(texture_data), store, tiny_spec, [(TINY_LAST, "avg")])
    assert again["up_to_date"] and {d["path"].split("/")[-1] for d in again["skipped"]} == set(reasons)


def test_mixing_another_backbone_weights_or_preprocessing_is_refused(tmp_path, texture_data, tiny_spec):
    m = scan_dataset(texture_data)
    store = tmp_path / "s.h5"
    extract_to_store(m, store, tiny_spec, [(TINY_LAST, "avg")])
    size = store.stat().st_size
    other_weights = BackboneSpec(**dict(TINY, seed=1))              # other random weights
    other_pre = BackboneSpec(**dict(TINY, preprocessing="caffe"))
    other_args = BackboneSpec(**dict(TINY, backbone_args={"alpha": 0.5}))
    for spec, word in [(other_weights, "weights_digest"), (other_pre, "preprocessing"), (other_args, "backbone_args")]:
        with pytest.raises(StoreMismatchError) as err:
            extract_to_store(m, store, spec, [(TINY_LAST, "avg")])
        assert word in str(err.value) and "another --store" in str(err.value)
    with pytest.raises(StoreMismatchError, match="float16"):
        extract_to_store(m, store, tiny_spec, [(TINY_LAST, "avg")], ExtractOptions(dtype="float16"))
    assert len(FeatureStore(store).read(TINY_LAST)) == 36 and store.stat().st_size >= size * 0.9


def test_second_writer_is_refused_with_a_clear_message(tmp_path):
    store = tmp_path / "s.h5"
    ident = {"backbone": "x"}
    spec = [GroupSpec("l", "avg", (4,))]
    with StoreWriter(store, ident, spec):
        with pytest.raises(StoreLockedError, match=r"being written by pid \d+"):
            with StoreWriter(store, ident, spec):
                pass
    with StoreWriter(store, ident, spec):  # released after the first writer closed
        pass


def test_labels_follow_the_dataset_when_classes_change(tmp_path, texture_data, tiny_spec):
    store = tmp_path / "s.h5"
    extract_to_store(scan_dataset(texture_data), store, tiny_spec, [(TINY_LAST, "avg")])
    (texture_data / "aaa_first").mkdir()  # a new class sorting first shifts every label index
    make_image("checks", (40, 40), 5).save(texture_data / "aaa_first" / "x.jpg")
    m = scan_dataset(texture_data)
    s = extract_to_store(m, store, tiny_spec, [(TINY_LAST, "avg")])
    assert s["computed"] == 1 and s["relabelled"] == 36
    codes = FeatureStore(store).read(TINY_LAST)
    want = {x.path: x.label for x in m.samples}
    assert all(want[p] == lab for p, lab in zip(codes.paths, codes.labels))
    assert codes.class_names[0] == "aaa_first"


def test_normalise_cuts_validates():
    assert normalise_cuts(["a", "b"], "max") == [("a", "max"), ("b", "max")]
    assert normalise_cuts(["a", "b:none"], ["avg", "avg"]) == [("a", "avg"), ("b", "none")]
    from storage import ParameterError

    with pytest.raises(ParameterError, match="one per layer"):
        normalise_cuts(["a", "b", "c"], ["avg", "max"])
    with pytest.raises(ParameterError, match="pooling must be one of"):
        normalise_cuts(["a"], "mean")
    with pytest.raises(ParameterError, match="cnncodes layers"):
        normalise_cuts([], "avg")


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_to_store
    spec = BackboneSpec(**{tiny!r})
    m = scan_dataset({data!r})
    extract_to_store(m, {store!r}, spec, [({last!r}, "avg"), ({early!r}, "max")], ExtractOptions(batch_size=2))
""")


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_same_features_as_uninterrupted(tmp_path, tiny_spec):
    data = make_dataset(tmp_path / "data", per_class=100, size=(40, 40), seed=5)
    store = tmp_path / "killed.h5"
    script = KILL_SCRIPT.format(root=str(ROOT), tiny=TINY, data=str(data), store=str(store),
                                last=TINY_LAST, early=TINY_EARLY)
    env = dict(os.environ, CNNCODES_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    committed, deadline = 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if store.exists():
                try:
                    with h5py.File(store, "r", libver=("v110", "latest"), swmr=True) as f:
                        committed = int(f[f"{TINY_LAST}/avg/committed"][0])
                except (OSError, KeyError):
                    committed = 0
            if committed >= 40:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the extraction finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # The file is readable right after the kill and holds only whole batches.
    partial = FeatureStore(store).read(TINY_LAST, "avg")
    assert 40 <= len(partial) < 300 and np.isfinite(partial.features).all()

    m = scan_dataset(data)
    resumed = extract_to_store(m, store, tiny_spec, [(TINY_LAST, "avg"), (TINY_EARLY, "max")])
    assert resumed["recovered_after_crash"]
    assert resumed["computed"] <= 300 - len(partial) + 2  # finished batches are not recomputed
    reference = tmp_path / "reference.h5"
    extract_to_store(m, reference, tiny_spec, [(TINY_LAST, "avg"), (TINY_EARLY, "max")])
    for layer, pooling in [(TINY_LAST, "avg"), (TINY_EARLY, "max")]:
        pa, fa, la, sa = by_path(FeatureStore(store).read(layer, pooling))
        pb, fb, lb, sb = by_path(FeatureStore(reference).read(layer, pooling))
        assert len(pa) == 300 and (pa == pb).all() and (la == lb).all() and (sa == sb).all()
        assert_same_codes(fa, fb)
    with h5py.File(store, "r") as f:  # a plain (non-SWMR) open works again: the file was closed cleanly
        assert decode(f.attrs["format"]) == "cnncodes-store/1"


def test_storage_imports_neither_tensorflow_nor_prefect(tmp_path, texture_data, tiny_spec):
    store = tmp_path / "s.h5"
    extract_to_store(scan_dataset(texture_data), store, tiny_spec, [(TINY_LAST, "avg")])
    code = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(ROOT)!r})
        import storage
        from storage import FeatureStore
        codes = FeatureStore({str(store)!r}).read({TINY_LAST!r}, "avg")
        bad = sorted(m for m in ("tensorflow", "keras", "prefect") if m in sys.modules)
        print(json.dumps({{"rows": len(codes), "bad": bad}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"rows": 36, "bad": []}
