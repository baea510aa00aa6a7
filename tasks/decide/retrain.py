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
            "spec": prov.get("spec"), "resize": prov.get("resize") or "stretch",
            "split_seed": prov.get("split_seed") or 0,
            "val_fraction": (prov.get("split_fractions") or {}).get("val", 0.2),
            "test_fraction": (prov.get("split_fractions") or {}).get("test", 0.0)}


def split_settings(registry: str | Path, name: str) -> dict[str, Any]:
    """``{"val", "test", "seed"}``: how the champion's dataset was split, to rescan it the same way."""
    meta = champion_record(registry, name).metadata
    out = {"val": 0.2, "test": 0.0, "seed": 0}
    if meta.get("kind") == "linear-probe":
        prov = open_store(meta["store"]).provenance
        out.update({k: v for k, v in (prov.get("split_fractions") or {}).items() if k in ("val", "test")})
        out["seed"] = prov.get("split_seed") or 0
    elif meta.get("kind") == "fine-tuned":
        out["seed"] = meta.get("config", {}).get("seed", 0)
    return out


def decide_promotion(champion: dict[str, Any], challenger: dict[str, Any], margin: float) -> dict[str, Any]:
    """Champion and challenger metrics ({split: {accuracy, ...}}) on the same data: promote only a
    challenger whose accuracy exceeds the champion's by more than ``margin`` (test split if both
    have it, else val). A tie keeps the champion."""
    split = "test" if "test" in champion and "test" in challenger else "val"
    if split not in champion or split not in challenger:
        raise ParameterError("champion and challenger need a val or test split in common to be compared; "
                             "extract with --val-fraction > 0.")
    a, b = champion[split]["accuracy"], challenger[split]["accuracy"]
    promote = b > a + margin
    return {"split": split, "champion_accuracy": a, "challenger_accuracy": b, "margin": margin, "promote": promote,
            "reason": (f"challenger {b:.4f} vs champion {a:.4f} on {split}: "
                       + ("wins by more than" if promote else "does not win by more than") + f" {margin:g}")}


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
