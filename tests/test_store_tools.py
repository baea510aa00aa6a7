"""storage.tools, storage.verify and `cnncodes store`: list, inspect, export (parquet/csv/npy), verify stores.

Stores are built by hand with StoreWriter (no TensorFlow); each test takes well under a second or two."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from storage import FeatureStore, Manifest, Sample, StoreError
from storage.hashing import file_sha256
from storage.store import LIBVER, GroupSpec, StoreWriter
from storage.tools import export_group, list_store, store_info
from storage.verify import verify_store
from test_linear import CLASSES, make_store

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["parquet", "csv", "npy"]


@pytest.fixture
def store(tmp_path) -> Path:
    return make_store(tmp_path / "s.h5")  # 120 rows (40 per class), groups signal/avg and noise/avg


def build_store(path: Path, samples: list[Sample], feats: dict[str, np.ndarray], classes=CLASSES,
                meta: dict | None = None, pooling: str = "avg", dtype: str = "float32") -> Path:
    """A store with one group per key of ``feats`` holding these rows."""
    m = Manifest("/data", "folders", list(classes), samples)
    ident = {"backbone": "toy", "weights": "none", "weights_digest": "d" * 64, "input_size": 8,
             "preprocessing": "none"}
    specs = [GroupSpec(layer, pooling, tuple(x.shape[1:]), dtype) for layer, x in feats.items()]
    with StoreWriter(path, ident, specs, meta) as w:
        w.plan(m)
        w.start_appending()
        for spec in specs:
            w.append(spec.name, [s.path for s in samples], [s.sha256 for s in samples], [s.label for s in samples],
                     [s.split for s in samples], feats[spec.layer])
        w.finish(m)
    return path


def read_export(result: dict) -> tuple[np.ndarray, pd.DataFrame]:
    """(features, rows table with path,label,class,split,sha256) of an exported file."""
    out = Path(result["output"])
    if result["format"] == "npy":
        rows = pd.read_csv(result["rows_file"], dtype={"sha256": str, "path": str}, keep_default_na=False)
        return np.load(out), rows
    df = pd.read_parquet(out) if result["format"] == "parquet" else pd.read_csv(
        out, dtype={"sha256": str, "path": str}, keep_default_na=False)
    fcols = [c for c in df.columns if c.startswith("f") and c[1:].isdigit()]
    assert list(df.columns[:5]) == ["path", "label", "class", "split", "sha256"]
    assert fcols == list(df.columns[5:])
    return df[fcols].to_numpy(np.float32), df[["path", "label", "class", "split", "sha256"]]


def assert_same(result: dict, codes) -> None:
    X, rows = read_export(result)
    assert result["rows"] == len(codes) == len(rows)
    assert np.array_equal(X.reshape(len(codes), -1), codes.features.reshape(len(codes), -1))
    assert rows["path"].tolist() == list(codes.paths)
    assert rows["label"].tolist() == codes.labels.tolist()
    assert rows["split"].tolist() == list(codes.splits)
    assert rows["sha256"].tolist() == list(codes.sha256)
    assert rows["class"].tolist() == [codes.class_names[i] for i in codes.labels]


# --------------------------------------------------------------------------- ls / info


def test_list_store_summarises_provenance_and_groups(store):
    r = list_store(store)
    assert r["format"] == "cnncodes-store/1" and r["size_bytes"] == store.stat().st_size > 0
    p = r["provenance"]
    assert p["backbone"] == "toy" and p["weights"] == "none" and p["weights_digest"] == "d" * 64
    assert p["input_size"] == 8 and p["class_names"] == CLASSES and p["created"]
    assert [(g["layer"], g["pooling"], g["rows"], g["feature_shape"], g["dtype"], g["compression"])
            for g in r["groups"]] == [("noise", "avg", 120, [32], "float32", None),
                                      ("signal", "avg", 120, [32], "float32", None)]
    json.dumps(r)  # JSON-ready


def test_info_counts_rows_per_split_and_class_and_shows_first_rows(store):
    r = store_info(store, head=3)
    g = {x["group"]: x for x in r["groups"]}["signal/avg"]
    assert g["splits"] == {"test": 30, "train": 60, "val": 30}
    assert g["classes"] == {"cat": 40, "dog": 40, "fox": 40}
    codes = FeatureStore(store).read("signal", "avg")
    assert [h["path"] for h in g["head"]] == list(codes.paths[:3])
    assert g["head"][0]["features"][:4] == pytest.approx(codes.features[0, :4].tolist())
    assert g["uncommitted_rows"] == 0 and g["manifest_fingerprint"]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip_equals_the_store(store, tmp_path, fmt):
    r = export_group(store, "signal", out=tmp_path / f"out.{fmt}")
    assert r["format"] == fmt and r["group"] == "signal/avg" and Path(r["output"]).is_file()
    assert_same(r, FeatureStore(store).read("signal", "avg"))
    # nothing temporary is left beside the output
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_respects_split_and_class_filters(store, tmp_path, fmt):
    r = export_group(store, "noise", "avg", out=tmp_path / f"val.{fmt}", split="val", classes=["dog", "fox"])
    codes = FeatureStore(store).read("noise", "avg", split="val", classes=["dog", "fox"])
    assert len(codes) == 20 and r["rows"] == 20
    assert_same(r, codes)
    _, rows = read_export(r)
    assert set(rows["split"]) == {"val"} and set(rows["class"]) == {"dog", "fox"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_in_many_chunks_is_still_equal(store, tmp_path, fmt):
    # rows=16 over 120 rows: 8 chunks; with a filter some chunks contribute few rows
    r = export_group(store, "signal", out=tmp_path / f"all.{fmt}", rows=16)
    assert r["chunks"] == 8
    assert_same(r, FeatureStore(store).read("signal", "avg"))
    r = export_group(store, "signal", out=tmp_path / f"train.{fmt}", split=["train", "test"], classes="cat", rows=16)
    assert_same(r, FeatureStore(store).read("signal", "avg", split=["train", "test"], classes="cat"))


def test_export_npy_keeps_shape_and_dtype_and_tables_flatten(tmp_path):
    samples = [Sample(f"cat/{i}.jpg", f"{i:064x}", i % 3, "train") for i in range(10)]
    maps = np.random.default_rng(0).normal(size=(10, 2, 2, 3)).astype("f2")
    s = build_store(tmp_path / "m.h5", samples, {"conv": maps}, pooling="none", dtype="float16")
    r = export_group(s, "conv", out=tmp_path / "m.npy", rows=3)
    X = np.load(r["output"])
    assert X.dtype == np.float16 and X.shape == (10, 2, 2, 3) and np.array_equal(X, maps)
    r = export_group(s, "conv", out=tmp_path / "m.parquet", rows=3)
    X, rows = read_export(r)
    assert X.shape == (10, 12) and np.array_equal(X, maps.reshape(10, -1).astype("f4"))


def test_export_format_from_argument_and_unknown_format_is_refused(store, tmp_path):
    r = export_group(store, "signal", out=tmp_path / "codes.dat", fmt="csv")
    assert r["format"] == "csv"
    assert_same(r, FeatureStore(store).read("signal", "avg"))
    with pytest.raises(StoreError, match=r"\.parquet, \.csv, \.npy"):
        export_group(store, "signal", out=tmp_path / "codes.xlsx")
    with pytest.raises(StoreError, match="layer 'nope'"):
        export_group(store, "nope", out=tmp_path / "x.csv")
    assert not (tmp_path / "codes.xlsx").exists() and not (tmp_path / "x.csv").exists()


def test_export_of_an_empty_selection_writes_an_empty_file(store, tmp_path):
    for fmt in FORMATS:
        r = export_group(store, "signal", out=tmp_path / f"e.{fmt}", split="predict")
        X, rows = read_export(r)
        assert r["rows"] == 0 and len(rows) == 0 and X.shape[0] == 0


# --------------------------------------------------------------------------- verify


def test_verify_says_ok_on_a_good_store(store):
    r = verify_store(store)
    assert r["ok"] is True and r["problems"] == []
    assert [g["rows"] for g in r["groups"]] == [120, 120]


def _set(ds: str, row: int, value):
    def mutate(f):
        f[ds][row] = value
    return mutate


def _dup_path(f):
    f["signal/avg/path"][10] = f["signal/avg/path"][11]


def _overcommit(f):
    f["signal/avg/committed"][0] = 200


def _drop_sha(f):
    del f["noise/avg/sha256"]


def _shape_attr(f):
    f["signal/avg"].attrs["feature_shape"] = "[16]"


def _nan(f):
    f["signal/avg/features"][5, 3] = np.nan


def _inf(f):
    f["noise/avg/features"][100, 0] = np.inf


BREAKAGES = {
    "nan feature": (_nan, ["signal/avg", "NaN or infinity", "row 5"]),
    "inf feature": (_inf, ["noise/avg", "NaN or infinity", "row 100"]),
    "label out of range": (_set("signal/avg/label", 7, 3), ["outside [0, 3)", "row 7: 3"]),
    "label -1 outside predict": (_set("signal/avg/label", 8, -1), ["outside [0, 3)", "row 8: -1"]),
    "committed too large": (_overcommit, ["committed says 200", "features has 120"]),
    "missing dataset": (_drop_sha, ["noise/avg", "sha256 missing"]),
    "duplicated path": (_dup_path, ["appear more than once", "cat/11.jpg"]),
    "bad sha256": (_set("signal/avg/sha256", 4, b"xyz"), ["64 lowercase hex", "row 4"]),
    "bad split": (_set("noise/avg/split", 9, b"bogus"), ["split value", "'bogus'"]),
    "feature_shape attribute": (_shape_attr, ["feature_shape attribute says [16]"]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_verify_catches(store, breakage):
    mutate, expected = BREAKAGES[breakage]
    with h5py.File(store, "a", libver=LIBVER) as f:
        mutate(f)
    r = verify_store(store, rows=16)  # several chunks: row numbers are global, not per chunk
    assert r["ok"] is False and len(r["problems"]) == 1, r["problems"]
    for text in expected:
        assert text in r["problems"][0], r["problems"][0]


def test_info_and_export_of_a_damaged_group_say_so(store, tmp_path):
    with h5py.File(store, "a", libver=LIBVER) as f:
        _drop_sha(f)
    groups = {g["group"]: g for g in store_info(store)["groups"]}
    assert "sha256 missing" in groups["noise/avg"]["damaged"] and not groups["signal/avg"].get("damaged")
    with pytest.raises(StoreError, match="store verify"):
        export_group(store, "noise", out=tmp_path / "n.csv")
    assert export_group(store, "signal", out=tmp_path / "s.csv")["rows"] == 120


def test_verify_refuses_a_file_that_is_not_a_store(tmp_path, store):
    with h5py.File(store, "a", libver=LIBVER) as f:
        f.attrs["format"] = "something-else"
    r = verify_store(store)
    assert not r["ok"] and "not a cnncodes feature store" in r["problems"][0]
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    r = verify_store(tmp_path / "junk.h5")
    assert not r["ok"] and "cannot open" in r["problems"][0]
    r = verify_store(tmp_path / "absent.h5")
    assert not r["ok"] and "no feature store file" in r["problems"][0]


def test_verify_missing_provenance_is_a_problem(store):
    with h5py.File(store, "a", libver=LIBVER) as f:
        del f.attrs["weights"]
    r = verify_store(store)
    assert not r["ok"] and "weights" in r["problems"][0] and "provenance" in r["problems"][0]


def test_verify_rows_past_committed_are_a_note_not_a_problem(store):
    with h5py.File(store, "a", libver=LIBVER) as f:
        g = f["signal/avg"]
        for ds in ("features", "path", "sha256", "label", "split"):
            g[ds].resize(125, axis=0)
        g["features"][120:] = np.nan  # garbage in the unfinished batch is not looked at
    r = verify_store(store)
    assert r["ok"] is True and r["problems"] == []
    assert any("5 row(s) past committed=120" in n for n in r["notes"])


def test_verify_accepts_unlabelled_predict_rows(tmp_path):
    samples = [Sample(f"img/{i}.jpg", f"{i:064x}", -1, "predict") for i in range(6)]
    s = build_store(tmp_path / "p.h5", samples, {"out": np.ones((6, 4), "f4")}, classes=[])
    r = verify_store(s)
    assert r["ok"] is True, r["problems"]


def _image_store(tmp_path, n=6) -> tuple[Path, Path]:
    root = tmp_path / "data"
    samples = []
    for i in range(n):
        cls = CLASSES[i % 3]
        p = root / cls / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"fake image {i}".encode() * 10)
        samples.append(Sample(f"{cls}/{i}.jpg", file_sha256(p), i % 3, "train" if i % 2 else "val"))
    feats = np.arange(n * 4, dtype="f4").reshape(n, 4)
    return build_store(tmp_path / "img.h5", samples, {"a": feats, "b": feats * 2},
                       meta={"dataset": str(root)}), root


def test_verify_check_files_finds_deleted_and_modified_images(tmp_path):
    store, root = _image_store(tmp_path)
    r = verify_store(store, check_files=True)
    assert r["ok"] is True and r["files_checked"] == 6 and r["dataset"] == str(root)
    (root / "cat" / "0.jpg").unlink()
    (root / "dog" / "1.jpg").write_bytes(b"changed")
    r = verify_store(store, check_files=True)
    assert not r["ok"] and len(r["problems"]) == 2
    missing, changed = r["problems"]
    assert "1 of 6 image file(s)" in missing and "missing" in missing and "cat/0.jpg" in missing
    assert "1 of 6 image file(s) changed" in changed and "dog/1.jpg" in changed
    # another root given explicitly wins over the recorded one
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = verify_store(store, check_files=True, dataset=other)
    assert "6 of 6 image file(s)" in r["problems"][0] and r["dataset"] == str(other)
    # without check_files the images are not looked at
    assert verify_store(store)["ok"] is True


def test_verify_check_files_without_a_root_is_a_user_error(store):
    with pytest.raises(StoreError, match="--dataset"):
        verify_store(store, check_files=True)


# --------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnncodes.cli", "store", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def one_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0])


def test_cli_store_commands_print_one_json_object(store, tmp_path):
    p = cli("ls", str(store), "--json")
    assert p.returncode == 0, p.stderr
    assert [g["group"] for g in one_json(p)["groups"]] == ["noise/avg", "signal/avg"]

    p = cli("info", str(store), "--head", "2", "--json")
    assert p.returncode == 0, p.stderr
    assert len(one_json(p)["groups"][1]["head"]) == 2

    out = tmp_path / "dog.npy"
    p = cli("export", str(store), "--layer", "signal", "--split", "train", "--class", "dog", "--class", "2",
            "--output", str(out), "--json")
    assert p.returncode == 0, p.stderr
    r = one_json(p)
    assert r["rows"] == 40 and r["classes"] == ["dog", "fox"]
    assert_same(r, FeatureStore(store).read("signal", "avg", split="train", classes=["dog", "fox"]))

    p = cli("verify", str(store), "--json")
    assert p.returncode == 0 and one_json(p)["ok"] is True


def test_cli_verify_exits_1_on_a_broken_store_and_export_errors_exit_2(store, tmp_path):
    with h5py.File(store, "a", libver=LIBVER) as f:
        f["signal/avg/label"][0] = 99
    p = cli("verify", str(store), "--json")
    assert p.returncode == 1
    r = one_json(p)
    assert r["ok"] is False and "row 0: 99" in r["problems"][0]
    p = cli("verify", str(store))
    assert p.returncode == 1 and "problem: group signal/avg" in p.stdout

    p = cli("export", str(store), "--layer", "signal", "--output", str(tmp_path / "x.txt"), "--json")
    assert p.returncode == 2 and "Supported formats" in p.stderr
    assert "error" in one_json(p)


def test_importing_storage_tools_needs_no_tensorflow_prefect_or_sklearn():
    code = ("import sys, storage.tools, storage.verify; "
            "print([m for m in ('tensorflow', 'keras', 'prefect', 'sklearn') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
