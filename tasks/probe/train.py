"""Linear probes on a feature store: train and register, evaluate and report, sweep layers.

The glue between the store (codes and their provenance), :mod:`tasks.probe.linear`
(the scikit-learn pipelines), :mod:`tasks.reports.evaluate` (metrics and plots) and
the model registry. Inputs and outputs are paths and small dicts, so that the
Prefect wrappers stay thin.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from storage import ModelRegistry, open_store
from storage.errors import DatasetError, ParameterError
from storage.files import atomic_write

from ..reports import evaluate as ev
from .linear import LinearConfig, check_labels, cv_score, train_linear, train_sgd_chunked

# Keys copied from the store's provenance into a model's metadata: what `predict` needs to
# recompute exactly the same codes, and what loading checks against.
PROVENANCE_KEYS = ("backbone", "backbone_args", "weights", "init_seed", "weights_digest", "input_size",
                   "preprocessing", "resize", "precision")


def features_digest(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X).tobytes())
    h.update(np.ascontiguousarray(y.astype(np.int64)).tobytes())
    return h.hexdigest()


def default_model_name(store: str | Path, layer: str, classifier: str) -> str:
    stem = Path(store).stem.replace("__", "-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}-{layer}-{classifier}")[:100].strip("-.")


def fit_probe(store: str | Path, layer: str, pooling: str | None, cfg: LinearConfig, registry: str | Path,
              name: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train a probe on the store's train split and save it as a new version in the registry.

    Returns ``{"name", "version", "C", "cv_scores", "seconds", "train_images", "model_path"}``.
    Raises DatasetError when the train split lacks images or has a single class."""
    fs = open_store(store)
    attrs = fs.group_attrs(layer, pooling)
    pooling = attrs["pooling"]
    prov = fs.provenance
    class_names = list(prov.get("class_names") or [])
    if cfg.classifier == "sgd":
        def chunks(epoch: int | None = None):
            # epoch None: store order (labels, digest, scaler). An epoch: the store's block shuffle, seeded by
            # (seed, epoch), so that each chunk mixes rows (and classes) from across the store: a store
            # extracted from class folders is sorted by class, and SGD fed one class a chunk forgets the rest.
            seed = None if epoch is None else (cfg.seed, epoch)
            for c in fs.iter_chunks(layer, pooling, split="train", rows=cfg.chunk_rows, shuffle_seed=seed):
                yield c.features.reshape(len(c), -1), c.labels

        # one pass in store order for the labels and the digest (of the rows in store order, by chunk_rows
        # chunks, as before: it does not depend on the shuffle)
        parts, digests = [], []
        for X, y in (chunks() if attrs["rows"] else ()):
            parts.append(y)
            digests.append(features_digest(X, y).encode())
        labels = np.concatenate(parts) if parts else np.zeros(0, int)
        if len(labels) == 0:
            raise DatasetError(f"store {store} has no training images in {layer}/{pooling}; extract a dataset "
                               "with a train split first.")
        check_labels(labels, class_names)
        result = train_sgd_chunked(chunks, np.unique(labels).tolist(), cfg, progress, epoch_chunks=chunks)
        digest = hashlib.sha256(b"".join(digests)).hexdigest()
        n_train, dim = len(labels), int(np.prod(attrs["feature_shape"]))
    else:
        codes = fs.read(layer, pooling, split="train")
        if len(codes) == 0:
            raise DatasetError(f"store {store} has no training images in {layer}/{pooling}; extract a dataset "
                               "with a train split first.")
        X = codes.features.reshape(len(codes), -1)
        result = train_linear(X, codes.labels, class_names, cfg, groups=row_groups(store, codes))
        digest = features_digest(X, codes.labels)
        n_train, dim = len(codes), X.shape[1]
    name = name or default_model_name(store, layer, cfg.classifier)
    metadata = {
        "kind": "linear-probe", "classifier": cfg.classifier, "config": cfg.as_dict(), "C": result.C,
        "cv_scores": result.cv_scores, "train_seconds": round(result.seconds, 3), "train_images": n_train,
        "store": str(Path(store).resolve()), "layer": layer, "pooling": pooling, "group": f"{layer}/{pooling}",
        "feature_dim": dim, "feature_shape": attrs["feature_shape"], "features_sha256": digest,
        "class_names": class_names, "dataset": prov.get("dataset"),
        "manifest_fingerprint": attrs.get("manifest_fingerprint"),
        "split": {"seed": prov.get("split_seed"), "fractions": dict(prov.get("split_fractions") or {}),
                  "layout": prov.get("layout"), "group_by": prov.get("split_group_by")},
        **{k: prov.get(k) for k in PROVENANCE_KEYS},
    }
    reg = ModelRegistry(registry)
    record = reg.save(name, result.model, metadata)
    with reg.kept_only_with_its_splits(record):  # the lineage's holdout: images keep their first training's split
        reg.pin_splits(record.name, fs.row_splits(layer, pooling), prov.get("split_fractions"),
                       prov.get("split_seed"), prov.get("split_group_by"))
    return {"name": record.name, "version": record.version, "C": result.C, "cv_scores": result.cv_scores,
            "seconds": round(result.seconds, 3), "train_images": n_train, "model_path": str(record.model_path)}


