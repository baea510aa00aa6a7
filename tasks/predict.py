"""Predict with a registered linear probe on new images.

The codes are computed exactly as recorded in the model's metadata (backbone,
weights, input size, preprocessing, layer, pooling). Images the training store
already holds (same content hash) are not recomputed: their codes are read
from it. The others are extracted into a prediction store beside it (one per
image source, incremental like any store).
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage import FeatureStore, ModelMismatchError, ModelRegistry, open_store
from storage.files import atomic_path
from storage.errors import ParameterError
from storage.manifest import Manifest

from .backbones import BackboneSpec
from .data.datasets import groups_from_names, scan_images
from .reports.evaluate import scores_of
from .extract import ExtractOptions, extract_to_store

OUTPUT_SUFFIXES = (".csv", ".parquet")
log = logging.getLogger(__name__)


def prediction_store_path(train_store: str | Path, source: str | Path) -> Path:
    src = Path(source).resolve()
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem or "images")[:40]
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    train_store = Path(train_store)
    return train_store.with_name(f"{train_store.stem}.predict-{tag}-{digest}.h5")


def _spec_from(meta: dict[str, Any], store_prov: dict[str, Any]) -> BackboneSpec:
    spec = store_prov.get("spec")
    if not spec:
        raise ModelMismatchError(f"the training store {meta.get('store')} does not record how its codes were "
                                 "computed (it predates cnncodes' 'spec' attribute); re-extract it, retrain, "
                                 "then predict.")
    return BackboneSpec.model_validate(spec)


def predict_images(source: str | Path, registry: str | Path, name: str, version: int | str | None,
                   output: str | Path, options: ExtractOptions | None = None,
                   progress: Callable[[int, int], None] | None = None, reuse: bool = True,
                   group_by: str | None = None,
                   self_train_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Predict every image of ``source`` with model ``name`` (``version``: number, alias or latest).

    Writes ``output`` (.csv or .parquet) with columns path, sha256, predicted, confidence and
    one ``p_<class>`` column per class; returns counts, skips and paths. ``reuse=False`` recomputes
    every image's codes instead of reading those the training store holds. A fine-tuned model trained with
    ``adapt_batchnorm`` predicts each group after AdaBN on the group's own files: the groups are drawn from
    file names by ``group_by`` (a regular expression, as ``extract --group-by``), else from a CSV's ``group``
    column, else all files are one; one trained with ``self_train`` also trains on each group's confident
    predictions first (``self_train_progress``: its epochs)."""
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ParameterError(f"output must end in .csv or .parquet; got {output.name!r}.")
    reg = ModelRegistry(registry)
    record = reg.record(name, version)
    meta = record.metadata
    if meta.get("kind") == "fine-tuned":
        return _predict_finetuned(source, reg, record, output, options, group_by, self_train_progress)
    if meta.get("kind") != "linear-probe":
        raise ParameterError(f"model {record.name} v{record.version} is of kind {meta.get('kind')!r}, which "
                             "predict does not know; it serves linear probes and fine-tuned models.")
    layer, pooling = meta["layer"], meta["pooling"]
    train_store = Path(meta["store"])
    manifest = scan_images(source)
    if train_store.exists():
        _check_media(manifest, open_store(train_store).provenance.get("media") or "image", record)
    codes: dict[str, np.ndarray] = {}
    if reuse and train_store.exists():
        train_fs = open_store(train_store)
        if train_fs.provenance.get("weights_digest") == meta.get("weights_digest"):
            codes = train_fs.lookup(layer, pooling, [s.sha256 for s in manifest.samples])
    reused = sum(1 for s in manifest.samples if s.sha256 in codes)
    missing = [s for s in manifest.samples if s.sha256 not in codes]
    computed, skipped = 0, [{"path": s.path, "reason": s.reason} for s in manifest.skipped]
    pstore = None
    if missing:
        if not train_store.exists():
            raise ModelMismatchError(f"the model's training store {train_store} is gone, so the exact extraction "
                                     "settings are unknown; restore it, or retrain the model.")
        spec = _spec_from(meta, open_store(train_store).provenance)
        pstore = prediction_store_path(train_store, source)
        sub = Manifest(manifest.root, manifest.layout, [], missing, media=manifest.media)
        # the model's resize, whatever was asked
        options = (options or ExtractOptions()).model_copy(update={"resize": meta.get("resize") or "stretch"})
        summary = extract_to_store(sub, pstore, spec, [(layer, pooling)], options, progress=progress)
        pfs = FeatureStore(pstore)
        if pfs.provenance.get("weights_digest") != meta.get("weights_digest"):
            raise ModelMismatchError(
                f"the backbone weights loaded now (sha256 {pfs.provenance.get('weights_digest')}) differ from "
                f"those the model was trained on ({meta.get('weights_digest')}); the codes would not match. "
                "Restore the original weights file (KERAS_HOME), or retrain.")
        computed = summary["computed"]
        skipped += [d for d in summary["skipped"] if d not in skipped]
        got = pfs.lookup(layer, pooling, [s.sha256 for s in missing])
        codes.update(got)
    if group_by:
        log.warning("--group-by %r does nothing for a linear probe (model %s v%s): only fine-tuned models trained "
                    "with --adapt-batchnorm predict group by group", group_by, record.name, record.version)
    usable = [s for s in manifest.samples if s.sha256 in codes]
    model, record = reg.load(record.name, record.version, expect={"feature_dim": int(meta["feature_dim"])})
    class_names = list(meta["class_names"])
    if usable:
        X = np.stack([codes[s.sha256] for s in usable]).reshape(len(usable), -1)
        scores = scores_of(model, X)
    else:
        scores = np.zeros((0, len(class_names)))
    model_classes = np.asarray(getattr(model, "classes_", np.arange(len(class_names))))
    full = np.zeros((len(usable), len(class_names)))
    full[:, model_classes] = scores
    table = _table(manifest, usable, full, class_names)
    _write_table(table, output)
    return {"predictions": str(output.resolve()), "images": len(usable), "reused": reused, "computed": computed,
            "skipped": skipped, "model": record.name, "version": record.version, "layer": layer,
            "pooling": pooling, "prediction_store": str(pstore.resolve()) if pstore else None,
            "class_counts": {c: int((table["predicted"] == c).sum()) for c in class_names}}


