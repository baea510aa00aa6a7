"""Looking after feature stores: list, inspect, export and repair them.

These are the tools behind ``cnncodes store ls|info|export|repair`` (``store verify`` is
:mod:`storage.verify`). Like the
rest of ``storage`` they need only NumPy, h5py and pandas (pyarrow for
Parquet): an analyst can use them without TensorFlow, Prefect or scikit-learn.

* :func:`list_store` - size, provenance and the groups with their row counts.
* :func:`store_info` - that, plus per-group split/class counts and the first rows.
* :func:`export_group` - one group to Parquet, CSV or NumPy ``.npy`` (+ a rows CSV),
  streamed in chunks so memory stays bounded, written under a temporary name and
  renamed into place.
* :func:`repair_store` - drops the rows whose chunks fail their checksum; the next
  ``cnncodes extract`` of the same data recomputes them.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .errors import StoreError
from .files import atomic_path
from .format import (INDEX_FORMAT, ROW_DATASETS, decode, decode_attrs, decode_texts, group_fingerprint, group_name,
                     is_index, iter_groups, read_index, row_bytes, rows_per_block, run_state)
from .reader import FeatureStore, damage_named
from .writer import repair_store as _repair_file

EXPORT_FORMATS = ("parquet", "csv", "npy")
SUMMARY_KEYS = ("backbone", "backbone_args", "weights", "weights_digest", "input_size", "preprocessing",
                "precision", "class_names", "dataset", "created", "updated")
META_COLUMNS = ("path", "label", "class", "split", "sha256")
_FIRST = 5  # dropped row ranges named per group


# --------------------------------------------------------------------------- helpers


def _feature_columns(width: int) -> list[str]:
    digits = max(4, len(str(max(width - 1, 0))))
    return [f"f{i:0{digits}d}" for i in range(width)]


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
        groups = [_group_summary(g, layer, pooling) for layer, pooling, g in iter_groups(f)
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
                per_split.update(decode_texts(g["split"][start:stop]).tolist())
                per_class.update(int(x) for x in g["label"][start:stop])
            k = min(head, n)
            feats = np.asarray(g["features"][:k]).reshape(k, -1) if k else np.zeros((0, 0))
            first = [{"path": p, "label": int(lab),
                      "class": names[int(lab)] if 0 <= int(lab) < len(names) else None,
                      "split": s, "sha256": h, "features": [float(v) for v in feats[i, :8]]}
                     for i, (p, lab, s, h) in enumerate(zip(decode_texts(g["path"][:k]), g["label"][:k],
                                                           decode_texts(g["split"][:k]),
                                                           decode_texts(g["sha256"][:k])))]
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
            sel &= np.isin(decode_texts(g["split"][start:stop]).astype(str), splits_wanted)
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
        step = rows_per_block(rows, row_bytes(g["features"]))
        chunks = list(_selected_chunks(g, n, step, splits_wanted, labels_wanted))
        total = int(sum(int(sel.sum()) for _, _, sel in chunks))

        def pieces() -> Iterator[dict[str, np.ndarray]]:
            for start, stop, sel in chunks:
                labels = g["label"][start:stop][sel].astype(np.int64)
                yield {"path": decode_texts(g["path"][start:stop][sel]), "label": labels,
                       "class": np.asarray([names[i] if 0 <= i < len(names) else None for i in labels],
                                           dtype=object),
                       "split": decode_texts(g["split"][start:stop][sel]),
                       "sha256": decode_texts(g["sha256"][start:stop][sel]),
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