def evaluate_probe(registry: str | Path, name: str, version: int | str | None, store: str | Path | None = None,
                   splits: Sequence[str] = ("train", "val", "test"), report_dir: str | Path | None = None
                   ) -> dict[str, Any]:
    """Evaluate a registered probe on the store's splits; write the report (Markdown + JSON) and one
    confusion-matrix PNG per evaluated split into ``report_dir``. Returns metrics per split and paths.

    Loading checks the model against the store (class names, feature dimension, backbone, layer,
    weights, preprocessing) and refuses a mismatch."""
    reg = ModelRegistry(registry)
    record = reg.record(name, version)
    meta = record.metadata
    store = Path(store or meta["store"])
    fs = open_store(store)
    prov = fs.provenance
    attrs = fs.group_attrs(meta["layer"], meta["pooling"])
    model, record = reg.load(name, record.version, expect={
        "class_names": list(prov.get("class_names") or []), "feature_dim": int(np.prod(attrs["feature_shape"])),
        "backbone": prov.get("backbone"), "layer": meta["layer"], "pooling": attrs["pooling"],
        "weights_digest": prov.get("weights_digest"), "preprocessing": prov.get("preprocessing"),
        "input_size": prov.get("input_size")})
    class_names = list(meta["class_names"])
    report_dir = Path(report_dir or Path(registry).parent / "reports")
    stem = f"{record.name}-v{record.version}"
    metrics: dict[str, Any] = {}
    plots: dict[str, str] = {}
    model_classes = np.asarray(getattr(model, "classes_", np.arange(len(class_names))))
    for split in splits:
        codes = fs.read(meta["layer"], meta["pooling"], split=split)
        if len(codes) == 0:
            continue
        scores = ev.scores_of(model, codes.features)
        metrics[split] = ev.evaluate_scores(scores, codes.labels, class_names, model_classes)
        if split != "train":
            metrics[split]["outcomes"] = str(ev.write_outcomes(
                report_dir / f"{stem}.outcomes-{split}.csv", codes.paths, codes.sha256, codes.labels,
                ev.predicted(scores, model_classes)).resolve())
        plots[split] = str(ev.plot_confusion(metrics[split]["confusion"], class_names,
                                             report_dir / f"{stem}.confusion-{split}.png",
                                             title=f"{record.name} v{record.version}: {split}").resolve())
    if "val" not in metrics and "test" not in metrics:
        raise DatasetError(f"store {store} has no val or test images to evaluate on; extract with "
                           "--val-fraction > 0, or a dataset with a val/ or test/ split.")
    cv_plot = None
    if meta.get("cv_scores"):
        cs = meta["cv_scores"]
        best = [r["C"] for r in cs].index(meta["C"]) if meta["C"] in [r["C"] for r in cs] else None
        cv_plot = str(ev.plot_scores_by([f"{r['C']:g}" for r in cs], [r["mean"] for r in cs], [r["std"] for r in cs],
                                        report_dir / f"{stem}.cv.png", title="C search (stratified k-fold)",
                                        xlabel="C", best=best).resolve())
    result = {"name": record.name, "version": record.version, "metrics": metrics, "confusion_plots": plots,
              "cv_plot": cv_plot, "store": str(store.resolve()), "layer": meta["layer"], "pooling": meta["pooling"],
              "classifier": meta.get("classifier"), "C": meta.get("C"), "class_names": class_names}
    report = report_dir / f"{stem}.report.md"
    atomic_write(report, probe_markdown(result, meta))
    atomic_write(report.with_suffix(".json"), json.dumps(result, indent=1, default=str))
    result["report"] = str(report.resolve())
    return result


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def probe_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    header = [f"# Linear probe `{result['name']}` v{result['version']}", "",
              f"- classifier: **{meta.get('classifier')}**, C = {meta.get('C')}, "
              f"class weight: {meta.get('config', {}).get('class_weight')}",
              f"- codes: `{meta['layer']}` / {meta['pooling']} ({meta.get('feature_dim')} dims) of "
              f"`{meta.get('backbone')}` {meta.get('backbone_args') or ''}, weights `{meta.get('weights')}`",
              f"- store: `{result['store']}`", f"- trained on {meta.get('train_images')} images in "
              f"{meta.get('train_seconds')} s"]
    return metrics_markdown(header, result, meta)


