"""Verifying feature stores: the checks behind ``cnncodes store verify``.

:func:`verify_store` opens a store (each shard of a sharded one) and checks, group by group, in phases:

1. structure: the row datasets and ``committed`` exist, the group's attributes are there, ``committed``
   is one readable, non-negative integer (otherwise the group's rows cannot be read: its checks stop);
2. lengths and state: every row dataset holds the committed rows (rows past them are an unfinished batch,
   a note), the completion state reads, and which datasets carry no checksum (stores written before them);
3. features: their shape and dtype agree with the group's attributes, and are floating point;
4. rows: every chunk of every row dataset is read, so HDF5 checks each chunk's Fletcher-32; damaged rows
   are listed, and the others' values are checked (labels, splits, hashes, paths, finite features);
5. duplicates: a path that appears in more than one row.

Each problem says what is wrong and what to do; notes are harmless findings. With ``check_files=True`` the
images are re-hashed too. Datasets a group holds beyond these (such as the ``sums`` of groups written by
earlier versions) are not read. Like the rest of ``storage``, this needs only NumPy and h5py.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .errors import StoreDamagedError, StoreError
from .format import (ROW_DATASETS, SKIPPED, STORE_FORMAT, UPDATED, damaged_rows, decode, decode_texts,
                     group_fingerprint, group_name, is_index, iter_groups, open_file, read_index, read_rows, row_bytes,
                     rows_per_block, rows_text)
from .format import checked as has_checksum
from .hashing import file_sha256

SPLIT_VALUES = ("train", "val", "test", "predict")
# Root attributes every store written by `cnncodes extract` has.
REQUIRED_ATTRS = ("format", "backbone", "backbone_args", "weights", "weights_digest", "input_size",
                  "preprocessing", "precision", "class_names", "created")
REQUIRED_GROUP_ATTRS = ("layer", "pooling", "feature_shape", "dtype")
REBUILD = ("Rebuild the group: delete the store (or extract into a new --store) and run "
           "`cnncodes extract` again")
_REBUILD_AFTER = REBUILD[0].lower() + REBUILD[1:]  # the same, after a semicolon
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_FIRST = 5  # offending rows / files named per problem


def _first(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in list(items)[:_FIRST])
    return shown + (", ..." if len(items) > _FIRST else "")


def _damage_problem(path: Path, name: str, ds: str, ranges: list[tuple[int, int]]) -> str:
    return (f"group {name}: dataset {ds}: {rows_text(ranges)} damaged (the checksum of their chunk does not match: "
            f"the bytes on disk are not those written). Readers refuse these rows. Run `cnncodes store repair "
            f"{path}` to drop them; the next `cnncodes extract` of the same data recomputes them.")


# --------------------------------------------------------------------------- one group


def _check_group(name: str, g: h5py.Group, names: list[str], step_rows: int, problems: list[str],
                 notes: list[str], path: Path | None = None,
                 damaged: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Checks of one group, adding to ``problems`` and ``notes`` (and each damaged row range to
    ``damaged``); returns its row counts, or None when the group is too damaged for its rows to be read.
    Every chunk of every row dataset is read, so each checksum is checked."""
    damaged = [] if damaged is None else damaged
    n = _check_structure(name, g, problems, path, damaged)
    if n is None:
        return None
    lengths, unchecked = _check_lengths_and_state(name, g, n, problems, notes, path, damaged)
    if not _check_feature_layout(name, g, problems):
        return None
    m = min([n, *lengths.values()])  # rows that can be checked
    step = rows_per_block(step_rows, row_bytes(g["features"]))
    scan = _scan_rows(g, m, step, names)
    _report_damage(name, path, scan.bad_rows, problems, damaged)
    _report_values(name, len(names), scan, problems)
    _report_duplicate_paths(name, g, m, step, scan, problems)
    return {"group": name, "rows": n, "checked_rows": m, "checksums": not unchecked}


