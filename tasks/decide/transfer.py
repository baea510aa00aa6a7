"""Choosing among the four cases of transfer learning, from measurements.

* **Size**: images per class in the train split (the median over classes, so one rare class does
  not flip the decision). Default threshold: 500 per class. Below a few hundred images per class,
  fine-tuning millions of weights overfits and a linear probe on frozen codes is as good or better
  (the hymenoptera set, about 120 per class, shows fine-tuning's edge within the noise); ImageNet
  itself has about 1,000 per class.
* **Similarity** to the backbone's source domain: a linear probe is cross-validated on the codes of
  the last layer and of earlier layers (one per resolution). If the last layer scores at least as
  well as the best earlier one (within ``similarity_margin``), the high-level features transfer:
  the data is *similar*. If an earlier layer wins, the generic low-level features are what carry
  over: *different*. Random weights (``--weights none``) carry no source domain: *different*.

Case 1 small+similar: probe on the last layer. Case 2 small+different: probe on the best earlier
layer. Case 3 large+similar: fine-tune the top of the network from the pretrained weights. Case 4
large+different: fine-tune all layers (or from scratch). On large data the probe is trained too and
the fine-tuned model must beat it by ``gate_margin`` on the same held-out split to be promoted.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, model_validator

from storage.errors import ParameterError
from storage.files import atomic_write
from storage.manifest import Manifest

from ..backbones.build import time_segments
from ..settings import Settings
from . import evidence

DEFAULT_LARGE_PER_CLASS = 500
DEFAULT_SIMILARITY_MARGIN = 0.02
DEFAULT_GATE_MARGIN = 0.01
CASES = {1: "small + similar: linear classifier on codes of a late layer, backbone frozen",
         2: "small + different: linear classifier on codes of an earlier layer",
         3: "large + similar: fine-tune the top of the network from the pretrained weights",
         4: "large + different: fine-tune the whole network (or train from scratch)"}


class Thresholds(Settings):
    """How the transfer flow decides: the thresholds of size and similarity, the champion gate, and
    what may be forced instead of measured."""

    large_per_class: int = Field(DEFAULT_LARGE_PER_CLASS, ge=1, description="median training images per class "
                                                                            "from which data is 'large'")
    similarity_margin: float = Field(DEFAULT_SIMILARITY_MARGIN, ge=-1, le=1,
                                     description="similar when the last layer's CV score >= the best earlier "
                                                 "layer's minus this")
    gate_margin: float = Field(DEFAULT_GATE_MARGIN, ge=-1, le=1, description="a fine-tuned model must beat the probe "
                                                                             "by this accuracy to be champion")
    layers: list[str] = Field(default_factory=list, description="candidate layers to compare, the last one the late "
                                                               "layer (default: the end of each stage at strides "
                                                               "8, 16, 32 plus the last layer)")
    max_similarity_images: int = Field(2000, ge=2, description="stratified sample of images the similarity "
                                                               "measurement cross-validates on")
    case: int | None = Field(None, description="force a case (1-4) instead of measuring")
    layer: str | None = Field(None, description="force the linear probe's layer")
    from_scratch: bool = Field(False, description="case 4 trains from random weights")

    @model_validator(mode="after")
    def _check(self) -> "Thresholds":
        if self.case is not None and self.case not in CASES:
            raise ParameterError(f"case must be 1, 2, 3 or 4; got {self.case!r}.")
        return self


@dataclass
class SizeMeasure:
    train_images: int
    per_class: dict[str, int]
    median_per_class: float
    smallest_class: int
    large: bool
    threshold: int


def measure_size(manifest: Manifest, threshold: int) -> SizeMeasure:
    per = {c: 0 for c in manifest.class_names}
    for s in manifest.samples:
        if s.split == "train":
            per[manifest.class_names[s.label]] += 1
    counts = list(per.values()) or [0]
    med = float(statistics.median(counts))
    return SizeMeasure(sum(counts), per, med, min(counts), med >= threshold, threshold)


@dataclass
class SimilarityMeasure:
    late_layer: str
    late_score: float
    best_early_layer: str | None
    best_early_score: float | None
    difference: float                 # late - best early
    margin: float
    similar: bool
    scores: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    late_pooling: str = "avg"                # the late layer's best pooling
    best_early_pooling: str | None = None


def measure_similarity(sweep_rows: Sequence[dict[str, Any]], late_layer: str, margin: float,
                       pretrained: bool) -> SimilarityMeasure:
    """From a layer sweep's rows ({layer, pooling, mean, std}): does the last layer win?"""
    rows = list(sweep_rows)
    # A layer stored with several poolings (a spectrogram's avg and time-avg) is judged by its best one.
    late_rows = [r for r in rows if r["layer"] == late_layer]
    if not late_rows:
        raise ParameterError(f"the sweep has no score for the late layer {late_layer!r}.")
    late = max(late_rows, key=lambda r: r["mean"])
    early = [r for r in rows if r["layer"] != late_layer]
    best = max(early, key=lambda r: r["mean"]) if early else None
    diff = late["mean"] - (best["mean"] if best else late["mean"])
    similar = diff >= -margin
    note = ""
    if not pretrained:
        similar, note = False, "random weights carry no source domain: treated as different"
    return SimilarityMeasure(late_layer, late["mean"], best["layer"] if best else None,
                             best["mean"] if best else None, diff, margin, similar, rows, note,
                             late.get("pooling", "avg"), best.get("pooling", "avg") if best else None)


