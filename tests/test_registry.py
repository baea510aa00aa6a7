"""The model registry: versions, aliases, metadata, integrity checks before unpickling, compatibility."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import joblib
import numpy as np
import pytest

from storage.errors import CnncodesError
from storage.hashing import file_sha256
from storage.registry import (ModelMismatchError, ModelRecord, ModelRegistry, RegistryError,
                              TamperedModelError)

ROOT = Path(__file__).resolve().parents[1]
META = {"class_names": ["cat", "dog", "fox"], "feature_dim": 8, "backbone": "mobilenet_v2",
        "layer": "out_relu", "pooling": "avg", "weights_digest": "ab" * 32, "preprocessing": "mobilenet_v2",
        "input_size": 96}


def _pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype("f4")
    y = rng.integers(0, 3, size=60)
    x[np.arange(60), y] += 2.0
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(x, y), x


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def reg(tmp_path):
    return ModelRegistry(tmp_path / "models")


def test_sklearn_round_trip_predictions_and_metadata(reg):
    import sklearn

    model, x = _pipeline()
    rec = reg.save("probe", model, dict(META, feature_dim=np.int64(8), input_size=(96, 96)))
    assert rec.version == 1 and rec.path == reg.root / "probe" / "v1"
    assert rec.model_path == rec.path / "model.joblib"
    meta = json.loads((rec.path / "metadata.json").read_text())
    assert meta["name"] == "probe" and meta["version"] == 1 and meta["model_kind"] == "joblib"
    assert meta["model_file"] == "model.joblib"
    assert meta["model_sha256"] == file_sha256(rec.model_path)
    assert meta["created"].endswith("+00:00")
    assert meta["feature_dim"] == 8 and meta["input_size"] == [96, 96]
    assert meta["libraries"]["sklearn"] == sklearn.__version__
    assert {"python", "numpy", "joblib"} <= set(meta["libraries"])
    loaded, rec2 = reg.load("probe", expect={"class_names": META["class_names"], "feature_dim": 8})
    assert rec2.version == 1 and rec2.metadata == meta
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    np.testing.assert_allclose(loaded.predict_proba(x), model.predict_proba(x))


def test_versions_increment_latest_names_and_record(reg):
    assert reg.names() == [] and reg.versions("a") == []
    for i in range(1, 4):
        assert reg.save("a", {"i": i}).version == i
    reg.save("b", [1])
    assert reg.versions("a") == [1, 2, 3] and reg.latest("a") == 3
    assert reg.names() == ["a", "b"]
    assert reg.record("a").version == 3
    assert reg.record("a", "v2").version == 2 and reg.record("a", "2").version == 2
    assert reg.load("a", 1)[0] == {"i": 1}
    with pytest.raises(RegistryError, match=r"no version 7 \(versions: v1, v2, v3\)"):
        reg.record("a", 7)
    with pytest.raises(RegistryError, match=r"no saved model named 'c'.*models there: a, b"):
        reg.latest("c")
    with pytest.raises(RegistryError, match=r"no alias 'best'"):
        reg.record("a", "best")


def test_invalid_names_and_arguments(reg, tmp_path):
    for bad in ("", "../x", ".hidden", "a/b", "x" * 101, "sp ace"):
        with pytest.raises(RegistryError, match="letters, digits"):
            reg.save(bad, {})
    with pytest.raises(RegistryError, match="exactly one"):
        reg.save("a")
    with pytest.raises(RegistryError, match="exactly one"):
        reg.save("a", {}, file=__file__)
    with pytest.raises(RegistryError, match="written by the registry"):
        reg.save("a", {}, {"version": 9})
    with pytest.raises(RegistryError, match="not JSON serialisable.*'bad'"):
        reg.save("a", {}, {"bad": object()})
    assert issubclass(TamperedModelError, RegistryError) and issubclass(ModelMismatchError, RegistryError)
    assert issubclass(RegistryError, CnncodesError)
    assert reg.versions("a") == []  # nothing was left behind by the refused saves
    assert not (reg.root / "a").exists()  # arguments are checked before anything is created


def test_failed_pickling_leaves_no_version(reg):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("no pickling")

    reg.save("a", 1)
    with pytest.raises(RegistryError, match="Nothing was saved"):
        reg.save("a", Unpicklable())
    assert reg.versions("a") == [1]
    assert not [p.name for p in (reg.root / "a").iterdir() if p.name.startswith(".v")]


def test_aliases_and_delete(reg):
    for i in range(3):
        reg.save("a", i)
    assert reg.aliases("a") == {}
    reg.set_alias("a", "champion", 2)
    reg.set_alias("a", "candidate", 3)
    assert reg.aliases("a") == {"candidate": 3, "champion": 2}
    assert reg.load("a", "champion")[0] == 1
    reg.set_alias("a", "champion", 3)
    assert reg.record("a", "champion").version == 3
    with pytest.raises(RegistryError, match="no version 9"):
        reg.set_alias("a", "champion", 9)
    with pytest.raises(RegistryError, match="reads as a version"):
        reg.set_alias("a", "v2", 1)
    with pytest.raises(RegistryError, match=r"cannot delete .*v3.*\['candidate', 'champion'\]"):
        reg.delete("a", 3)
    assert reg.versions("a") == [1, 2, 3]
    reg.delete("a", 2)
    assert reg.versions("a") == [1, 3]
    reg.remove_alias("a", "candidate")
    reg.set_alias("a", "champion", 1)
    reg.delete("a", 3)
    assert reg.versions("a") == [1]
    assert reg.save("a", 9).version == 4  # numbers of deleted versions are not reused
    (reg.root / "a" / "aliases.json").write_text("{not json")
    with pytest.raises(RegistryError, match="aliases.json is not valid JSON"):
        reg.aliases("a")


def test_tampered_file_is_refused_and_never_unpickled(reg, tmp_path):
    # The payload works: loading it directly does create the marker.
    probe = tmp_path / "probe.joblib"
    joblib.dump(_Payload(str(tmp_path / "proof")), probe)
    joblib.load(probe).close()
    assert (tmp_path / "proof").exists()

    model, _ = _pipeline()
    rec = reg.save("probe", model, META)
    marker = tmp_path / "pwned"
    joblib.dump(_Payload(str(marker)), rec.model_path)
    with pytest.raises(TamperedModelError, match=r"not the one that was saved.*sha256"):
        reg.load("probe")
    assert not marker.exists()
    # A plain pickle (joblib.load accepts those too) is refused the same way.
    rec.model_path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(TamperedModelError):
        reg.load("probe", expect={"feature_dim": 8})
    assert not marker.exists()


def test_registry_format_1_is_refused_with_what_to_do(reg):
    """Format 1 (metadata without its own checksum) never shipped: it is refused, saying how to write it anew."""
    rec = reg.save("old", {"x": 1})
    meta_path = rec.path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("metadata_sha256")
    meta["registry_format"] = "cnncodes-registry/1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TamperedModelError, match="registry format 1.*save the model again"):
        reg.load("old")


def test_appended_byte_missing_file_and_bad_metadata(reg):
    rec = reg.save("a", {"x": 1})
    good = rec.model_path.read_bytes()
    with open(rec.model_path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(TamperedModelError, match="not the one that was saved"):
        reg.load("a")
    rec.model_path.write_bytes(good)
    assert reg.load("a")[0] == {"x": 1}
    rec.model_path.unlink()
    with pytest.raises(TamperedModelError, match="model file of 'a' v1 is missing"):
        reg.load("a")
    rec.model_path.write_bytes(good)
    meta_path = rec.path / "metadata.json"
    meta = meta_path.read_text()
    meta_path.write_text(meta[:-5])
    with pytest.raises(TamperedModelError, match="metadata.json is not valid JSON"):
        reg.load("a")
    # metadata pointing the model file outside the version directory is refused
    meta_path.write_text(meta.replace('"model.joblib"', '"../../x.joblib"'))
    with pytest.raises(TamperedModelError, match="not a file name inside the version directory"):
        reg.load("a")
    meta_path.unlink()
    with pytest.raises(TamperedModelError, match="has no metadata.json"):
        reg.record("a")


def test_check_compatible_names_each_differing_field(reg):
    rec = reg.save("probe", {"w": 1}, META)
    rec.check_compatible(**{**META, "input_size": 96})  # identical: no error
    rec.check_compatible(backbone="mobilenet_v2", layer=None)  # None is not checked
    with pytest.raises(ModelMismatchError) as info:
        reg.load("probe", expect={"class_names": ["cat", "dog", "owl"], "feature_dim": 1280,
                                  "backbone": "resnet50", "layer": "out_relu"})
    msg = str(info.value)
    assert "class_names: model has ['cat', 'dog', 'fox'], given ['cat', 'dog', 'owl']" in msg
    assert "not given: ['fox']" in msg and "unknown to the model: ['owl']" in msg
    assert "feature_dim: model has 8, given 1280" in msg
    assert "backbone: model has 'mobilenet_v2', given 'resnet50'" in msg
    assert "layer:" not in msg  # equal fields are not reported
    assert "re-extract" in msg and "train a new model" in msg
    with pytest.raises(ModelMismatchError, match="another order"):
        rec.check_compatible(class_names=["dog", "cat", "fox"])
    # keys absent from the metadata are skipped
    bare = reg.save("bare", {"w": 1})
    bare.check_compatible(feature_dim=3, backbone="x")
    with pytest.raises(RegistryError, match="expect takes"):
        reg.load("probe", expect={"colour": "red"})


def test_file_save_returns_verified_path(reg, tmp_path):
    src = tmp_path / "net.keras"
    src.write_bytes(b"PK\x03\x04 not really a keras file" + bytes(range(256)))
    rec = reg.save("net", file=src, metadata={"backbone": "mobilenet_v2"})
    assert rec.metadata["model_kind"] == "keras" and rec.metadata["model_file"] == "net.keras"
    assert rec.metadata["model_sha256"] == file_sha256(src)
    path, rec2 = reg.load("net", expect={"backbone": "mobilenet_v2"})
    assert isinstance(path, Path) and path == rec.path / "net.keras"
    assert path.read_bytes() == src.read_bytes()
    src.write_bytes(b"changed")  # the registry holds a copy
    assert reg.load("net")[0].read_bytes() != b"changed"
    with open(path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(TamperedModelError):
        reg.load("net")
    with pytest.raises(RegistryError, match="not an existing file"):
        reg.save("net", file=tmp_path / "absent.keras")


def test_incomplete_leftover_is_ignored(reg):
    reg.save("a", 1)
    left = reg.root / "a" / ".v2.incomplete"
    left.mkdir()
    (left / "model.joblib").write_bytes(b"half")
    assert reg.versions("a") == [1] and reg.latest("a") == 1
    with pytest.raises(RegistryError, match="no version 2"):
        reg.record("a", 2)
    (reg.root / ".junk.incomplete").mkdir()
    assert reg.names() == ["a"]
    assert reg.save("a", 3).version == 3
    assert left.is_dir() and reg.versions("a") == [1, 3]


def test_concurrent_saves_get_distinct_versions(reg):
    barrier = threading.Barrier(2)
    got: list[int] = []
    errors: list[BaseException] = []

    def work(k):
        try:
            barrier.wait()
            for i in range(6):
                got.append(reg.save("a", {"thread": k, "i": i}).version)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(got) == list(range(1, 13))
    assert reg.versions("a") == list(range(1, 13))
    seen = {(reg.load("a", v)[0]["thread"], reg.load("a", v)[0]["i"]) for v in got}
    assert len(seen) == 12


def test_record_dataclass_fields(reg):
    rec = reg.save("a", 1, {"note": "x"})
    assert isinstance(rec, ModelRecord)
    assert (rec.name, rec.version, rec.metadata["note"]) == ("a", 1, "x")
    assert reg.record("a", 1).metadata == rec.metadata


def test_import_does_not_pull_heavy_libraries():
    code = ("import sys, storage.registry; "
            "print([m for m in ('tensorflow', 'keras', 'prefect', 'sklearn') if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pinned_splits_keep_the_first_split_of_each_image(tmp_path):
    from storage import ModelRegistry
    from storage.registry import RegistryError

    reg = ModelRegistry(tmp_path)
    assert reg.splits("m") == {}
    reg.save("m", {"w": 1})
    assert reg.pin_splits("m", {"a": "train", "b": "test"}, {"val": 0.2, "test": 0.15}, 3) == {"train": 1, "test": 1}
    counts = reg.pin_splits("m", {"a": "test", "b": "train", "c": "val"}, {"val": 0.5}, 9)
    assert counts == {"train": 1, "test": 1, "val": 1}
    data = reg.splits("m")
    assert data["samples"] == {"a": "train", "b": "test", "c": "val"}
    assert data["fractions"] == {"val": 0.2, "test": 0.15} and data["seed"] == 3
    with pytest.raises(RegistryError, match="unknown splits"):
        reg.pin_splits("m", {"d": "holdout"})
    reg.splits_path("m").write_text("{not json")
    with pytest.raises(RegistryError, match="Restore it"):
        reg.splits("m")