def _check_structure(name: str, g: h5py.Group, problems: list[str], path: Path | None,
                     damaged: list[dict[str, Any]]) -> int | None:
    """Phase 1: the datasets and attributes a group needs, and its committed row count (returned); None
    when that count cannot be had, so the rows cannot be read."""
    missing = [ds for ds in (*ROW_DATASETS, "committed") if not isinstance(g.get(ds), h5py.Dataset)]
    if missing:
        problems.append(f"group {name}: dataset(s) {', '.join(missing)} missing (a group needs "
                        f"{', '.join((*ROW_DATASETS, 'committed'))}). {REBUILD}.")
        return None
    missing_attrs = [a for a in REQUIRED_GROUP_ATTRS if a not in g.attrs]
    if missing_attrs:
        problems.append(f"group {name}: attribute(s) {', '.join(missing_attrs)} missing; readers cannot "
                        f"interpret it. {REBUILD}.")
    committed_ds = g["committed"]
    if committed_ds.shape != (1,) or committed_ds.dtype.kind not in "iu":
        problems.append(f"group {name}: 'committed' should be one integer, it is {committed_ds.dtype} of shape "
                        f"{committed_ds.shape}. {REBUILD}.")
        return None
    try:
        n = int(read_rows(committed_ds, 0, 1)[0])
    except StoreDamagedError:
        damaged.append({"group": name, "dataset": "committed", "rows": None})
        problems.append(f"group {name}: dataset committed is damaged (checksum mismatch), so how many rows are "
                        f"complete is unknown. Run `cnncodes store repair {path}` (it drops the group) and "
                        "`cnncodes extract` again.")
        return None
    if n < 0:
        problems.append(f"group {name}: committed row count is negative ({n}). {REBUILD}.")
        return None
    return n


def _check_lengths_and_state(name: str, g: h5py.Group, n: int, problems: list[str], notes: list[str],
                             path: Path | None, damaged: list[dict[str, Any]]) -> tuple[dict[str, int], list[str]]:
    """Phase 2: each row dataset's length against ``n`` committed rows, the completion state, and the
    datasets without checksums. Returns the lengths and those datasets."""
    lengths = {ds: int(g[ds].shape[0]) if g[ds].shape else 0 for ds in ROW_DATASETS}
    short = {ds: k for ds, k in lengths.items() if k < n}
    if short:
        problems.append(f"group {name}: committed says {n} rows but "
                        + ", ".join(f"{ds} has {k}" for ds, k in short.items())
                        + f": rows the counter vouches for are missing. {REBUILD}.")
    longer = {ds: k - n for ds, k in lengths.items() if k > n}
    if longer:
        notes.append(f"group {name}: {max(longer.values())} row(s) past committed={n} (an unfinished batch); "
                     "readers ignore them and the next `cnncodes extract` on this store drops them.")
    try:
        fingerprint = group_fingerprint(g)
    except StoreDamagedError:
        damaged.append({"group": name, "dataset": "state", "rows": [[0, 1]]})
        problems.append(f"group {name}: dataset state is damaged (checksum mismatch). Run `cnncodes store repair "
                        f"{path}` and then the same `cnncodes extract` again.")
        fingerprint = "?"
    unchecked = [ds for ds in (*ROW_DATASETS, "committed") if not has_checksum(g[ds])]
    if unchecked:
        notes.append(f"group {name}: unchecked: dataset(s) {', '.join(unchecked)} carry no checksums (written "
                     "before cnncodes added them), so damage to their bytes cannot be detected. Extract into a new "
                     "--store to get a checksummed copy.")
    if not fingerprint:
        notes.append(f"group {name}: the extraction that wrote it did not complete; run the same "
                     "`cnncodes extract` again to finish it.")
    return lengths, unchecked