@dataclass
class Decision:
    case: int
    reason: str
    forced: bool
    probe_layer: str
    finetune: bool
    freeze: str | None
    from_scratch: bool
    size: SizeMeasure
    similarity: SimilarityMeasure
    probe_pooling: str = "avg"  # the pooling of probe_layer's best sweep row

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["description"] = CASES[self.case]
        return d


def decide(size: SizeMeasure, similarity: SimilarityMeasure, *, force_case: int | None = None,
           force_layer: str | None = None, top_freeze: str | None = None, from_scratch: bool = False) -> Decision:
    """The case, the probe's layer, and whether and how to fine-tune."""
    if force_case is not None and force_case not in CASES:
        raise ParameterError(f"case must be 1, 2, 3 or 4; got {force_case!r}.")
    measured = (3 if similarity.similar else 4) if size.large else (1 if similarity.similar else 2)
    case = force_case or measured
    size_word = "large" if size.large else "small"
    sim_word = "similar" if similarity.similar else "different"
    reason = (f"{size.median_per_class:g} training images per class (median) is {size_word} (threshold "
              f"{size.threshold}); the last layer {similarity.late_layer} scores {similarity.late_score:.3f} against "
              f"{similarity.best_early_score if similarity.best_early_score is not None else float('nan'):.3f} for the "
              f"best earlier layer ({similarity.best_early_layer}): difference {similarity.difference:+.3f}, margin "
              f"{similarity.margin:g}, so {sim_word}" + (f" ({similarity.note})" if similarity.note else "") +
              f". Measured case: {measured}.")
    if force_case:
        reason += f" Case {force_case} was forced."
    if force_layer:
        layer = force_layer
        scored = [r for r in similarity.scores if r["layer"] == force_layer]
        pooling = max(scored, key=lambda r: r["mean"]).get("pooling", "avg") if scored else "avg"
    elif case in (2, 4) and similarity.best_early_layer and similarity.best_early_score is not None \
            and similarity.best_early_score > similarity.late_score:
        layer, pooling = similarity.best_early_layer, similarity.best_early_pooling or "avg"
    else:
        layer, pooling = similarity.late_layer, similarity.late_pooling
    finetune = case in (3, 4)
    freeze = (top_freeze or "none") if case == 3 else ("none" if case == 4 else None)
    return Decision(case, reason, bool(force_case), layer, finetune, freeze, case == 4 and from_scratch,
                    size, similarity, pooling)


SKIPPED_KINDS = ("ZeroPadding2D", "Dropout", "SpatialDropout2D", "InputLayer")


def candidate_layers(layers: Sequence[dict[str, Any]], strides: Sequence[int] = (8, 16, 32)) -> list[str]:
    """The last layer of the network plus, for each stride in ``strides``, the last layer at that
    resolution (the end of each stage): the cut points compared by the similarity measure."""
    last = layers[-1]["name"]
    out: list[str] = []
    for stride in strides:
        # padding and dropout layers only repeat the layer before them (padding adds zeros): skip them
        at = [layer for layer in layers if layer.get("stride") == stride and len(layer["output_shape"]) == 4
              and layer.get("kind") not in SKIPPED_KINDS]
        if at and at[-1]["name"] != last:
            out.append(at[-1]["name"])
    return out + [last]