def metrics_markdown(header: list[str], result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The metrics part of a model report (the same for linear probes and fine-tuned models, so
    that the two compare side by side): per split, per class, confusion matrices, C search."""
    m = result["metrics"]
    lines = header + ["", "## Metrics", "",
             "| split | images | accuracy | balanced accuracy | macro F1 |" + (" top-5 |" if any(
                 "top5_accuracy" in v for v in m.values()) else ""),
             "|---|---|---|---|---|" + ("---|" if any("top5_accuracy" in v for v in m.values()) else "")]
    for split, v in m.items():
        row = f"| {split} | {v['images']} | {_pct(v['accuracy'])} | {_pct(v['balanced_accuracy'])} | {_pct(v['macro_f1'])} |"
        if "top5_accuracy" in v:
            row += f" {_pct(v['top5_accuracy'])} |"
        lines.append(row)
    if "test" in m:
        lines += ["", "**test** is the accuracy to quote: no selection step (C search, layer sweep, early stopping, "
                      "checkpoint choice) saw it. val may have been seen by one."]
    else:
        lines += ["", "> **Warning**: no test split. The accuracy above is measured on val, which selection steps "
                      "(early stopping, checkpoint choice, a layer sweep) may have seen, so it is optimistic. "
                      "Extract or fine-tune with `--test-fraction` above 0 (the default is 0.15)."]
    for split in ("val", "test"):
        if split not in m:
            continue
        lines += ["", f"## Per class ({split})", "", "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
        lines += [f"| {c['class']} | {_pct(c['precision'])} | {_pct(c['recall'])} | {_pct(c['f1'])} | {c['support']} |"
                  for c in m[split]["per_class"]]
        names = result["class_names"]
        lines += ["", f"Confusion matrix ({split}; rows: true, columns: predicted):", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| **{names[i]}** | " + " | ".join(str(x) for x in row) + " |"
                  for i, row in enumerate(m[split]["confusion"])]
        lines += ["", f"![confusion {split}]({Path(result['confusion_plots'][split]).name})"]
    if meta.get("cv_scores"):
        lines += ["", "## C search", "", "| C | CV balanced accuracy |", "|---|---|"]
        lines += [f"| {r['C']:g}{' (chosen)' if r['C'] == meta['C'] else ''} | {_pct(r['mean'])} ± {_pct(r['std'])} |"
                  for r in meta["cv_scores"]]
        lines += ["", f"![C search]({Path(result['cv_plot']).name})"]
    return "\n".join(lines) + "\n"


def resolve_groups(store: str | Path, layers: Sequence[str] | None, pooling: str | None
                   ) -> list[tuple[str, str]] | None:
    """The (layer, pooling) groups a sweep compares: every group of the store, or those of ``layers``,
    keeping only ``pooling`` when given. None means every group."""
    if not layers and pooling is None:
        return None
    have = [(g["layer"], g["pooling"]) for g in open_store(store).groups()]
    wanted = [(layer, p) for layer, p in have if (not layers or layer in layers) and pooling in (None, p)]
    found = {layer for layer, _ in wanted}
    # a layer the store lacks stays in the list, so that the sweep says which and how to fix it
    return wanted + [(layer, pooling or "avg") for layer in (layers or []) if layer not in found]


def row_groups(store: str | Path, codes) -> np.ndarray | None:
    """The group of each row of ``codes`` (from the file :func:`tasks.extract.write_groups` keeps beside the
    store), or None when the data has no groups; a row without one is a group of its own."""
    from ..extract import groups_path

    path = groups_path(store)
    if not path.is_file():
        return None
    try:
        groups = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(groups, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        import warnings

        warnings.warn(f"the groups file {path} cannot be read ({exc}): cross-validation folds are not grouped, so "
                      "the same group (speaker) can sit on both sides of a fold and scores are optimistic. Run "
                      "the same `cnncodes extract` again to rewrite it.", stacklevel=2)
        return None
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in codes.paths]
    return np.asarray([groups.get(p, "\0row:" + p) for p in paths])


def sweep_layers(store: str | Path, groups: Sequence[tuple[str, str]] | None, cfg: LinearConfig,
                 report_dir: str | Path, max_images: int | None = None) -> dict[str, Any]:
    """Cross-validate the same probe on each (layer, pooling) group of a store (train split, plus val
    when present): the evidence for which layer to use. Writes a table and a bar plot; names the best."""
    fs = open_store(store)
    available = [(g["layer"], g["pooling"]) for g in fs.groups()]
    groups = list(available if groups is None else groups)
    missing = [f"{layer}/{pooling}" for layer, pooling in groups if (layer, pooling) not in available]
    if missing:
        raise ParameterError(f"groups {missing} are not in store {store} (it has "
                             f"{[f'{a}/{b}' for a, b in available]}); extract them first.")
    if len(groups) < 1:
        raise ParameterError(f"no layer group of store {store} matches the selection (it has "
                             f"{[f'{a}/{b}' for a, b in available] or 'none'}); check --layer and --pooling.")
    class_names = fs.class_names
    C = float(cfg.C) if cfg.C is not None else 0.1
    rows = []
    for layer, pooling in groups:
        codes = fs.read(layer, pooling, split=["train", "val"])
        check_labels(codes.labels, class_names, "train+val")
        X, y = codes.features.reshape(len(codes), -1), codes.labels
        g = row_groups(store, codes)
        if max_images and len(y) > max_images:  # a stratified sample is enough to rank layers
            from sklearn.model_selection import train_test_split

            idx, _ = train_test_split(np.arange(len(y)), train_size=max_images, stratify=y, random_state=cfg.seed)
            X, y, g = X[idx], y[idx], (g[idx] if g is not None else None)
        mean, std = cv_score(X, y, cfg, C, g)
        rows.append({"layer": layer, "pooling": pooling, "dims": int(X.shape[1]), "images": int(len(y)),
                     "mean": mean, "std": std})
    best = max(range(len(rows)), key=lambda i: rows[i]["mean"])
    report_dir = Path(report_dir)
    stem = Path(store).stem
    plot = ev.plot_scores_by([f"{r['layer']}/{r['pooling']}" for r in rows], [r["mean"] for r in rows],
                             [r["std"] for r in rows], report_dir / f"{stem}.sweep.png",
                             title=f"Layer sweep: {cfg.classifier}, C={C:g}", xlabel="layer", best=best)
    lines = [f"# Layer sweep of `{Path(store).name}`", "",
             f"{cfg.classifier} probe, C = {C:g}, {cfg.cv_folds}-fold stratified CV on train+val (grouped where the "
             "data has groups: no group on both sides of a fold), balanced accuracy.",
             "", "| layer | pooling | dims | CV balanced accuracy |", "|---|---|---|---|"]
    lines += [f"| `{r['layer']}`{' **(best)**' if i == best else ''} | {r['pooling']} | {r['dims']} | "
              f"{_pct(r['mean'])} ± {_pct(r['std'])} |" for i, r in enumerate(rows)]
    lines += ["", f"![sweep]({plot.name})", ""]
    report = report_dir / f"{stem}.sweep.md"
    atomic_write(report, "\n".join(lines))
    return {"store": str(Path(store).resolve()), "rows": rows, "best": rows[best], "plot": str(plot.resolve()),
            "report": str(report.resolve())}
