"""The deployable network of a registered model, in standard Keras layers (see :mod:`.layers`).

A linear probe: input (RGB, 0-255) -> the family's preprocessing -> the backbone cut at the probe's
layer -> its pooling -> the folded scikit-learn pipeline -> class probabilities. The backbone is
rebuilt from the training store's provenance, as ``cnncodes predict`` rebuilds it, in float32, and
its weights must be those the probe was trained on (same sha256 digest).

A fine-tuned model: the registered network, its ``Preprocess`` layer (cnncodes') replaced by the same
map as a standard layer, every layer in float32, no optimizer.

Each build checks itself: the folded head against scikit-learn's own probabilities on the store's
codes, the rebuilt fine-tuned network against the registered one on the same images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage import ModelRegistry, open_store
from storage.registry import ModelRecord

from .. import runtime
from .fold import ExportError, fold_pipeline
from .layers import (PREPROCESSING_TEXT, float32_copy, head_layers, pooling_layer, preprocess_layer,
                     standard_only)

# Largest difference tolerated between the exported layers and the model they replace, in a class
# probability (float32 layers against scikit-learn's float64, or the same network rebuilt).
SELF_CHECK_TOLERANCE = 1e-4


@dataclass
class Built:
    """The exported network and what its sidecar JSON and model card say about it."""

    model: Any
    record: ModelRecord
    size: int
    preprocessing: str
    resize: str
    outputs: str                      # "probabilities" or "scores"
    details: dict[str, Any] = field(default_factory=dict)
    self_check: dict[str, Any] = field(default_factory=dict)


def resolve(registry: str | Path, name: str, version: int | str | None) -> ModelRecord:
    """The record to export: ``version`` (number, 'v3', alias), or by default the champion when the
    model has one, else its latest version."""
    reg = ModelRegistry(registry)
    if version is None:
        version = "champion" if "champion" in reg.aliases(name) else None
    return reg.record(name, version)


def build(registry: str | Path, record: ModelRecord) -> Built:
    kind = record.metadata.get("kind")
    if kind == "linear-probe":
        return _build_probe(registry, record)
    if kind == "fine-tuned":
        return _build_finetuned(registry, record)
    raise ExportError(f"model {record.name} v{record.version} is of kind {kind!r}; export knows linear probes "
                      "and fine-tuned models.")


def _check_standard(model, record: ModelRecord) -> None:
    custom = standard_only(model)
    if custom:
        raise ExportError(f"the network of {record.name} v{record.version} holds objects plain Keras does not know "
                          f"({', '.join(custom)}): the export would need them to load. A backbone from a model file "
                          "with custom layers cannot be exported; use a keras.applications backbone.")


def _sample_codes(fs, layer: str, pooling: str, rows: int = 256) -> np.ndarray:
    for split in ("test", "val", "train"):
        codes = fs.read(layer, pooling, split=split)
        if len(codes):
            return codes.features.reshape(len(codes), -1)[:rows]
    return np.zeros((0,))


def _build_probe(registry: str | Path, record: ModelRecord) -> Built:
    from ..backbones import BackboneSpec, build_backbone, preprocess_mode
    from ..reports.evaluate import scores_of

    keras = runtime.keras()
    meta = record.metadata
    store = Path(meta["store"])
    if not store.exists():
        raise ExportError(f"the training store of {record.name} v{record.version} ({store}) is gone, so the exact "
                          "backbone (weights, input size, preprocessing) is unknown; restore the store, or retrain "
                          "the probe, then export.")
    fs = open_store(store)
    spec_dict = fs.provenance.get("spec")
    if not spec_dict:
        raise ExportError(f"the training store {store} does not record how its codes were computed (it predates "
                          "the 'spec' attribute); re-extract it and retrain, then export.")
    spec = BackboneSpec.model_validate(spec_dict)
    trained_precision = spec.precision
    spec = spec.model_copy(update={"precision": "float32"})
    dim = int(meta["feature_dim"])
    sk_model, record = ModelRegistry(registry).load(record.name, record.version, expect={"feature_dim": dim})
    head = fold_pipeline(sk_model, dim)
    class_names = list(meta["class_names"])

    backbone = build_backbone(spec, check_device=False)
    if meta.get("weights_digest") and backbone.weights_digest != meta["weights_digest"]:
        raise ExportError(f"the backbone weights loaded now (sha256 {backbone.weights_digest}) differ from those "
                          f"{record.name} v{record.version} was trained on ({meta['weights_digest']}): the export "
                          "would compute other codes. Restore the original weights (KERAS_HOME, or the weights "
                          "file), or retrain the probe.")
    layer, pooling = meta["layer"], meta["pooling"]
    backbone.check_layers([layer])
    base = backbone.model
    cut = keras.Model(base.inputs, base.get_layer(layer).output, name="backbone")
    mode = preprocess_mode(spec)
    size = int(backbone.size)

    probe_in = keras.Input((dim,), dtype="float32", name="codes")
    probe = keras.Model(probe_in, head_layers(head, len(class_names))(probe_in), name="probe")
    inp = keras.Input((size, size, 3), dtype="float32", name="image")
    pre = preprocess_layer(mode)
    x = pre(inp) if pre is not None else inp
    x = pooling_layer(pooling)(cut(x))
    if int(x.shape[-1]) != dim:
        raise ExportError(f"the backbone's {layer}/{pooling} gives {int(x.shape[-1])} values per image, the probe "
                          f"takes {dim}: the store and the model disagree. Retrain the probe.")
    model = keras.Model(inp, probe(x), name=f"cnncodes_{record.name}"[:60].replace("-", "_").replace(".", "_"))
    _check_standard(model, record)

    # Self-check: the folded layers against scikit-learn's own output on the store's codes.
    X = _sample_codes(fs, layer, pooling)
    check: dict[str, Any] = {"images": int(len(X))}
    if len(X):
        want = np.zeros((len(X), len(class_names)))
        want[:, np.asarray(getattr(sk_model, "classes_", np.arange(len(class_names))))] = scores_of(sk_model, X)
        got = np.asarray(probe.predict(X.astype(np.float32), verbose=0), np.float64)
        diff = float(np.max(np.abs(got - want)))
        scale = 1.0 if head.output != "scores" else max(1.0, float(np.max(np.abs(want))))
        check.update(max_abs_difference=diff, against="scikit-learn on the store's codes")
        if diff > SELF_CHECK_TOLERANCE * scale:
            raise ExportError(f"the folded layers of {record.name} v{record.version} differ from scikit-learn's "
                              f"output by up to {diff:.3g} (tolerated: {SELF_CHECK_TOLERANCE * scale:g}) on {len(X)} "
                              "stored codes; nothing was exported. This is a bug of cnncodes' export: please "
                              "report it with the model's metadata.json.")
    details = {"kind": "linear-probe", "classifier": meta.get("classifier"), "fold": head.description,
               "head_output": head.output, "layer": layer, "pooling": pooling, "feature_dim": dim,
               "backbone": meta.get("backbone"), "backbone_args": meta.get("backbone_args"),
               "weights": meta.get("weights"), "weights_digest": meta.get("weights_digest"),
               "trained_precision": trained_precision, "store": str(store), "preprocess_mode": mode,
               "pca": (meta.get("config") or {}).get("pca"), "l2_normalize": (meta.get("config") or {}).get(
                   "l2_normalize")}
    return Built(model, record, size, mode, meta.get("resize") or "stretch",
                 "scores" if head.output == "scores" else "probabilities", details, check)


def _build_finetuned(registry: str | Path, record: ModelRecord) -> Built:
    from ..finetune import load_finetuned
    from ..finetune.network import preprocess_positions

    keras = runtime.keras()
    meta = record.metadata
    path, record = ModelRegistry(registry).load(record.name, record.version)  # checks the file's sha256
    original = load_finetuned(path)
    layers = original.layers
    idx = preprocess_positions(original)
    if len(idx) != 1:
        raise ExportError(f"the network of {record.name} v{record.version} has {len(idx)} preprocessing layers "
                          "where cnncodes' fine-tuning puts one; it is not a model export knows.")
    mode = str(getattr(layers[idx[0]], "mode", meta.get("preprocess_layer") or "none"))
    size = int(meta.get("input_size") or original.input_shape[1])
    inp = keras.Input((size, size, 3), dtype="float32", name="image")
    pre = preprocess_layer(mode)
    x = pre(inp) if pre is not None else inp
    rest = layers[idx[0] + 1:]
    if rest and rest[-1].name == "ensemble_average":  # networks side by side (fine-tune --ensemble), averaged
        x = rest[-1]([network(x) for network in rest[:-1]])
    else:
        for layer in rest:  # the body and the head: one chain after the preprocessing
            x = layer(x)
    model = float32_copy(keras.Model(inp, x, name=f"cnncodes_{record.name}"[:60].replace("-", "_").replace(".", "_")))
    _check_standard(model, record)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, size, size, 3)).astype(np.float32)
    want = np.asarray(original.predict(images, verbose=0), np.float64)
    got = np.asarray(model.predict(images, verbose=0), np.float64)
    diff = float(np.max(np.abs(got - want)))
    mixed = str(meta.get("precision") or "float32") != "float32"
    tol = 1e-2 if mixed else SELF_CHECK_TOLERANCE
    if diff > tol:
        raise ExportError(f"the rebuilt network of {record.name} v{record.version} differs from the registered one "
                          f"by up to {diff:.3g} on random images (tolerated: {tol:g}); nothing was exported. Its "
                          "layers may not form one chain after the preprocessing layer.")
    details = {"kind": "fine-tuned", "backbone": meta.get("backbone"), "backbone_args": meta.get("backbone_args"),
               "weights": meta.get("weights"), "trained_precision": meta.get("precision"),
               "cut_layer": (meta.get("config") or {}).get("cut_layer"), "preprocess_mode": mode}
    return Built(model, record, size, mode, meta.get("resize") or "stretch", "probabilities", details,
                 {"images": 4, "max_abs_difference": diff, "against": "the registered network on random images"})


def preprocessing_text(mode: str) -> str:
    return PREPROCESSING_TEXT.get(mode, mode)
