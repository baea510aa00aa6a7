"""Flow ``transfer``: measure size and similarity, choose among the four cases, run that branch,
gate the champion, and write the decision report. The product's main entry point."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks.backbones import BackboneSpec, is_model_file, parse_backbone_args
from tasks.extract import spec_dict
from tasks.prefect_tasks import champion_gate, decide_case, decision_report, inspect_backbone
from tasks.transfer import (DEFAULT_GATE_MARGIN, DEFAULT_LARGE_PER_CLASS, DEFAULT_SIMILARITY_MARGIN, Thresholds,
                            candidate_layers, top_freeze_for)

from flows.extract_features import extract_features
from flows.fine_tune import fine_tune
from flows.sweep import sweep
from flows.train_linear import train_linear


@flow(name="transfer", log_prints=True, flow_run_name="transfer {backbone} on {data}")
def transfer(
    data: str,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    backbone_args: dict[str, Any] | None = None,
    input_size: int | None = None,
    preprocessing: str = "auto",
    precision: str = "auto",
    layers: list[str] | None = None,
    case: int | None = None,
    layer: str | None = None,
    large_per_class: int = DEFAULT_LARGE_PER_CLASS,
    similarity_margin: float = DEFAULT_SIMILARITY_MARGIN,
    gate_margin: float = DEFAULT_GATE_MARGIN,
    from_scratch: bool = False,
    classifier: str = "softmax",
    epochs: int = 10,
    head_epochs: int = 3,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    max_similarity_images: int = 2000,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    model_name: str | None = None,
    registry: str | None = None,
    out: str = "cnncodes-out",
) -> dict:
    """Decide the case for ``data`` and ``backbone`` from measurements, train, gate, report.

    Returns the case, the measurements behind it, the champion (name, version, metrics) and paths."""
    spec = BackboneSpec(backbone, weights=weights, input_size=input_size,
                        backbone_args=parse_backbone_args(backbone_args), preprocessing=preprocessing,
                        precision=precision, seed=seed).validate()
    thresholds = Thresholds(large_per_class, similarity_margin, gate_margin).validate()
    registry = registry or str(Path(out) / "registry")
    data_name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    name = model_name or f"{data_name}-{Path(backbone).stem if is_model_file(backbone) else backbone}"

    listing = inspect_backbone(spec_dict(spec))
    cands = list(layers) if layers else candidate_layers(listing)
    late = cands[-1] if layers else listing[-1]["name"]
    print(f"candidate layers: {', '.join(cands)}")
    extracted = extract_features(data, backbone=backbone, layers=cands, pooling="avg", weights=weights,
                                 backbone_args=spec.backbone_args, input_size=input_size, preprocessing=preprocessing,
                                 precision=precision, batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction,
                                 seed=seed, out=out)
    swept = sweep(extracted["store"], layers=cands, pooling="avg", classifier=classifier, out=out, seed=seed,
                  max_images=max_similarity_images)
    decision = decide_case(extracted["manifest"], swept["rows"], late, thresholds.__dict__,
                           pretrained=spec.weights != "none", force_case=case, force_layer=layer,
                           top_freeze=top_freeze_for(listing), from_scratch=from_scratch)
    print(f"case {decision['case']}: {decision['description']}. {decision['reason']}")

    probe = train_linear(extracted["store"], decision["probe_layer"], "avg", classifier=classifier,
                         model_name=f"{name}-probe", registry=registry, out=out, seed=seed)
    finetuned = None
    if decision["finetune"]:
        finetuned = fine_tune(data, backbone=backbone, weights="none" if decision["from_scratch"] else weights,
                              backbone_args=spec.backbone_args, input_size=input_size, preprocessing=preprocessing,
                              precision=precision, freeze=decision["freeze"] or "none", epochs=epochs,
                              head_epochs=0 if decision["from_scratch"] else head_epochs,
                              learning_rate=learning_rate if not decision["from_scratch"] else max(learning_rate, 1e-3),
                              optimizer="sgd" if not decision["from_scratch"] else "adam", batch_size=batch_size,
                              val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                              model_name=f"{name}-finetuned", registry=registry, out=out)
    gate = champion_gate(finetuned, probe, thresholds.gate_margin, registry)
    champion = finetuned if gate["promoted"] == "finetuned" else probe
    result = {"case": decision["case"], "description": decision["description"], "decision": decision,
              "gate": gate, "champion": {"name": champion["model"], "version": champion["version"],
                                         "metrics": champion["metrics"]},
              "probe": {"name": probe["model"], "version": probe["version"], "metrics": probe["metrics"],
                        "report": probe["report"]},
              "finetuned": None if finetuned is None else {
                  "name": finetuned["model"], "version": finetuned["version"], "metrics": finetuned["metrics"],
                  "report": finetuned["report"]},
              "store": extracted["store"], "sweep_plot": swept["plot"], "registry": str(Path(registry).resolve())}
    result["report"] = decision_report(result, str(Path(out) / "reports" / f"{name}.transfer.md"))
    print(f"champion: {champion['model']} v{champion['version']} ({gate['reason']}); report: {result['report']}")
    return result