def _table(manifest: Manifest, usable, probs: np.ndarray, class_names):
    import pandas as pd

    pred = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, int)
    data = {"path": [manifest.abspath(s) for s in usable], "sha256": [s.sha256 for s in usable],
            "predicted": [class_names[i] for i in pred],
            "confidence": probs[np.arange(len(pred)), pred] if len(pred) else np.zeros(0)}
    for i, c in enumerate(class_names):
        data[f"p_{c}"] = probs[:, i]
    return pd.DataFrame(data)


def _write_table(df, output: Path) -> None:
    with atomic_path(output) as tmp:
        if output.suffix.lower() == ".parquet":
            try:
                df.to_parquet(tmp, index=False)
            except ImportError as exc:
                raise ParameterError("writing Parquet needs pyarrow (`pip install pyarrow`); or use a .csv output."
                                     ) from exc
        else:
            df.to_csv(tmp, index=False)


def _predict_finetuned(source, reg: ModelRegistry, record, output: Path, options: ExtractOptions | None,
                       group_by: str | None = None, progress: Callable[[int, int], None] | None = None
                       ) -> dict[str, Any]:
    """A fine-tuned ``.keras`` model takes pixels: decode as in training, predict (group by group after AdaBN
    when the model was trained with ``adapt_batchnorm``), write the table."""
    from .finetune import load_finetuned, predict_paths
    from .finetune.evaluation import predict_paths_by_group, self_training_for

    meta = record.metadata
    path, record = reg.load(record.name, record.version)  # verifies the file's sha256 first
    model = load_finetuned(path)
    manifest = scan_images(source)
    class_names = list(meta["class_names"])
    spec = BackboneSpec.model_validate(meta["spec"])
    _check_media(manifest, meta.get("media") or "image", record)
    paths = [manifest.abspath(s) for s in manifest.samples]
    how = (int(meta["input_size"]), meta.get("resize") or "stretch", (options or ExtractOptions()).batch_size,
           manifest.media, spec.spectrogram)
    adaptation = None
    if (meta.get("config") or {}).get("adapt_batchnorm"):
        if group_by and paths:
            named = groups_from_names(paths, group_by)
            groups = [named.get(p, "(all)") for p in paths]
        else:  # a CSV's group column, else all the files are one group
            groups = [manifest.groups.get(s.path, "(all)") for s in manifest.samples]
        probs, ok, skips, adaptation = predict_paths_by_group(model, paths, groups, *how,
                                                              self_training=self_training_for(
                                                                  meta["config"], manifest.media, progress))
    else:
        if group_by:
            log.warning("--group-by %r does nothing: model %s v%s was not trained with --adapt-batchnorm, so it "
                        "predicts every file alike", group_by, record.name, record.version)
        probs, ok, skips = predict_paths(model, paths, *how)
    usable = [manifest.samples[i] for i in ok]
    table = _table(manifest, usable, probs, class_names)
    _write_table(table, output)
    skipped = [{"path": s.path, "reason": s.reason} for s in manifest.skipped]
    skipped += [{"path": s.path, "reason": s.reason} for s in skips]
    return {"predictions": str(output.resolve()), "images": len(usable), "reused": 0, "computed": len(usable),
            "skipped": skipped, "model": record.name, "version": record.version, "layer": None, "pooling": None,
            "prediction_store": None, "class_counts": {c: int((table["predicted"] == c).sum()) for c in class_names},
            "adaptation": adaptation}


def _check_media(manifest: Manifest, trained_on: str, record) -> None:
    """ModelMismatchError when the files to predict are sound and the model learnt from images, or the reverse."""
    if manifest.media != trained_on:
        what = {"audio": "sound recordings", "image": "images"}
        raise ModelMismatchError(f"model {record.name} v{record.version} was trained on {what.get(trained_on, trained_on)}"
                                 f", but {manifest.root} holds {what.get(manifest.media, manifest.media)}. Predict "
                                 "with a model trained on the same kind of data.")