def _check_feature_layout(name: str, g: h5py.Group, problems: list[str]) -> bool:
    """Phase 3: the features' shape and dtype against the group's attributes; False when they are not
    floating point (their values cannot be checked)."""
    feats = g["features"]
    shape_attr = decode(g.attrs.get("feature_shape"))
    dtype_attr = decode(g.attrs.get("dtype"))
    if "feature_shape" in g.attrs and (not isinstance(shape_attr, list)
                                       or tuple(feats.shape[1:]) != tuple(shape_attr)):
        problems.append(f"group {name}: features have shape {tuple(feats.shape[1:])} per row but the group's "
                        f"feature_shape attribute says {shape_attr}. {REBUILD}.")
    if "dtype" in g.attrs and str(feats.dtype) != str(dtype_attr):
        problems.append(f"group {name}: features are stored as {feats.dtype} but the group's dtype attribute "
                        f"says {dtype_attr}. {REBUILD}.")
    if feats.dtype.kind != "f":
        problems.append(f"group {name}: features are {feats.dtype}, not floating point. {REBUILD}.")
        return False
    return True


@dataclass
class _Scan:
    """What reading a group's rows found: per kind of bad value (``labels``, ``splits``, ``sha``, ``empty``,
    ``nonfinite``) how many rows and the first few described; the damaged row ranges of each dataset; a hash
    of every readable path (duplicates are looked for afterwards)."""

    counts: Counter = field(default_factory=Counter)
    shown: dict[str, list[str]] = field(default_factory=dict)
    bad_rows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    path_hashes: list[np.ndarray] = field(default_factory=list)

    def flag(self, kind: str, bad: np.ndarray, described: list[str]) -> None:
        """Rows ``bad`` (a mask over a block) are bad values of ``kind``; ``described`` names them."""
        self.counts[kind] += int(bad.sum())
        self.shown.setdefault(kind, []).extend(described[:_FIRST])


def _scan_rows(g: h5py.Group, m: int, step: int, names: list[str]) -> _Scan:
    """Phase 4: rows ``[0, m)`` of every row dataset read ``step`` at a time (each chunk's checksum checked);
    the values of blocks whose datasets all read are checked, damaged rows are only recorded."""
    scan = _Scan()
    for start in range(0, m, step):
        stop = min(m, start + step)
        block: dict[str, np.ndarray] = {}
        for ds in ROW_DATASETS:
            try:
                block[ds] = read_rows(g[ds], start, stop)
            except StoreDamagedError as exc:
                scan.bad_rows.setdefault(ds, []).extend(exc.rows)
        if len(block) < len(ROW_DATASETS):
            continue  # the contents of damaged rows are not checked: they are reported as damaged
        _check_block(block, np.arange(start, stop), names, scan)
    return scan


def _check_block(block: dict[str, np.ndarray], idx: np.ndarray, names: list[str], scan: _Scan) -> None:
    """The values of one block of rows (numbered ``idx``), into ``scan``."""
    labels = block["label"].astype(np.int64)
    splits = decode_texts(block["split"]).astype(str)
    ok_split = np.isin(splits, np.array(SPLIT_VALUES))
    if not ok_split.all():
        scan.flag("splits", ~ok_split, [f"row {i}: {s!r}" for i, s in zip(idx[~ok_split], splits[~ok_split])])
    ok_label = ((labels >= 0) & (labels < len(names))) | ((labels == -1) & (splits == "predict"))
    if not ok_label.all():
        scan.flag("labels", ~ok_label, [f"row {i}: {lab} ({s})" for i, lab, s in
                                        zip(idx[~ok_label], labels[~ok_label], splits[~ok_label])])
    sha = block["sha256"]
    if sha.dtype == np.dtype("S64"):
        b = sha.view(np.uint8).reshape(-1, 64)
        ok_sha = (((b >= 48) & (b <= 57)) | ((b >= 97) & (b <= 102))).all(axis=1)
    else:
        ok_sha = np.array([bool(_SHA_RE.fullmatch(s)) for s in decode_texts(sha)], bool)
    if not ok_sha.all():
        scan.flag("sha", ~ok_sha, [f"row {i}: {s!r}" for i, s in zip(idx[~ok_sha], decode_texts(sha[~ok_sha]))])
    paths = decode_texts(block["path"])
    empty = np.array([not p for p in paths], bool)
    if empty.any():
        scan.flag("empty", empty, [f"row {i}" for i in idx[empty]])
    scan.path_hashes.append(np.fromiter((hash(p) for p in paths), dtype=np.int64, count=len(paths)))
    x = np.asarray(block["features"])
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        scan.flag("nonfinite", ~finite, [f"row {i}" for i in idx[~finite]])


