"""Looking after feature stores: list, inspect, export, verify and repair them.

These are the tools behind ``cnncodes store ls|info|export|verify|repair``. Like the
rest of ``storage`` they need only NumPy, h5py and pandas (pyarrow for
Parquet): an analyst can use them without TensorFlow, Prefect or scikit-learn.

* :func:`list_store` - size, provenance and the groups with their row counts.
* :func:`store_info` - that, plus per-group split/class counts and the first rows.
* :func:`export_group` - one group to Parquet, CSV or NumPy ``.npy`` (+ a rows CSV),
  streamed in chunks so memory stays bounded, written under a temporary name and
  renamed into place.
* :func:`verify_store` - structural and content checks, and every chunk's checksum; each
  problem says what is wrong and what to do. With ``check_files=True`` it also re-hashes the images.
* :func:`repair_store` - drops the rows whose chunks fail their checksum; the next
  ``cnncodes extract`` of the same data recomputes them.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .errors import StoreError
from .files import atomic_path
from .errors import StoreDamagedError
from .format import (INDEX_FORMAT, ROW_DATASETS, SKIPPED, STORE_FORMAT, UPDATED, damaged_rows, decode,
                     decode_attrs, group_fingerprint, group_name, is_index, layer_names, open_file, read_index,
                     read_rows, rows_text, run_state)
from .format import checked as has_checksum
from .hashing import file_sha256
from .reader import FeatureStore, damage_named
from .writer import repair_store as _repair_file

EXPORT_FORMATS = ("parquet", "csv", "npy")
SPLIT_VALUES = ("train", "val", "test", "predict")
# Root attributes every store written by `cnncodes extract` has.
REQUIRED_ATTRS = ("format", "backbone", "backbone_args", "weights", "weights_digest", "input_size",
                  "preprocessing", "precision", "class_names", "created")
REQUIRED_GROUP_ATTRS = ("layer", "pooling", "feature_shape", "dtype")
SUMMARY_KEYS = ("backbone", "backbone_args", "weights", "weights_digest", "input_size", "preprocessing",
                "precision", "class_names", "dataset", "created", "updated")
META_COLUMNS = ("path", "label", "class", "split", "sha256")
CHUNK_BYTES = 64 << 20  # features read per chunk at most (rows are lowered to fit)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_FIRST = 5  # offending rows / files named per problem


# --------------------------------------------------------------------------- helpers


def _rows_per_chunk(rows: int, row_bytes: int) -> int:
    if rows < 1:
        raise StoreError(f"rows per chunk must be >= 1, got {rows}.")
    return int(max(1, min(rows, CHUNK_BYTES // max(1, row_bytes))))


def _row_bytes(ds: h5py.Dataset) -> int:
    return int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize


def _feature_columns(width: int) -> list[str]:
    digits = max(4, len(str(max(width - 1, 0))))
    return [f"f{i:0{digits}d}" for i in range(width)]


def _str(values: np.ndarray) -> np.ndarray:
    return np.asarray([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values],
                      dtype=object)


def _group_summary(g: h5py.Group, layer: str, pooling: str) -> dict[str, Any]:
    attrs = decode_attrs(g)
    feats = g.get("features")
    committed = int(g["committed"][0]) if "committed" in g else 0
    shape = attrs.get("feature_shape")
    return {
        "group": group_name(layer, pooling), "layer": attrs.get("layer", layer),
        "pooling": attrs.get("pooling", pooling), "rows": committed,
        "feature_shape": list(shape) if isinstance(shape, (list, tuple)) else shape,
        "dtype": attrs.get("dtype"), "compression": attrs.get("compression"),
        "stored_bytes": int(feats.id.get_storage_size()) if isinstance(feats, h5py.Dataset) else None,
        "created": attrs.get("created"), "updated": attrs.get("updated"),
        "complete": bool(group_fingerprint(g)),
    }


def _iter_groups(f: h5py.File) -> Iterator[tuple[str, str, Any]]:
    """(layer, pooling, object) of each layer group; root names starting with '_' are run records."""
    for layer in layer_names(f):
        if not isinstance(f[layer], h5py.Group):
            yield layer, "", f[layer]
            continue
        for pooling in sorted(f[layer].keys()):
            yield layer, pooling, f[layer][pooling]


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- ls / info


def _one_file(path: str | os.PathLike, command: str) -> FeatureStore:
    """The store file at ``path``; for the index of a sharded store, a StoreError naming its shards."""
    if is_index(path):
        shards = ", ".join(str(p) for p in read_index(path))
        raise StoreError(f"{path} is the index of a sharded store and `cnncodes store {command}` works on one store "
                         f"file: run it on each shard ({shards}); `store ls` and `store verify` take the index.")
    return FeatureStore(path)


def list_store(path: str | os.PathLike) -> dict[str, Any]:
    """File size, format, provenance summary and the layer groups of a store (for a sharded store:
    of its first shard, with the rows of all shards, and the shards listed)."""
    if is_index(path):
        shards = read_index(path)
        first = list_store(shards[0])
        rows = [list_store(p)["groups"] for p in shards]
        for i, g in enumerate(first["groups"]):
            g["rows"] = sum(r[i]["rows"] for r in rows if i < len(r))
        return {**first, "store": str(Path(path)), "format": INDEX_FORMAT,
                "size_bytes": sum(p.stat().st_size for p in shards), "shards": [str(p) for p in shards]}
    store = FeatureStore(path)
    with damage_named(store.path), store.open() as f:
        attrs = {**decode_attrs(f), **run_state(f)}
        groups = [_group_summary(g, layer, pooling) for layer, pooling, g in _iter_groups(f)
                  if isinstance(g, h5py.Group)]
    provenance = {k: attrs.get(k) for k in SUMMARY_KEYS}
    return {"store": str(store.path), "size_bytes": store.path.stat().st_size, "format": attrs.get("format"),
            "provenance": provenance, "groups": groups}


def store_info(path: str | os.PathLike, head: int = 5, rows: int = 65536) -> dict[str, Any]:
    """:func:`list_store` plus, per group: rows per split and class, uncommitted rows, chunking,
    the manifest fingerprint, and its first ``head`` rows (with the first feature values)."""
    store = _one_file(path, "info")
    out = list_store(path)
    with damage_named(store.path), store.open() as f:
        attrs = {**decode_attrs(f), **run_state(f)}
        names = list(attrs.get("class_names") or [])
        skipped = attrs.pop("skipped", None)
        out["provenance_full"] = attrs
        out["skipped_files"] = len(skipped) if isinstance(skipped, list) else 0
        details = []
        for g_out in out["groups"]:
            g = f[g_out["group"]]
            n = g_out["rows"]
            absent = [ds for ds in (*ROW_DATASETS, "committed") if not isinstance(g.get(ds), h5py.Dataset)]
            if absent:
                details.append({**g_out, "damaged": f"dataset(s) {', '.join(absent)} missing; run "
                                                    "`cnncodes store verify`", "uncommitted_rows": 0,
                                "splits": {}, "classes": {}, "chunks": [], "manifest_fingerprint": "",
                                "features_per_row": 0, "head": []})
                continue
            lengths = {ds: int(g[ds].shape[0]) for ds in ROW_DATASETS if ds in g}
            per_split: Counter = Counter()
            per_class: Counter = Counter()
            step = max(1, rows)
            for start in range(0, n, step):
                stop = min(n, start + step)
                per_split.update(_str(g["split"][start:stop]).tolist())
                per_class.update(int(x) for x in g["label"][start:stop])
            k = min(head, n)
            feats = np.asarray(g["features"][:k]).reshape(k, -1) if k else np.zeros((0, 0))
            first = [{"path": p, "label": int(lab),
                      "class": names[int(lab)] if 0 <= int(lab) < len(names) else None,
                      "split": s, "sha256": h, "features": [float(v) for v in feats[i, :8]]}
                     for i, (p, lab, s, h) in enumerate(zip(_str(g["path"][:k]), g["label"][:k],
                                                           _str(g["split"][:k]), _str(g["sha256"][:k])))]
            details.append({
                **g_out,
                "uncommitted_rows": max(0, max(lengths.values(), default=n) - n),
                "splits": dict(sorted(per_split.items())),
                "classes": {(names[i] if 0 <= i < len(names) else str(i)): c for i, c in sorted(per_class.items())},
                "chunks": list(g["features"].chunks or ()),
                "manifest_fingerprint": group_fingerprint(g),
                "features_per_row": int(np.prod(g["features"].shape[1:], dtype=np.int64)),
                "head": first,
            })
    out["groups"] = details
    return out


def list_text(r: dict[str, Any]) -> str:
    p = r["provenance"]
    names = p.get("class_names") or []
    digest = str(p.get("weights_digest") or "-")[:12]
    args = p.get("backbone_args")
    lines = [f"store:    {r['store']} ({_human(r['size_bytes'])}, {r['format']})",
             f"backbone: {p.get('backbone')}{' ' + str(args) if args else ''}  weights: {p.get('weights')} "
             f"(digest {digest})",
             f"input:    {p.get('input_size')} px  preprocessing: {p.get('preprocessing')}  "
             f"precision: {p.get('precision')}",
             f"classes:  {len(names)} ({', '.join(map(str, names[:10]))}{', ...' if len(names) > 10 else ''})",
             f"dataset:  {p.get('dataset') or '-'}",
             f"created:  {p.get('created')}  updated: {p.get('updated') or '-'}",
             f"{'group':<40} {'rows':>9} {'shape':<16} {'dtype':<8} {'compression':<11} size"]
    for g in r["groups"]:
        lines.append(f"{g['group']:<40} {g['rows']:>9} {str(tuple(g['feature_shape'] or ())):<16} "
                     f"{str(g['dtype']):<8} {str(g['compression'] or '-'):<11} "
                     f"{_human(g['stored_bytes']) if g['stored_bytes'] is not None else '-'}"
                     f"{'' if g['complete'] else '  (incomplete)'}")
    return "\n".join(lines)


def info_text(r: dict[str, Any]) -> str:
    lines = [list_text(r)]
    for g in r["groups"]:
        if g.get("damaged"):
            lines += ["", f"[{g['group']}] damaged: {g['damaged']}"]
            continue
        lines += ["", f"[{g['group']}] {g['rows']} rows, {g['features_per_row']} values per row, chunks {g['chunks']}"
                  + (f", {g['uncommitted_rows']} uncommitted" if g["uncommitted_rows"] else ""),
                  "  splits:  " + (", ".join(f"{k}={v}" for k, v in g["splits"].items()) or "-"),
                  "  classes: " + (", ".join(f"{k}={v}" for k, v in g["classes"].items()) or "-"),
                  f"  manifest: {g['manifest_fingerprint'] or '(not completed)'}"]
        for row in g["head"]:
            vals = " ".join(f"{v:.4g}" for v in row["features"][:4])
            lines.append(f"  {row['path']:<36} {str(row['class']):<12} {row['split']:<7} "
                         f"{row['sha256'][:10]}  {vals} ...")
    return "\n".join(lines)


# --------------------------------------------------------------------------- export


def _class_indices(store: FeatureStore, classes, names: list[str]) -> list[int]:
    wanted = [classes] if isinstance(classes, (str, int)) else list(classes)
    # "3" on a command line means class index 3 unless a class is called "3".
    wanted = [int(c) if isinstance(c, str) and c not in names and c.lstrip("-").isdigit() else c for c in wanted]
    return store.class_indices(wanted, names)


def _selected_chunks(g: h5py.Group, n: int, step: int, splits_wanted, labels_wanted) -> Iterator[tuple]:
    """(start, stop, mask) of each chunk of rows [0, n) with at least one selected row."""
    for start in range(0, n, step):
        stop = min(n, start + step)
        sel = np.ones(stop - start, bool)
        if splits_wanted is not None:
            sel &= np.isin(_str(g["split"][start:stop]).astype(str), splits_wanted)
        if labels_wanted is not None:
            sel &= np.isin(g["label"][start:stop].astype(np.int64), labels_wanted)
        if sel.any():
            yield start, stop, sel


def export_group(path: str | os.PathLike, layer: str, pooling: str | None = None,
                 out: str | os.PathLike = "features.parquet", fmt: str | None = None,
                 split: str | Sequence[str] | None = None, classes: str | int | Sequence[str | int] | None = None,
                 rows: int = 65536) -> dict[str, Any]:
    """Export the committed rows of one group (optionally some splits/classes) to a file.

    ``.parquet`` and ``.csv``: columns ``path, label, class, split, sha256, f0000, ...`` (spatial maps
    flattened, float16 written as float32). ``.npy``: the features alone, in the store's shape and dtype,
    plus ``<name>.rows.csv`` with ``path, label, class, split, sha256`` in the same order. At most
    ``rows`` rows (fewer for wide rows) are in memory at a time; the output appears under its name only
    once complete. The format comes from ``fmt`` or the output's suffix."""
    store = _one_file(path, "export")
    out = Path(out)
    kind = (fmt or out.suffix).lower().lstrip(".")
    if kind not in EXPORT_FORMATS:
        raise StoreError(f"cannot export to {str(out)!r}: unknown format {kind or '(no suffix)'!r}. Supported "
                         f"formats: {', '.join('.' + k for k in EXPORT_FORMATS)} (name the output with one of "
                         "these suffixes, or pass the format).")
    if out.exists() and out.resolve() == store.path.resolve():
        raise StoreError(f"the export output {out} is the store itself; choose another --output.")
    with damage_named(store.path), store.open() as f:
        g = store.resolve_group(f, layer, pooling)
        names = list(decode(f.attrs.get("class_names")) or [])
        absent = [ds for ds in (*ROW_DATASETS, "committed") if not isinstance(g.get(ds), h5py.Dataset)]
        if absent:
            raise StoreError(f"group {g.name.strip('/')} of {store.path} is damaged (dataset(s) "
                             f"{', '.join(absent)} missing). Run `cnncodes store verify` on it.")
        n = int(g["committed"][0])
        for ds in ROW_DATASETS:
            if g[ds].shape[0] < n:
                raise StoreError(f"group {g.name.strip('/')} of {store.path} is damaged ({ds} has "
                                 f"{g[ds].shape[0]} rows, committed says {n}). Run `cnncodes store verify`.")
        splits_wanted = None if split is None else ([split] if isinstance(split, str) else list(split))
        labels_wanted = None if classes is None else _class_indices(store, classes, names)
        fshape = tuple(g["features"].shape[1:])
        fdtype = str(g["features"].dtype)
        gname = g.name.strip("/")
        step = _rows_per_chunk(rows, _row_bytes(g["features"]))
        chunks = list(_selected_chunks(g, n, step, splits_wanted, labels_wanted))
        total = int(sum(int(sel.sum()) for _, _, sel in chunks))

        def pieces() -> Iterator[dict[str, np.ndarray]]:
            for start, stop, sel in chunks:
                labels = g["label"][start:stop][sel].astype(np.int64)
                yield {"path": _str(g["path"][start:stop][sel]), "label": labels,
                       "class": np.asarray([names[i] if 0 <= i < len(names) else None for i in labels],
                                           dtype=object),
                       "split": _str(g["split"][start:stop][sel]), "sha256": _str(g["sha256"][start:stop][sel]),
                       "features": np.asarray(g["features"][start:stop])[sel]}

        if kind == "npy":
            rows_out = out.with_suffix(".rows.csv") if out.suffix else out.with_name(out.name + ".rows.csv")
            written = _write_npy(out, rows_out, pieces(), total, fshape, g["features"].dtype)
        elif kind == "parquet":
            rows_out = None
            written = _write_parquet(out, pieces(), int(np.prod(fshape, dtype=np.int64)))
        else:
            rows_out = None
            written = _write_csv(out, pieces(), int(np.prod(fshape, dtype=np.int64)))
    result = {"store": str(store.path), "group": gname, "format": kind, "output": str(out),
              "rows": written, "chunks": len(chunks), "feature_shape": list(fshape),
              "split": splits_wanted, "classes": None if labels_wanted is None else
              [names[i] if 0 <= i < len(names) else i for i in labels_wanted]}
    if kind == "npy":
        result["rows_file"] = str(rows_out)
        result["dtype"] = fdtype
    return result