# A spectrogram's frequency axis means something: sound compares pooling over time only (whole, or in 2 to 4
# segments that keep the order of a word's parts) with global pooling.
SOUND_POOLINGS = ("avg", "time-avg", "time-avg2", "time-avg3", "time-avg4")


def candidate_codes(layers: Sequence[dict[str, Any]], names: Sequence[str], media: str) -> list[tuple[str, str]]:
    """The (layer, pooling) codes the transfer flow extracts for the candidate layers ``names``: ``avg`` for
    images; for sound every pooling of :data:`SOUND_POOLINGS` whose time segments fit the layer's map (a map
    3 columns wide has no 4 segments; a width unknown before the input size is, is assumed wide enough)."""
    if media != "audio":
        return [(name, "avg") for name in names]
    width = {layer["name"]: layer["output_shape"][2] if len(layer["output_shape"]) == 4 else None for layer in layers}
    out = []
    for name in names:
        for pooling in SOUND_POOLINGS:
            if width.get(name) is None or width[name] >= (time_segments(pooling) or 1):
                out.append((name, pooling))
    return out


def top_freeze_for(layers: Sequence[dict[str, Any]], stride: int = 16) -> str | None:
    """Case 3's freezing: everything up to the end of the stride-16 stage; the last stage trains."""
    at = [layer for layer in layers if layer.get("stride") == stride and len(layer["output_shape"]) == 4]
    return f"until:{at[-1]['name']}" if at else None