def _report_damage(name: str, path: Path | None, bad_rows: dict[str, list[tuple[int, int]]], problems: list[str],
                   damaged: list[dict[str, Any]]) -> None:
    """The damaged row ranges of each dataset, overlapping ones merged: one problem per dataset."""
    for ds, ranges in bad_rows.items():
        merged: list[tuple[int, int]] = []
        for a, b in sorted(ranges):
            if merged and merged[-1][1] >= a:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        damaged.append({"group": name, "dataset": ds, "rows": [list(r) for r in merged]})
        problems.append(_damage_problem(path, name, ds, merged))


def _report_values(name: str, n_names: int, scan: _Scan, problems: list[str]) -> None:
    """One problem per kind of bad value the scan found, naming the first rows."""
    counts, shown = scan.counts, scan.shown
    if counts["labels"]:
        problems.append(f"group {name}: {counts['labels']} label(s) outside [0, {n_names}) (the store has "
                        f"{n_names} class names; -1 is allowed only in the 'predict' split): "
                        f"{_first(shown['labels'])}. Re-run `cnncodes extract` on the dataset to rewrite the labels.")
    if counts["splits"]:
        problems.append(f"group {name}: {counts['splits']} split value(s) not in {', '.join(SPLIT_VALUES)}: "
                        f"{_first(shown['splits'])}. Re-run `cnncodes extract` on the dataset to rewrite the splits.")
    if counts["sha"]:
        problems.append(f"group {name}: {counts['sha']} sha256 value(s) are not 64 lowercase hex characters: "
                        f"{_first(shown['sha'])}. Those rows cannot be matched to their images; {_REBUILD_AFTER}.")
    if counts["empty"]:
        problems.append(f"group {name}: {counts['empty']} row(s) with an empty path: {_first(shown['empty'])}. "
                        f"{REBUILD}.")
    if counts["nonfinite"]:
        problems.append(f"group {name}: {counts['nonfinite']} row(s) of features contain NaN or infinity: "
                        f"{_first(shown['nonfinite'])}. Probes trained on them fail; {_REBUILD_AFTER} "
                        "(with --precision float32 if it was float16).")


def _report_duplicate_paths(name: str, g: h5py.Group, m: int, step: int, scan: _Scan, problems: list[str]) -> None:
    """Phase 5: paths in more than one row; only the paths whose hash repeats are read again to be sure."""
    if not scan.path_hashes:
        return
    uniq, counts = np.unique(np.concatenate(scan.path_hashes), return_counts=True)
    candidates = set(uniq[counts > 1].tolist())
    if not candidates:
        return
    seen: Counter = Counter()
    for start in range(0, m, step):
        try:
            part = read_rows(g["path"], start, min(m, start + step))
        except StoreDamagedError:
            continue
        for p in decode_texts(part):
            if hash(p) in candidates:
                seen[p] += 1
    dups = sorted(p for p, c in seen.items() if c > 1)
    if dups:
        problems.append(f"group {name}: {len(dups)} path(s) appear more than once: {_first(dups)}. "
                        f"Each image must have one row; {_REBUILD_AFTER}.")


# --------------------------------------------------------------------------- a store