def _meta_frame(piece: dict[str, np.ndarray]):
    import pandas as pd

    return pd.DataFrame({k: piece[k] for k in META_COLUMNS})


def _full_frame(piece: dict[str, np.ndarray], columns: list[str]):
    import pandas as pd

    X = piece["features"].reshape(len(piece["label"]), -1)
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    return pd.concat([_meta_frame(piece), pd.DataFrame(X, columns=columns)], axis=1)


def _write_parquet(out: Path, pieces: Iterator[dict], width: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _feature_columns(width)
    schema = pa.schema([("path", pa.string()), ("label", pa.int64()), ("class", pa.string()),
                        ("split", pa.string()), ("sha256", pa.string())]
                       + [(c, pa.float32()) for c in columns])
    written = 0
    with atomic_path(out) as t, pq.ParquetWriter(str(t), schema) as writer:
        for piece in pieces:
            table = pa.Table.from_pandas(_full_frame(piece, columns), schema=schema, preserve_index=False)
            writer.write_table(table)
            written += table.num_rows
    return written


def _write_csv(out: Path, pieces: Iterator[dict], width: int) -> int:
    columns = _feature_columns(width)
    written = 0
    with atomic_path(out) as t, open(t, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(list(META_COLUMNS) + columns) + "\n")
        for piece in pieces:
            _full_frame(piece, columns).to_csv(fh, header=False, index=False)
            written += len(piece["label"])
    return written


def _write_npy(out: Path, rows_out: Path, pieces: Iterator[dict], total: int, fshape: tuple[int, ...],
               dtype) -> int:
    from numpy.lib.format import open_memmap

    with atomic_path(out) as t, atomic_path(rows_out) as t_rows:
        arr = open_memmap(str(t), mode="w+", dtype=np.dtype(dtype), shape=(total, *fshape))
        pos = 0
        with open(t_rows, "w", encoding="utf-8", newline="") as fh:
            fh.write(",".join(META_COLUMNS) + "\n")
            for piece in pieces:
                k = len(piece["label"])
                arr[pos:pos + k] = piece["features"]
                _meta_frame(piece).to_csv(fh, header=False, index=False)
                pos += k
        arr.flush()
        del arr
        if pos != total:
            raise StoreError(f"internal: expected {total} rows to export, wrote {pos}.")
    return pos


def export_text(r: dict[str, Any]) -> str:
    lines = [f"exported {r['rows']} rows of {r['group']} ({r['store']}) to {r['output']} ({r['format']})"]
    if r.get("rows_file"):
        lines.append(f"rows:     {r['rows_file']} (path, label, class, split, sha256 in the same order)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- verify


def _first(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in list(items)[:_FIRST])
    return shown + (", ..." if len(items) > _FIRST else "")


def _damage_problem(path: Path, name: str, ds: str, ranges: list[tuple[int, int]]) -> str:
    return (f"group {name}: dataset {ds}: {rows_text(ranges)} damaged (the checksum of their chunk does not match: "
            f"the bytes on disk are not those written). Readers refuse these rows. Run `cnncodes store repair "
            f"{path}` to drop them; the next `cnncodes extract` of the same data recomputes them.")


def _check_group(name: str, g: h5py.Group, names: list[str], step_rows: int, problems: list[str],
                 notes: list[str], path: Path | None = None,
                 damaged: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Checks of one group, adding to ``problems`` and ``notes`` (and each damaged row range to
    ``damaged``); returns its row counts, or None when the group is too damaged for its rows to be read.
    Every chunk of every row dataset is read, so each checksum is checked."""
    damaged = [] if damaged is None else damaged
    rebuild = ("Rebuild the group: delete the store (or extract into a new --store) and run "
               "`cnncodes extract` again")
    missing = [ds for ds in (*ROW_DATASETS, "committed") if not isinstance(g.get(ds), h5py.Dataset)]
    if missing:
        problems.append(f"group {name}: dataset(s) {', '.join(missing)} missing (a group needs "
                        f"{', '.join((*ROW_DATASETS, 'committed'))}). {rebuild}.")
        return None
    missing_attrs = [a for a in REQUIRED_GROUP_ATTRS if a not in g.attrs]
    if missing_attrs:
        problems.append(f"group {name}: attribute(s) {', '.join(missing_attrs)} missing; readers cannot "
                        f"interpret it. {rebuild}.")
    committed_ds = g["committed"]
    if committed_ds.shape != (1,) or committed_ds.dtype.kind not in "iu":
        problems.append(f"group {name}: 'committed' should be one integer, it is {committed_ds.dtype} of shape "
                        f"{committed_ds.shape}. {rebuild}.")
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
        problems.append(f"group {name}: committed row count is negative ({n}). {rebuild}.")
        return None
    lengths = {ds: int(g[ds].shape[0]) if g[ds].shape else 0 for ds in ROW_DATASETS}
    short = {ds: k for ds, k in lengths.items() if k < n}
    if short:
        problems.append(f"group {name}: committed says {n} rows but "
                        + ", ".join(f"{ds} has {k}" for ds, k in short.items())
                        + f": rows the counter vouches for are missing. {rebuild}.")
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
    feats = g["features"]
    shape_attr = decode(g.attrs.get("feature_shape"))
    dtype_attr = decode(g.attrs.get("dtype"))
    if "feature_shape" in g.attrs and (not isinstance(shape_attr, list)
                                       or tuple(feats.shape[1:]) != tuple(shape_attr)):
        problems.append(f"group {name}: features have shape {tuple(feats.shape[1:])} per row but the group's "
                        f"feature_shape attribute says {shape_attr}. {rebuild}.")
    if "dtype" in g.attrs and str(feats.dtype) != str(dtype_attr):
        problems.append(f"group {name}: features are stored as {feats.dtype} but the group's dtype attribute "
                        f"says {dtype_attr}. {rebuild}.")
    if feats.dtype.kind != "f":
        problems.append(f"group {name}: features are {feats.dtype}, not floating point. {rebuild}.")
        return None
    m = min([n, *lengths.values()])  # rows that can be checked
    step = _rows_per_chunk(step_rows, _row_bytes(feats))
    bad_labels, bad_splits, bad_sha, empty_paths, nonfinite = [], [], [], [], []
    n_labels = n_splits = n_sha = n_empty = n_nonfinite = 0
    path_hashes = []
    valid_splits = np.array(SPLIT_VALUES)
    bad_rows: dict[str, list[tuple[int, int]]] = {}
    for start in range(0, m, step):
        stop = min(m, start + step)
        idx = np.arange(start, stop)
        block: dict[str, np.ndarray] = {}
        for ds in ROW_DATASETS:
            try:
                block[ds] = read_rows(g[ds], start, stop)
            except StoreDamagedError as exc:
                bad_rows.setdefault(ds, []).extend(exc.rows)
        if len(block) < len(ROW_DATASETS):
            continue  # the contents of damaged rows are not checked: they are reported as damaged
        labels = block["label"].astype(np.int64)
        splits = _str(block["split"]).astype(str)
        ok_split = np.isin(splits, valid_splits)
        if not ok_split.all():
            n_splits += int((~ok_split).sum())
            bad_splits += [f"row {i}: {s!r}" for i, s in zip(idx[~ok_split], splits[~ok_split])][:_FIRST]
        ok_label = ((labels >= 0) & (labels < len(names))) | ((labels == -1) & (splits == "predict"))
        if not ok_label.all():
            n_labels += int((~ok_label).sum())
            bad_labels += [f"row {i}: {lab} ({s})" for i, lab, s in
                           zip(idx[~ok_label], labels[~ok_label], splits[~ok_label])][:_FIRST]
        sha = block["sha256"]
        if sha.dtype == np.dtype("S64"):
            b = sha.view(np.uint8).reshape(-1, 64)
            ok_sha = (((b >= 48) & (b <= 57)) | ((b >= 97) & (b <= 102))).all(axis=1)
        else:
            ok_sha = np.array([bool(_SHA_RE.fullmatch(s)) for s in _str(sha)], bool)
        if not ok_sha.all():
            n_sha += int((~ok_sha).sum())
            bad_sha += [f"row {i}: {s!r}" for i, s in zip(idx[~ok_sha], _str(sha[~ok_sha]))][:_FIRST]
        paths = _str(block["path"])
        empty = np.array([not p for p in paths], bool)
        if empty.any():
            n_empty += int(empty.sum())
            empty_paths += [f"row {i}" for i in idx[empty]][:_FIRST]
        path_hashes.append(np.fromiter((hash(p) for p in paths), dtype=np.int64, count=len(paths)))
        x = np.asarray(block["features"])
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            n_nonfinite += int((~finite).sum())
            nonfinite += [f"row {i}" for i in idx[~finite]][:_FIRST]
    for ds, ranges in bad_rows.items():
        merged: list[tuple[int, int]] = []
        for a, b in sorted(ranges):
            if merged and merged[-1][1] >= a:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        damaged.append({"group": name, "dataset": ds, "rows": [list(r) for r in merged]})
        problems.append(_damage_problem(path, name, ds, merged))
    if n_labels:
        problems.append(f"group {name}: {n_labels} label(s) outside [0, {len(names)}) (the store has "
                        f"{len(names)} class names; -1 is allowed only in the 'predict' split): "
                        f"{_first(bad_labels)}. Re-run `cnncodes extract` on the dataset to rewrite the labels.")
    if n_splits:
        problems.append(f"group {name}: {n_splits} split value(s) not in {', '.join(SPLIT_VALUES)}: "
                        f"{_first(bad_splits)}. Re-run `cnncodes extract` on the dataset to rewrite the splits.")
    if n_sha:
        problems.append(f"group {name}: {n_sha} sha256 value(s) are not 64 lowercase hex characters: "
                        f"{_first(bad_sha)}. Those rows cannot be matched to their images; {rebuild[0].lower()}"
                        f"{rebuild[1:]}.")
    if n_empty:
        problems.append(f"group {name}: {n_empty} row(s) with an empty path: {_first(empty_paths)}. {rebuild}.")
    if n_nonfinite:
        problems.append(f"group {name}: {n_nonfinite} row(s) of features contain NaN or infinity: "
                        f"{_first(nonfinite)}. Probes trained on them fail; {rebuild[0].lower()}{rebuild[1:]} "
                        "(with --precision float32 if it was float16).")
    if path_hashes:
        hashes = np.concatenate(path_hashes)
        uniq, counts = np.unique(hashes, return_counts=True)
        candidates = set(uniq[counts > 1].tolist())
        if candidates:
            seen: Counter = Counter()
            for start in range(0, m, step):
                try:
                    part = read_rows(g["path"], start, min(m, start + step))
                except StoreDamagedError:
                    continue
                for p in _str(part):
                    if hash(p) in candidates:
                        seen[p] += 1
            dups = sorted(p for p, c in seen.items() if c > 1)
            if dups:
                problems.append(f"group {name}: {len(dups)} path(s) appear more than once: {_first(dups)}. "
                                f"Each image must have one row; {rebuild[0].lower()}{rebuild[1:]}.")
    return {"group": name, "rows": n, "checked_rows": m, "checksums": not unchecked}


def _check_files(groups: list[tuple[str, h5py.Group, int]], root: Path, problems: list[str],
                 workers: int) -> int:
    wanted: dict[str, set[str]] = {}
    for _, g, m in groups:
        for start in range(0, m, 65536):
            stop = min(m, start + 65536)
            try:
                part = zip(_str(read_rows(g["path"], start, stop)), _str(read_rows(g["sha256"], start, stop)))
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
    for layer, pooling, g in _iter_groups(f):
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


# --------------------------------------------------------------------------- repair


def repair_store(path: str | os.PathLike) -> dict[str, Any]:
    """Drop the damaged rows of a store (each shard of a sharded one): see :func:`storage.writer.repair_store`.
    Every row whose chunks pass their checksums is kept; the groups that lost rows are marked incomplete,
    so the next ``cnncodes extract`` of the same data recomputes exactly those rows."""
    path = Path(path)
    if path.is_file() and is_index(path):
        parts = [_repair_file(p) for p in read_index(path)]
        return {"store": str(path), "repaired": any(p["repaired"] for p in parts), "shards": parts,
                "dropped": {f"{p['store']}:{g}": r for p in parts for g, r in p["dropped"].items()},
                "rows_dropped": {f"{p['store']}:{g}": n for p in parts for g, n in p["rows_dropped"].items()},
                "groups_marked_incomplete": [f"{p['store']}:{g}" for p in parts
                                             for g in p["groups_marked_incomplete"]],
                "records_rewritten": [f"{p['store']}:{g}" for p in parts for g in p["records_rewritten"]],
                "unchecked": [f"{p['store']}:{g}" for p in parts for g in p["unchecked"]]}
    if not path.is_file():
        raise StoreError(f"no feature store file at {path}. Check the path.")
    return _repair_file(path)


def repair_text(r: dict[str, Any]) -> str:
    total = sum(r["rows_dropped"].values())
    if not r["repaired"]:
        lines = [f"{r['store']}: no damaged rows found; nothing changed."]
    else:
        lines = [f"{r['store']}: dropped {total} damaged row(s)"]
        for g, ranges in r["dropped"].items():
            shown = ", ".join(f"{a}-{b - 1}" for a, b in ranges[:_FIRST]) + (", ..." if len(ranges) > _FIRST else "")
            lines.append(f"  group {g}: {r['rows_dropped'][g]} row(s) dropped (rows {shown})")
        for name in r["records_rewritten"]:
            lines.append(f"  {name}: damaged run record written anew")
        if total:
            lines.append("Run the same `cnncodes extract` again (same data, backbone and --store): it recomputes "
                         "the dropped rows and completes the group(s).")
    if r["unchecked"]:
        lines.append(f"note: {', '.join(r['unchecked'])} carry no checksums (written before cnncodes added them): "
                     "damage there cannot be found. Extract into a new --store to get a checksummed copy.")
    return "\n".join(lines)