def gate(finetuned: dict[str, Any] | None, probe: dict[str, Any], margin: float) -> dict[str, Any]:
    """Promote the fine-tuned model only if, on the same held-out images, it beats the probe by
    ``margin`` *and* the paired bootstrap interval of the difference lies above zero. The test split
    decides (no selection step saw it); val only when there is no test split, with a warning.
    Otherwise the probe, the cheaper model, stays champion."""
    split = "test" if "test" in probe["metrics"] and (finetuned is None or "test" in finetuned["metrics"]) else "val"
    out: dict[str, Any] = {"split": split, "margin": margin, "probe_accuracy": probe["metrics"][split]["accuracy"],
                           "finetuned_accuracy": None, "difference": None, "interval": None,
                           "accuracies": {k: {s: m.get("accuracy") for s, m in r["metrics"].items() if s != "train"}
                                          for k, r in (("probe", probe), ("finetuned", finetuned)) if r},
                           "warning": None if split == "test" else (
                               "no test split: the gate decided on val, which the fine-tuned model's early "
                               "stopping and checkpoint choice (and the layer sweep) saw, so its accuracy is "
                               "optimistic; use --test-fraction above 0")}
    if finetuned is None:
        return {**out, "promoted": "probe", "reason": "no fine-tuning for this case"}
    cmp = evidence.compare(probe["metrics"][split]["outcomes"], finetuned["metrics"][split]["outcomes"])
    won = evidence.clear_win(cmp, margin)
    why = ("beats the probe by at least the margin and the interval excludes zero" if won else
           "the difference is below the margin" if cmp["difference"] < margin else
           "the difference is within the noise (the interval reaches " + ("zero" if margin >= 0 else "the margin") + ")")
    return {**out, "probe_accuracy": cmp["a_accuracy"], "finetuned_accuracy": cmp["b_accuracy"],
            "difference": cmp["difference"], "interval": cmp["interval"], "comparison": cmp,
            "promoted": "finetuned" if won else "probe",
            "reason": evidence.describe(cmp, "probe", "fine-tuned", split) + f"; margin {margin:g}: {why}"
            + ("" if won else "; the probe, the cheaper model, stays champion")}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def decision_markdown(d: dict[str, Any]) -> str:
    """The decision report: measurements, the case and why, layer scores, metrics, gate, overrides."""
    dec = d["decision"]
    size, sim = dec["size"], dec["similarity"]
    lines = [f"# Transfer decision: case {dec['case']}", "", f"**{dec['description']}**", "", dec["reason"], "",
             f"The probe uses `{dec['probe_layer']}` with {dec.get('probe_pooling', 'avg')} pooling (its best "
             "pooling in the sweep below).", "",
             "## Size", "", f"- train images: {size['train_images']}, median per class "
             f"{size['median_per_class']:g}, smallest class {size['smallest_class']}",
             f"- large from {size['threshold']} images per class (`--large-per-class`)", "",
             "| class | train images |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in size["per_class"].items()]
    lines += ["", "## Similarity to the backbone's source domain", "",
              f"Linear-probe CV balanced accuracy by layer (train + val); the last layer "
              f"`{sim['late_layer']}` against the best earlier layer `{sim['best_early_layer']}`: difference "
              f"**{sim['difference']:+.3f}**, similar when ≥ −{sim['margin']:g} (`--similarity-margin`)."
              + (f" Note: {sim['note']}." if sim["note"] else ""), "",
              "| layer | pooling | dims | CV balanced accuracy |", "|---|---|---|---|"]
    lines += [f"| `{r['layer']}` | {r['pooling']} | {r['dims']} | {_pct(r['mean'])} ± {_pct(r['std'])} |"
              for r in sim["scores"]]
    if d.get("sweep_plot"):
        lines += ["", f"![layer scores]({Path(d['sweep_plot']).name})"]
    lines += ["", "## Models", "", "| model | version | " + " | ".join(f"{s} accuracy" for s in ("val", "test")) + " |",
              "|---|---|---|---|"]
    for key in ("probe", "finetuned"):
        m = d.get(key)
        if m:
            lines.append(f"| {key}: `{m['name']}` | {m['version']} | "
                         + " | ".join(_pct(m["metrics"].get(s, {}).get("accuracy")) for s in ("val", "test")) + " |")
    lines += ["", "val was seen by selection (the layer sweep; the fine-tuned model's early stopping and checkpoint "
              "choice); test was seen by no selection step."]
    adapted = {s: m["adaptation"] for s, m in ((d.get("finetuned") or {}).get("metrics") or {}).items()
               if m.get("adaptation")}
    if adapted:
        lines += ["", "The fine-tuned model's " + " and ".join(adapted) + " accuracy is measured after AdaBN "
                  "(`--adapt-batchnorm`: its BatchNormalization statistics re-estimated on each group's own files, no "
                  "label): " + "; ".join(
                      f"{s}: {len(a['adapted_groups'])} group(s) adapted, {len(a['kept_groups'])} kept the trained "
                      f"statistics (fewer than {a['min_images']} files), accuracy with the trained statistics "
                      f"{_pct(a['unadapted_accuracy'])}"
                      + (f", then self-trained on each adapted group's own confident predictions (`--self-train "
                         f"{a['self_training']['rounds']}`), AdaBN alone {_pct(a['adabn_accuracy'])}"
                         if a.get("self_training") else "") for s, a in adapted.items()) + "."]
    g = d["gate"]
    lines += ["", "## Champion", "", f"**{g['promoted']}** is the champion: {g['reason']}.", "",
              f"Decided on the **{g['split']}** split. Margin: `--gate-margin {g['margin']:g}`; promotion also needs "
              "the 95% paired bootstrap interval of the accuracy difference to lie above zero. The other model "
              "stays in the registry for inspection."]
    if g.get("warning"):
        lines += ["", f"> **Warning**: {g['warning']}."]
    lines += [
              "", f"Reports: probe `{(d.get('probe') or {}).get('report', '-')}`"
              + (f", fine-tuned `{d['finetuned']['report']}`" if d.get("finetuned") else ""), "",
              "## How to override", "",
              "- force a case: `--case 1|2|3|4`; force the probe's layer: `--layer NAME`",
              "- move the thresholds: `--large-per-class N`, `--similarity-margin X`, `--gate-margin X`",
              "- case 4 from scratch: `--from-scratch`", ""]
    return "\n".join(lines)


def write_decision(path: str | Path, d: dict[str, Any]) -> Path:
    import json

    path = Path(path)
    atomic_write(path, decision_markdown(d))
    atomic_write(path.with_suffix(".json"), json.dumps(d, indent=1, default=str))
    return path