def _check_files(groups: list[tuple[str, h5py.Group, int]], root: Path, problems: list[str],
                 workers: int) -> int:
    wanted: dict[str, set[str]] = {}
    for _, g, m in groups:
        for start in range(0, m, 65536):
            stop = min(m, start + 65536)
            try:
                part = zip(decode_texts(read_rows(g["path"], start, stop)),
                           decode_texts(read_rows(g["sha256"], start, stop)))
            except StoreDamagedError:
                continue  # reported as damaged already
            for p, h in part:
                wanted.setdefault(p, set()).add(h)
    items = sorted(wanted)

    def digest(p: str) -> str | None:
        try:
            return file_sha256(root / p)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"unreadable: {exc}"

    missing, changed, unreadable = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for p, h in zip(items, pool.map(digest, items)):
            if h is None:
                missing.append(p)
            elif h.startswith("unreadable"):
                unreadable.append(f"{p} ({h})")
            elif any(want != h for want in wanted[p]):
                changed.append(p)
    if missing:
        problems.append(f"{len(missing)} of {len(items)} image file(s) the store refers to are missing under "
                        f"{root}: {_first(missing)}. Restore them, or run `cnncodes extract` on the dataset "
                        "again: it drops the rows of removed images.")
    if changed:
        problems.append(f"{len(changed)} of {len(items)} image file(s) changed since their codes were computed "
                        f"(sha256 differs): {_first(changed)}. Run `cnncodes extract` on the dataset again: it "
                        "recomputes the codes of changed images.")
    if unreadable:
        problems.append(f"{len(unreadable)} image file(s) could not be read: {_first(unreadable)}. Check their "
                        "permissions.")
    return len(items)


def verify_store(path: str | os.PathLike, check_files: bool = False, dataset: str | os.PathLike | None = None,
                 rows: int = 65536, workers: int = 4) -> dict[str, Any]:
    """Check a store's structure and contents. Returns ``ok``, ``problems`` (each says what is wrong and
    what to do), ``notes`` (harmless findings, such as an unfinished batch), the groups checked and, with
    ``check_files``, how many image files were re-hashed under ``dataset`` (default: the store's
    ``dataset`` attribute)."""
    path = Path(path)
    if path.is_file() and is_index(path):
        try:
            shards = read_index(path)
        except (OSError, KeyError, ValueError) as exc:
            return {"store": str(path), "ok": False, "problems": [f"the shard index {path} is unreadable ({exc}); "
                    "re-run the sharded extraction to write it again."], "notes": [], "groups": [],
                    "files_checked": None}
        parts = [verify_store(p, check_files, dataset, rows, workers) for p in shards]
        return {"store": str(path), "ok": all(p["ok"] for p in parts),
                "problems": [f"shard {p['store']}: {x}" for p in parts for x in p["problems"]],
                "notes": [f"shard {p['store']}: {x}" for p in parts for x in p["notes"]],
                "groups": parts[0]["groups"], "shards": [p["store"] for p in parts],
                "damaged": [{**d, "shard": p["store"]} for p in parts for d in p.get("damaged", [])],
                "unchecked": [f"{p['store']}:{g}" for p in parts for g in p.get("unchecked", [])],
                "files_checked": sum(p["files_checked"] or 0 for p in parts) if check_files else None}
    problems: list[str] = []
    notes: list[str] = []
    result: dict[str, Any] = {"store": str(path), "ok": False, "problems": problems, "notes": notes,
                              "groups": [], "files_checked": None, "damaged": [], "unchecked": []}
    if not path.is_file():
        problems.append(f"no feature store file at {path}. Check the path; `cnncodes extract` creates stores.")
        return result
    try:
        f = open_file(path)
    except StoreError as exc:
        problems.append(f"cannot open {path} as HDF5 ({exc}). The file is damaged or not a store: "
                        "re-create it with `cnncodes extract`.")
        return result
    try:
        with f:
            _verify_open(f, path, result, check_files, dataset, rows, workers)
    except StoreError:
        raise
    except Exception as exc:  # damage outside the groups (root attributes, links...): report, do not crash
        problems.append(f"{path} could not be read ({type(exc).__name__}: {exc}). The file is damaged; "
                        "re-create the store with `cnncodes extract` (or restore a good copy).")
    result["ok"] = not problems
    return result


