"""Scheduled retraining: has the data changed, and does the challenger beat the champion?

A model *lineage* is one registry name; its ``champion`` alias (or, before any alias, its latest
version) is the model in service. Retraining adds a challenger version trained the same way on the
current data, evaluates champion and challenger on the same held-out split of the current data, and
moves the alias only when the challenger wins by more than the margin. Every decision is appended
to the lineage's history in the registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import ModelRegistry, open_store
from storage.errors import ParameterError
from storage.registry import RegistryError
from storage.manifest import Manifest

from ..probe.linear import LinearConfig
from . import evidence


def one_at_a_time(registry: str | Path, name: str):
    """A context held for the whole retraining of lineage ``name``: a second one meanwhile is refused
    (:meth:`storage.ModelRegistry.retraining`)."""
    return ModelRegistry(registry).retraining(name)


def champion_record(registry: str | Path, name: str):
    reg = ModelRegistry(registry)
    version = "champion" if "champion" in reg.aliases(name) else None
    return reg.record(name, version)


def retrain_plan(registry: str | Path, name: str, manifest: Manifest) -> dict[str, Any]:
    """What the champion was trained on, and whether the data changed since."""
    rec = champion_record(registry, name)
    meta = rec.metadata
    kind = meta.get("kind")
    if kind not in ("linear-probe", "fine-tuned"):
        raise ParameterError(f"model {name} v{rec.version} is of kind {kind!r}; retrain handles linear probes "
                             "and fine-tuned models.")
    trained_on = meta.get("manifest_fingerprint")
    if kind == "linear-probe" and not meta.get("manifest_fingerprint"):
        raise RegistryError(f"model {name} v{rec.version} does not record the data it was trained on; "
                            "train it again with `cnncodes train-linear`, then retrain.")
    changed = trained_on != manifest.fingerprint()
    return {"name": name, "champion_version": rec.version, "kind": kind, "changed": changed,
            "images": len(manifest.samples), "trained_on": trained_on, "now": manifest.fingerprint(),
            "reason": ("the data changed since the champion was trained" if changed else
                       f"no data change since {name} v{rec.version} was trained: nothing to retrain")}


def probe_settings(registry: str | Path, name: str) -> dict[str, Any]:
    """Everything needed to train a challenger exactly like the champion probe, and to extract its codes."""
    meta = champion_record(registry, name).metadata
    prov = open_store(meta["store"]).provenance
    cfg = LinearConfig.model_validate(meta["config"]).as_dict()
    return {"store": meta["store"], "layer": meta["layer"], "pooling": meta["pooling"], "config": cfg,
            "spec": prov.get("spec"), "resize": prov.get("resize") or "stretch"}


def split_settings(registry: str | Path, name: str) -> dict[str, Any]:
    """``{"val", "test", "seed", "pinned", "group_by"}``: how the lineage's data was split, read from the registry
    (never assumed): the lineage's pinned splits (``pinned`` is their file: the images it names keep
    their split), else the champion's metadata, else (older probes) its store's provenance."""
    reg = ModelRegistry(registry)
    rec = champion_record(registry, name)
    lineage = reg.splits(name)
    group_by = lineage.get("group_by") or (rec.metadata.get("split") or {}).get("group_by")
    if lineage:
        fractions, seed, pinned = lineage.get("fractions") or {}, lineage.get("seed"), str(reg.splits_path(name))
    elif rec.metadata.get("split"):
        fractions, seed, pinned = rec.metadata["split"].get("fractions") or {}, rec.metadata["split"].get("seed"), None
    elif rec.metadata.get("kind") == "linear-probe":
        prov = open_store(rec.metadata["store"]).provenance
        fractions, seed, pinned = prov.get("split_fractions") or {}, prov.get("split_seed"), None
    else:
        raise RegistryError(f"model {name} v{rec.version} does not record how its data was split, so retraining "
                            "cannot keep its test images out of training. Train it again with `cnncodes fine-tune` "
                            "(which records it), then retrain.")
    return {"val": float(fractions.get("val", 0.0)), "test": float(fractions.get("test", 0.0)),
            "seed": int(seed or 0), "pinned": pinned, "group_by": group_by}


def trained_on(registry: str | Path, name: str) -> set[str]:
    """Content hashes the lineage has used for training or validation (pinned train or val): never
    judged on, even if the data now lists them under test."""
    return {h for h, sp in (ModelRegistry(registry).splits(name).get("samples") or {}).items() if sp != "test"}


def decide_promotion(champion: dict[str, Any], challenger: dict[str, Any], margin: float,
                     exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Champion and challenger metrics ({split: {accuracy, outcomes, ...}}) on the same data: promote
    only a challenger whose accuracy exceeds the champion's by more than ``margin`` on the same
    images, with a paired bootstrap interval of the difference above zero (test split if both have
    it, else val with a warning). Images in ``exclude`` (the lineage trained on them) are left out.
    A tie, or a difference within the noise, keeps the champion."""
    split = "test" if "test" in champion and "test" in challenger else "val"
    if split not in champion or split not in challenger:
        raise ParameterError("champion and challenger need a val or test split in common to be compared; "
                             "extract with --test-fraction > 0.")
    cmp = evidence.compare(champion[split]["outcomes"], challenger[split]["outcomes"], exclude=exclude)
    promote = evidence.clear_win(cmp, margin, strict=True)
    why = ("wins by more than the margin and the interval excludes zero" if promote else
           "does not win by more than the margin" if cmp["difference"] <= margin else
           "wins by less than the noise (the interval reaches " + ("zero" if margin >= 0 else "the margin") + ")")
    return {"split": split, "champion_accuracy": cmp["a_accuracy"], "challenger_accuracy": cmp["b_accuracy"],
            "difference": cmp["difference"], "interval": cmp["interval"], "images": cmp["images"],
            "excluded": cmp["excluded"], "mcnemar_p": cmp["mcnemar_p"], "margin": margin, "promote": promote,
            "warning": None if split == "test" else "no test split: judged on val, which early stopping saw",
            "reason": evidence.describe(cmp, "champion", "challenger", split) + f"; margin {margin:g}: {why}"}


def apply_promotion(registry: str | Path, name: str, champion_version: int, challenger_version: int,
                    decision: dict[str, Any]) -> dict[str, Any]:
    """Move the champion alias when the challenger won; record the decision either way."""
    reg = ModelRegistry(registry)
    if decision["promote"]:
        reg.set_alias(name, "champion", challenger_version)
    elif "champion" not in reg.aliases(name):
        reg.set_alias(name, "champion", champion_version)  # make the incumbent explicit
    event = {"event": "retrain", "champion_before": champion_version, "challenger": challenger_version,
             "champion_after": challenger_version if decision["promote"] else champion_version, **decision}
    reg.record_event(name, event)
    return event
