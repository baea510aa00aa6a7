"""tasks.data.datasets: scanning folders, split folders and CSV manifests into a Manifest.

Only small generated images; nothing is decoded, no TensorFlow.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from storage.errors import CnncodesError, DatasetError, ParameterError
from storage.manifest import Manifest
from tasks.data.datasets import scan_dataset
from tasks.data.synthetic import make_dataset, make_image


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def add_images(folder: Path, n: int, prefix: str, seed: int = 0, kind: str = "rings") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{prefix}_{i:03d}.png"
        make_image(kind, (12, 14), seed * 1000 + i).save(p)
        out.append(p)
    return out


def by_class(m: Manifest) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in m.samples:
        out.setdefault(m.class_names[s.label], []).append(s)
    return out


def split_of(m: Manifest) -> dict[str, str]:
    return {s.path: s.split for s in m.samples}


def skipped(m: Manifest) -> dict[str, str]:
    return {s.path: s.reason for s in m.skipped}


def write_csv(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# -- class folders ----------------------------------------------------------------------------

def test_class_folders_labels_paths_and_hashes(texture_data):
    m = scan_dataset(texture_data, val_fraction=0.25, seed=3)
    assert m.layout == "folders"
    assert m.root == str(Path(texture_data).resolve())
    folders = sorted(p.name for p in Path(texture_data).iterdir() if p.is_dir())
    assert m.class_names == folders == sorted(m.class_names)
    assert len(m.samples) == 36 and m.skipped == []
    assert len({s.path for s in m.samples}) == 36
    for s in m.samples:
        assert not os.path.isabs(s.path) and "\\" not in s.path
        assert s.path.split("/")[0] == m.class_names[s.label]  # label indexes the class of its folder
        assert s.sha256 == sha(Path(texture_data) / s.path)
        assert Path(m.abspath(s)).is_file()


def test_nested_folders_inside_a_class_belong_to_that_class(tmp_path):
    add_images(tmp_path / "cats", 3, "c")
    add_images(tmp_path / "cats" / "indoor" / "sofa", 2, "deep")
    add_images(tmp_path / "dogs", 3, "d")
    m = scan_dataset(tmp_path, val_fraction=0.0)
    counts = {k: len(v) for k, v in by_class(m).items()}
    assert counts == {"cats": 5, "dogs": 3}
    assert "cats/indoor/sofa/deep_000.png" in split_of(m)


@pytest.mark.parametrize("val, test", [(0.3, 0.0), (0.2, 0.15), (0.0, 0.4)])
def test_stratified_split_counts_per_class(tmp_path, val, test):
    sizes = {"ants": 7, "bees": 12, "wasps": 20}
    for i, (cls, n) in enumerate(sizes.items()):
        add_images(tmp_path / cls, n, cls, seed=i)
    m = scan_dataset(tmp_path, val_fraction=val, test_fraction=test, seed=5)
    assert m.split_seed == 5
    assert m.split_fractions == {"val": val, "test": test}
    counts = m.counts()
    for cls, n in sizes.items():
        got = {sp: counts.get(sp, {}).get(cls, 0) for sp in ("train", "val", "test")}
        assert got["val"] == round(n * val), (cls, got)
        assert got["test"] == round(n * test), (cls, got)
        assert got["train"] == n - got["val"] - got["test"]


def test_a_class_always_keeps_an_image_to_train_on(tmp_path):
    add_images(tmp_path / "solo", 1, "s")
    add_images(tmp_path / "pair", 2, "p")
    add_images(tmp_path / "many", 10, "m")
    m = scan_dataset(tmp_path, val_fraction=0.5, test_fraction=0.4)
    for cls, samples in by_class(m).items():
        assert any(s.split == "train" for s in samples), cls


def test_same_seed_same_split_other_seed_other_split(texture_data):
    a = scan_dataset(texture_data, val_fraction=0.25, seed=11)
    b = scan_dataset(texture_data, val_fraction=0.25, seed=11)
    c = scan_dataset(texture_data, val_fraction=0.25, seed=12)
    assert split_of(a) == split_of(b)
    assert a.fingerprint() == b.fingerprint()
    assert split_of(a) != split_of(c)
    assert a.fingerprint() != c.fingerprint()  # the split decides the rows
    assert Counter(split_of(a).values()) == Counter(split_of(c).values())  # same sizes, other images


def test_split_and_fingerprint_do_not_depend_on_where_the_dataset_lives(texture_data, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(texture_data, moved)
    a = scan_dataset(texture_data, seed=2)
    b = scan_dataset(moved, seed=2)
    assert a.root != b.root
    assert split_of(a) == split_of(b)
    assert a.fingerprint() == b.fingerprint()


def test_growing_the_dataset_keeps_most_assignments(tmp_path):
    for i, cls in enumerate(("a", "b", "c")):
        add_images(tmp_path / cls, 20, "old", seed=i)
    before = split_of(scan_dataset(tmp_path, val_fraction=0.2, seed=4))
    for i, cls in enumerate(("a", "b", "c")):
        add_images(tmp_path / cls, 5, "new", seed=10 + i)
    after_m = scan_dataset(tmp_path, val_fraction=0.2, seed=4)
    after = split_of(after_m)
    assert len(after) == 75
    assert all(after_m.counts()["val"][c] == 5 for c in ("a", "b", "c"))  # round(25 * 0.2)
    moved = [p for p in before if after[p] != before[p]]
    # a fresh random split would move about a third of the 60 old images; this moves few
    assert len(moved) <= 9, moved


def test_files_that_cannot_be_used_are_listed_with_a_reason(tmp_path):
    add_images(tmp_path / "cats", 3, "c")
    add_images(tmp_path / "dogs", 3, "d")
    (tmp_path / "cats" / "notes.txt").write_text("not a picture")
    (tmp_path / "cats" / "README").write_text("no extension")
    add_images(tmp_path, 1, "stray")  # at the top level, outside any class folder
    (tmp_path / "empty_class").mkdir()
    m = scan_dataset(tmp_path)
    reasons = skipped(m)
    assert "not an image Pillow can identify (.txt)" in reasons["cats/notes.txt"]
    assert "no extension" in reasons["cats/README"]
    assert "class folder" in reasons["stray_000.png"] and "move it" in reasons["stray_000.png"]
    assert "empty class folder" in reasons["empty_class/"] and "left out" in reasons["empty_class/"]
    assert m.class_names == ["cats", "dogs"]  # the empty class is not a class
    assert sorted(split_of(m)) == [f"cats/c_{i:03d}.png" for i in range(3)] + [f"dogs/d_{i:03d}.png" for i in range(3)]


def test_hidden_files_and_folders_are_ignored_silently(tmp_path):
    add_images(tmp_path / "cats", 2, "c")
    add_images(tmp_path / "dogs", 2, "d")
    (tmp_path / "cats" / ".DS_Store").write_bytes(b"\0\1")
    add_images(tmp_path / "cats" / ".thumbnails", 2, "t")
    add_images(tmp_path / ".cache", 2, "x")  # a hidden top-level folder is not a class
    add_images(tmp_path / "__MACOSX" / "cats", 2, "m")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    m = scan_dataset(tmp_path)
    assert m.class_names == ["cats", "dogs"]
    assert len(m.samples) == 4
    assert m.skipped == []


def test_a_class_folder_with_only_non_images_is_left_out(tmp_path):
    add_images(tmp_path / "cats", 2, "c")
    add_images(tmp_path / "dogs", 2, "d")
    (tmp_path / "birds").mkdir()
    (tmp_path / "birds" / "todo.txt").write_text("take photos")
    m = scan_dataset(tmp_path)
    assert m.class_names == ["cats", "dogs"]
    assert {"birds/todo.txt", "birds/"} <= set(skipped(m))


def _symlink(target, link):
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):  # pragma: no cover
        pytest.skip("cannot create symbolic links here")


def test_symlink_loop_does_not_repeat_images(tmp_path):
    add_images(tmp_path / "cats", 3, "c")
    add_images(tmp_path / "dogs", 3, "d")
    _symlink("..", tmp_path / "cats" / "up")  # cats/up/cats/up/... until the OS gives up
    m = scan_dataset(tmp_path, val_fraction=0.0)
    assert {k: len(v) for k, v in by_class(m).items()} == {"cats": 3, "dogs": 3}
    assert "symbolic link" in skipped(m)["cats/up/"]


def test_symlinked_folders_are_followed_once(tmp_path):
    add_images(tmp_path / "cats", 3, "c")
    add_images(tmp_path / "elsewhere" / "more", 2, "m")
    _symlink(tmp_path / "elsewhere" / "more", tmp_path / "cats" / "linked")
    _symlink(tmp_path / "elsewhere" / "more", tmp_path / "cats" / "linked_again")
    add_images(tmp_path / "dogs", 3, "d")
    m = scan_dataset(tmp_path / "cats" / "..", val_fraction=0.0)
    counts = {k: len(v) for k, v in by_class(m).items()}
    assert counts == {"cats": 5, "dogs": 3, "elsewhere": 2}
    assert {"cats/linked/m_000.png", "cats/linked/m_001.png"} <= set(split_of(m))
    assert "cats/linked_again/" in skipped(m)


def test_progress_reports_the_hashing(texture_data):
    calls = []
    scan_dataset(texture_data, workers=2, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (36, 36)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# -- split folders ------------------------------------------------------------------------------

def test_split_folders_give_the_split(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=0, size=16, seed=0,
                        splits={"train": 4, "validation": 2, "test": 3})
    m = scan_dataset(root, val_fraction=0.5, seed=9)  # fractions and seed do not apply
    assert m.layout == "split-folders"
    assert m.split_seed is None and m.split_fractions == {}
    assert m.class_names == sorted(["stripes", "checks", "rings"])
    folder_split = {"train": "train", "validation": "val", "test": "test"}
    for s in m.samples:
        top, cls = s.path.split("/")[:2]
        assert s.split == folder_split[top]
        assert m.class_names[s.label] == cls
        assert s.sha256 == sha(root / s.path)
    assert m.counts() == {sp: {c: n for c in m.class_names}
                          for sp, n in (("train", 4), ("val", 2), ("test", 3))}


def test_split_folders_without_test_and_a_class_missing_from_val(tmp_path):
    add_images(tmp_path / "Train" / "cats", 3, "c")
    add_images(tmp_path / "Train" / "dogs", 3, "d")
    add_images(tmp_path / "val" / "cats", 2, "vc")
    (tmp_path / "val" / "dogs").mkdir()
    m = scan_dataset(tmp_path)
    assert m.layout == "split-folders"
    assert m.class_names == ["cats", "dogs"]
    assert m.counts() == {"train": {"cats": 3, "dogs": 3}, "val": {"cats": 2}}
    reason = skipped(m)["val/dogs/"]
    assert "empty" in reason and "left out" not in reason  # dogs is still a class (from train)


def test_split_folders_report_stray_files(tmp_path):
    add_images(tmp_path / "train" / "cats", 2, "c")
    add_images(tmp_path / "val" / "cats", 1, "v")
    (tmp_path / "labels.txt").write_text("cats\n")
    add_images(tmp_path / "train", 1, "loose")
    m = scan_dataset(tmp_path)
    reasons = skipped(m)
    assert "labels.txt" in reasons and "<split>/<class>/" in reasons["labels.txt"]
    assert "train/loose_000.png" in reasons and "train/<class>/" in reasons["train/loose_000.png"]
    assert len(m.samples) == 3


def test_split_folders_mixed_with_class_folders_is_an_error(tmp_path):
    add_images(tmp_path / "train" / "cats", 2, "c")
    add_images(tmp_path / "cats", 2, "c")
    with pytest.raises(DatasetError, match=r"mixes split folders.*\['cats'\]"):
        scan_dataset(tmp_path)


# -- CSV manifests --------------------------------------------------------------------------------

@pytest.fixture
def pool(tmp_path) -> Path:
    """Images to list in CSV files: pool/img_000.png ... pool/img_011.png."""
    add_images(tmp_path / "pool", 12, "img")
    return tmp_path / "pool"


def test_csv_paths_relative_to_the_csv_and_sorted_labels(tmp_path, pool):
    labels = ["zebra", "apple", "mango"]
    rows = ["path,label"] + [f"../pool/img_{i:03d}.png,{labels[i % 3]}" for i in range(12)]
    csv_path = write_csv(tmp_path / "lists" / "all.csv", rows)
    m = scan_dataset(csv_path, val_fraction=0.25, seed=1)
    assert m.layout == "csv"
    assert m.root == str((tmp_path / "lists").resolve())
    assert m.class_names == ["apple", "mango", "zebra"]
    for s in m.samples:
        i = int(s.path[-7:-4])
        assert m.class_names[s.label] == labels[i % 3]
        assert Path(m.abspath(s)).resolve() == (pool / f"img_{i:03d}.png").resolve()
        assert s.sha256 == sha(pool / f"img_{i:03d}.png")
    # no split column: a stratified split, 4 per class -> round(4 * 0.25) = 1 in val each
    assert m.split_seed == 1
    assert m.counts()["val"] == {"apple": 1, "mango": 1, "zebra": 1}


def test_csv_absolute_paths_bom_and_spaced_header(tmp_path, pool):
    rows = [" Path , LABEL "] + [f"{(pool / f'img_{i:03d}.png').resolve()}, c{i % 2} " for i in range(4)]
    csv_path = tmp_path / "abs.csv"
    csv_path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    m = scan_dataset(csv_path, val_fraction=0.0)
    assert m.class_names == ["c0", "c1"]
    assert len(m.samples) == 4
    for s in m.samples:
        assert os.path.isabs(s.path) and m.abspath(s) == s.path
        assert s.sha256 == sha(s.path)


def test_csv_split_column_is_honoured_and_aliases_normalised(tmp_path, pool):
    given = ["train", "Training", "TRAIN", "val", "validation", "Valid", "test", "testing", "train",
             "train", "val", "test"]
    rows = ["path,label,split"] + [f"pool/img_{i:03d}.png,c{i % 2},{sp}" for i, sp in enumerate(given)]
    m = scan_dataset(write_csv(tmp_path / "s.csv", rows), val_fraction=0.5, seed=3)
    assert m.split_seed is None and m.split_fractions == {}
    expect = {"train": "train", "training": "train", "val": "val", "validation": "val", "valid": "val",
              "test": "test", "testing": "test"}
    assert split_of(m) == {f"pool/img_{i:03d}.png": expect[sp.lower()] for i, sp in enumerate(given)}


def test_csv_unknown_split_names_the_line(tmp_path, pool):
    rows = ["path,label,split", "pool/img_000.png,a,train", "pool/img_001.png,a,holdout"]
    with pytest.raises(DatasetError, match=r"s\.csv:3: unknown split 'holdout'; use one of train, val, test"):
        scan_dataset(write_csv(tmp_path / "s.csv", rows))


def test_csv_split_filled_on_some_rows_only(tmp_path, pool):
    rows = ["path,label,split", "pool/img_000.png,a,train", "pool/img_001.png,a,"]
    with pytest.raises(DatasetError, match="filled on some rows"):
        scan_dataset(write_csv(tmp_path / "s.csv", rows))


def test_csv_without_label_column(tmp_path, pool):
    with pytest.raises(DatasetError, match="path,label"):
        scan_dataset(write_csv(tmp_path / "s.csv", ["path,class", "pool/img_000.png,a"]))


def test_csv_row_without_label(tmp_path, pool):
    rows = ["path,label", "pool/img_000.png,a", "pool/img_001.png,"]
    with pytest.raises(DatasetError, match=r":3: empty path or label"):
        scan_dataset(write_csv(tmp_path / "s.csv", rows))


def test_csv_duplicates_missing_files_and_non_images_are_skipped(tmp_path, pool):
    rows = ["path,label",
            "pool/img_000.png,a", "pool/img_001.png,b", "pool/img_002.png,a",
            "pool/img_000.png,b",  # again, other label: the first one wins
            "./pool/img_001.png,b",  # the same file written differently
            "pool/gone.png,a",
            "pool/readme.txt,b"]
    (pool / "readme.txt").write_text("notes, not a picture")  # judged by its content: not an image
    m = scan_dataset(write_csv(tmp_path / "s.csv", rows), val_fraction=0.0)
    assert sorted(split_of(m)) == ["pool/img_000.png", "pool/img_001.png", "pool/img_002.png"]
    labels = {s.path: m.class_names[s.label] for s in m.samples}
    assert labels["pool/img_000.png"] == "a"
    reasons = [(s.path, s.reason) for s in m.skipped]
    assert sum("listed twice" in r for _, r in reasons) == 2
    assert any(p == "pool/img_000.png" and "line 5" in r for p, r in reasons)
    assert ("pool/gone.png", "file not found") in reasons
    assert any(p == "pool/readme.txt" and "not an image Pillow can identify (.txt)" in r for p, r in reasons)


def test_csv_where_no_file_exists(tmp_path):
    rows = ["path,label", "a.png,x", "b.png,y"]
    with pytest.raises(DatasetError, match="could be read.*file not found"):
        scan_dataset(write_csv(tmp_path / "s.csv", rows))


def test_csv_with_a_header_only(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        scan_dataset(write_csv(tmp_path / "s.csv", ["path,label"]))


def test_csv_not_in_utf8_is_a_dataset_error(tmp_path, pool):
    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes("path,label\npool/img_000.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8.*Save it as UTF-8"):
        scan_dataset(csv_path)


# -- fingerprint and manifest file ---------------------------------------------------------------------

def test_fingerprint_follows_the_bytes(texture_data):
    a = scan_dataset(texture_data, seed=0)
    b = scan_dataset(texture_data, seed=0)
    assert a.fingerprint() == b.fingerprint()
    target = Path(texture_data) / a.samples[5].path
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    c = scan_dataset(texture_data, seed=0)
    assert c.fingerprint() != a.fingerprint()
    changed = [(x.path, x.sha256, y.sha256) for x, y in zip(a.samples, c.samples) if x != y]
    assert changed == [(a.samples[5].path, a.samples[5].sha256, sha(target))]


def test_manifest_save_load_round_trip(texture_data, tmp_path):
    (Path(texture_data) / "stripes" / "notes.txt").write_text("x")
    m = scan_dataset(texture_data, val_fraction=0.25, test_fraction=0.1, seed=8)
    assert m.skipped
    path = m.save(tmp_path / "out" / "manifest.json")
    loaded = Manifest.load(path)
    assert loaded == m
    assert loaded.fingerprint() == m.fingerprint()
    d = m.to_dict()
    assert d["fingerprint"] == m.fingerprint()
    assert len(d["fingerprint"]) == 64
    assert Manifest.from_dict(d) == m


def test_loading_a_damaged_manifest_says_to_rescan(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text('{"root": "/x", "layout": ')
    with pytest.raises(DatasetError, match="Re-run the scan"):
        Manifest.load(bad)


# -- errors ------------------------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*Give a folder"):
        scan_dataset(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        scan_dataset(tmp_path)


def test_images_without_class_folders(tmp_path):
    add_images(tmp_path, 3, "loose")
    with pytest.raises(DatasetError, match=r"no class sub-folders.*<class>/<image>"):
        scan_dataset(tmp_path)


def test_only_empty_class_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("")
    with pytest.raises(DatasetError, match="no images found.*supported types"):
        scan_dataset(tmp_path)


def test_a_file_that_is_not_a_csv(tmp_path):
    f = tmp_path / "data.json"
    f.write_text("{}")
    with pytest.raises(DatasetError, match=r"not a \.csv manifest.*path,label"):
        scan_dataset(f)


@pytest.mark.parametrize("val, test, match", [
    (0.6, 0.4, "must be below 1"),
    (0.5, 0.5, "must be below 1"),
    (0.99, 0.02, "must be below 1"),
    (-0.1, 0.0, r"val_fraction must be a number in \[0, 1\)"),
    (0.2, -0.01, r"test_fraction must be a number in \[0, 1\)"),
    (1.0, 0.0, "val_fraction"),
    (float("nan"), 0.0, "val_fraction"),
    ("0.2", 0.0, "val_fraction"),
])
def test_bad_fractions_are_parameter_errors(texture_data, val, test, match):
    with pytest.raises(ParameterError, match=match) as info:
        scan_dataset(texture_data, val_fraction=val, test_fraction=test)
    assert isinstance(info.value, CnncodesError)


def test_bad_fractions_are_refused_before_looking_at_the_data(tmp_path):
    with pytest.raises(ParameterError):
        scan_dataset(tmp_path / "does-not-exist", val_fraction=0.7, test_fraction=0.3)


# -- the test split: held out by default, carved from val, pinned per lineage --------------------
def test_unsplit_data_holds_out_a_stratified_test_split_by_default(tmp_path):
    make_dataset(tmp_path, per_class=20, size=(12, 14), seed=2)
    m = scan_dataset(tmp_path)
    assert m.split_fractions == {"val": 0.2, "test": 0.15} and m.split_seed == 0
    assert all(c["test"] == 3 and c["val"] == 4 and c["train"] == 13
               for c in [{sp: n[cls] for sp, n in m.counts().items()} for cls in m.class_names])


def test_split_folders_without_test_get_a_test_split_from_val_first(tmp_path):
    for k, (split, n, cls) in enumerate([("train", 20, "a"), ("train", 20, "b"), ("val", 6, "a"), ("val", 6, "b")]):
        add_images(tmp_path / split / cls, n, f"{split}{cls}", seed=10 + k)
    add_images(tmp_path / "train" / "c", 10, "tc", seed=77)            # class c has no val images
    m = scan_dataset(tmp_path, test_fraction=0.2, seed=4)
    counts = m.counts()
    # a, b: 26 images -> 5 to test, from val (6) keeping 1 there; c: 2 to test from train
    assert counts["test"] == {"a": 5, "b": 5, "c": 2}
    assert counts["val"] == {"a": 1, "b": 1} and counts["train"] == {"a": 20, "b": 20, "c": 8}
    assert m.split_fractions == {"test": 0.2} and m.split_seed == 4
    # deterministic, and another seed draws other images
    assert scan_dataset(tmp_path, test_fraction=0.2, seed=4).fingerprint() == m.fingerprint()
    assert scan_dataset(tmp_path, test_fraction=0.2, seed=5).fingerprint() != m.fingerprint()
    # a given test split is used as it is; fraction 0 keeps the folders and warns
    assert "test" not in scan_dataset(tmp_path, test_fraction=0).counts()


def test_no_test_split_is_a_loud_warning(tmp_path, caplog):
    make_dataset(tmp_path, per_class=6, size=(12, 14), seed=2)
    with caplog.at_level("WARNING", logger="cnncodes"):
        m = scan_dataset(tmp_path, test_fraction=0)
    assert "test" not in m.counts() and "optimistic" in caplog.text


def test_identical_files_never_sit_on_both_sides(tmp_path):
    make_dataset(tmp_path, per_class=30, size=(12, 14), seed=2)
    for cls in ("stripes", "checks"):                # every image of these classes twice, under two names
        for f in sorted((tmp_path / cls).iterdir()):
            shutil.copy(f, f.with_name("copy_" + f.name))
    m = scan_dataset(tmp_path, seed=1)
    sides: dict[str, set] = {}
    for s in m.samples:
        sides.setdefault(s.sha256, set()).add(s.split)
    assert all(len(v) == 1 for v in sides.values())
    assert {sp for v in sides.values() for sp in v} == {"train", "val", "test"}


def test_pinned_images_keep_their_split_and_only_new_ones_are_drawn(tmp_path):
    make_dataset(tmp_path, per_class=20, size=(12, 14), seed=2)
    first = scan_dataset(tmp_path, seed=0)
    pinned = {s.sha256: s.split for s in first.samples}
    for i in range(40):                              # the data grows a lot: 40 new images per class
        for cls in ("stripes", "checks", "rings"):
            make_image(cls, (12, 14), 5000 + i + 100 * len(cls)).save(tmp_path / cls / f"new_{i}.png")
    unpinned = scan_dataset(tmp_path, seed=0)
    grown = scan_dataset(tmp_path, seed=0, pinned=pinned)
    assert all(s.split == pinned[s.sha256] for s in grown.samples if s.sha256 in pinned)
    moved = [s for s in unpinned.samples if s.sha256 in pinned and s.split != pinned[s.sha256]]
    assert moved  # without pinning, growth moves some of the first images (test ones into train, too)
    new = [s for s in grown.samples if s.sha256 not in pinned]
    assert Counter(s.split for s in new) == {"train": 3 * 26, "val": 3 * 8, "test": 3 * 6}
    # the same through a file, in the registry's format or as a plain map
    from tasks.data.datasets import load_pinned

    (tmp_path / "p.json").write_text(__import__("json").dumps({"samples": pinned}))
    assert load_pinned(tmp_path / "p.json") == pinned
    (tmp_path / "bad.json").write_text('{"x": "holdout"}')
    with pytest.raises(DatasetError, match="content hashes to splits"):
        load_pinned(tmp_path / "bad.json")