def _verify_open(f: h5py.File, path: Path, result: dict[str, Any], check_files: bool,
                 dataset: str | os.PathLike | None, rows: int, workers: int) -> None:
    problems, notes = result["problems"], result["notes"]
    fmt = decode(f.attrs.get("format"))
    if fmt != STORE_FORMAT:
        problems.append(f"{path} has format attribute {fmt!r}, expected {STORE_FORMAT!r}: it is not a "
                        "cnncodes feature store (or of an unsupported version). Re-create it with "
                        "`cnncodes extract`.")
        return
    missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        problems.append(f"provenance attribute(s) {', '.join(missing)} missing from the store's root, so "
                        "what produced the codes is unknown. Re-create the store with `cnncodes extract`.")
    names = decode(f.attrs.get("class_names"))
    if "class_names" in f.attrs and not isinstance(names, list):
        problems.append(f"class_names should be a JSON list, it is {names!r}. Re-create the store with "
                        "`cnncodes extract`.")
    names = list(names) if isinstance(names, list) else []
    readable: list[tuple[str, h5py.Group, int]] = []
    n_groups = 0
    for name in (UPDATED, SKIPPED):
        ds = f.get(name)
        if isinstance(ds, h5py.Dataset):
            bad = damaged_rows(ds)
            if bad:
                result["damaged"].append({"group": "/", "dataset": name, "rows": [list(r) for r in bad]})
                problems.append(f"dataset {name} (the last run's record) is damaged (checksum mismatch). Run "
                                f"`cnncodes store repair {path}`: it writes it anew.")
    for layer, pooling, g in iter_groups(f):
        name = group_name(layer, pooling) if pooling else layer
        if not isinstance(g, h5py.Group):
            problems.append(f"{name}: expected a <layer>/<pooling> group, found a {type(g).__name__}. "
                            "Re-create the store with `cnncodes extract`.")
            continue
        n_groups += 1
        try:
            info = _check_group(name, g, names, rows, problems, notes, path, result["damaged"])
        except Exception as exc:  # a damaged file can fail in many ways: report, do not crash
            problems.append(f"group {name}: could not be read ({type(exc).__name__}: {exc}). The file is "
                            "damaged; re-create the store with `cnncodes extract`.")
            info = None
        if info is not None:
            result["groups"].append(info)
            readable.append((name, g, info["checked_rows"]))
            if not info["checksums"]:
                result["unchecked"].append(name)
    if not n_groups:
        notes.append("the store has no layer groups yet.")
    if check_files:
        root = dataset if dataset is not None else decode(f.attrs.get("dataset"))
        if not root:
            raise StoreError(f"cannot check image files: {path} records no dataset root. Pass --dataset ROOT.")
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"cannot check image files: dataset root {root} is not a folder. Pass "
                             "--dataset with the folder the images are in.")
        result["dataset"] = str(root)
        result["files_checked"] = _check_files(readable, root, problems, workers)


def verify_text(r: dict[str, Any]) -> str:
    head = (f"{r['store']}: ok" if r["ok"] else f"{r['store']}: {len(r['problems'])} problem(s)")
    if r.get("unchecked"):
        head += f" (unchecked: {', '.join(r['unchecked'])} carry no checksums, so damage there cannot be detected)"
    lines = [head]
    lines += [f"  group {g['group']}: {g['rows']} rows" for g in r["groups"]]
    if r.get("files_checked") is not None:
        lines.append(f"  {r['files_checked']} image files re-hashed under {r.get('dataset')}")
    lines += [f"problem: {p}" for p in r["problems"]]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
