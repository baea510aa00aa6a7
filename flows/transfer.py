"""Flow ``transfer``: measure size and similarity, choose among the four cases, run that branch,
gate the champion, and write the decision report. The product's main entry point."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.backbones import BackboneSpec, is_model_file
from tasks.extract import ExtractOptions, spec_dict
from tasks.finetune import FineTuneConfig
from tasks.finetune.config import TRANSFER_FINETUNE
from tasks.probe.linear import LinearConfig
from tasks.prefect_tasks import champion_gate, dataset_media, decide_case, decision_report, inspect_backbone
from tasks.results import TransferResult
from tasks.settings import Output, SplitConfig
from tasks.decide.transfer import Thresholds, candidate_codes, candidate_layers, top_freeze_for
from tasks.runtime import use_backend

from flows.extract_features import extract_features
from flows.fine_tune import fine_tune
from flows.sweep import SWEEP_PROBE, sweep
from flows.train_linear import train_linear


__all__ = ["TRANSFER_FINETUNE", "transfer"]


@flow(name="transfer", log_prints=True, flow_run_name="transfer {backbone.name} on {data}")
def transfer(
    data: str,
    backbone: BackboneSpec = BackboneSpec(),
    thresholds: Thresholds = Thresholds(),
    probe: LinearConfig = LinearConfig(),
    finetune: FineTuneConfig = TRANSFER_FINETUNE,
    split: SplitConfig = SplitConfig(),
    model_name: str | None = None,
    output: Output = Output(),
) -> TransferResult:
    """Decide the case for ``data`` and ``backbone`` from measurements, train, gate, report.

    ``thresholds`` holds the size and similarity thresholds, the gate margin and what may be forced;
    ``probe`` trains the linear probe (always); ``finetune`` the fine-tuned model of cases 3 and 4,
    whose freezing, optimizer and weights the decision sets. Extraction uses ``finetune.batch_size``.
    Returns the case, the measurements behind it, the champion (name, version, metrics) and paths."""
    use_backend(output.backend)  # Keras's backend for this process: before anything imports Keras
    registry = output.registry_path
    output = output.model_copy(update={"registry": registry})
    data_name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    name = model_name or f"{data_name}-{Path(backbone.name).stem if is_model_file(backbone.name) else backbone.name}"

    listing = inspect_backbone(spec_dict(backbone))
    cands = list(thresholds.layers) if thresholds.layers else candidate_layers(listing)
    late = cands[-1] if thresholds.layers else listing[-1]["name"]
    # sound: time poolings beside avg, where the map is wide enough for their segments
    codes = candidate_codes(listing, cands, dataset_media(data))
    poolings = list(dict.fromkeys(p for _, p in codes))
    print(f"candidate layers: {', '.join(cands)}; poolings: {', '.join(poolings)}")
    extracted = extract_features(data, backbone, ExtractOptions(layers=[f"{c}:{p}" for c, p in codes],
                                                                batch_size=finetune.batch_size), split, output)
    swept = sweep(extracted.store, layers=cands, pooling="avg" if poolings == ["avg"] else None,
                  linear=SWEEP_PROBE.model_copy(update={"classifier": probe.classifier, "seed": probe.seed}),
                  output=output, max_images=thresholds.max_similarity_images)
    decision = decide_case(extracted.manifest, swept.rows, late, thresholds.as_dict(),
                           pretrained=backbone.weights != "none", force_case=thresholds.case,
                           force_layer=thresholds.layer, top_freeze=top_freeze_for(listing),
                           from_scratch=thresholds.from_scratch)
    print(f"case {decision['case']}: {decision['description']}. {decision['reason']}")

    probe_result = train_linear(extracted.store, decision["probe_layer"], decision["probe_pooling"], linear=probe,
                                model_name=f"{name}-probe", output=output)
    finetuned = None
    if decision["finetune"]:
        scratch = decision["from_scratch"]
        finetuned = fine_tune(data, backbone.model_copy(update={"weights": "none"}) if scratch else backbone,
                              finetune.model_copy(update={
                                  "freeze": decision["freeze"] or "none",
                                  "head_epochs": 0 if scratch else finetune.head_epochs,
                                  "learning_rate": max(finetune.learning_rate, 1e-3) if scratch
                                  else finetune.learning_rate,
                                  "optimizer": "adam" if scratch else finetune.optimizer}),
                              split, model_name=f"{name}-finetuned", output=output)
    gate = champion_gate(None if finetuned is None else finetuned.as_dict(), probe_result.as_dict(), thresholds.gate_margin, registry)
    champion = finetuned if gate["promoted"] == "finetuned" else probe_result
    result = {"case": decision["case"], "description": decision["description"], "decision": decision,
              "gate": gate, "champion": {"name": champion.model, "version": champion.version,
                                         "metrics": champion.metrics},
              "probe": {"name": probe_result.model, "version": probe_result.version,
                        "metrics": probe_result.metrics, "report": probe_result.report},
              "finetuned": None if finetuned is None else {
                  "name": finetuned.model, "version": finetuned.version, "metrics": finetuned.metrics,
                  "report": finetuned.report},
              "store": extracted.store, "sweep_plot": swept.plot, "registry": str(Path(registry).resolve())}
    result["report"] = decision_report(result, str(Path(output.reports) / f"{name}.transfer.md"))
    print(f"champion: {champion.model} v{champion.version} ({gate['reason']}); report: {result['report']}")
    return TransferResult(**result)
