"""Flow ``retrain``: rescan, extract only what is new, train a challenger the champion's way,
judge both on the same holdout, promote only a clear winner. Meant to run on a schedule."""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.finetune import precision_of
from tasks.prefect_tasks import (evaluate_champion, promote_or_keep, retrain_plan, retrain_split_settings,
                                  scan_dataset)

from flows.extract_features import extract_features
from flows.fine_tune import fine_tune
from flows.train_linear import train_linear


@flow(name="retrain", log_prints=True, flow_run_name="retrain {model}")
def retrain(data: str, model: str, registry: str = "cnncodes-out/registry", margin: float = 0.0,
            force: bool = False, out: str = "cnncodes-out") -> dict:
    """Retrain lineage ``model`` (a registry name) on ``data`` if the data changed (or ``force``).

    Returns ``{"retrained", "reason", "champion", ...}``; the registry's ``champion`` alias moves only
    when the challenger's accuracy beats the champion's by more than ``margin`` on the same split."""
    manifest_path = str(Path(out) / "runs" / f"retrain-{model}.manifest.json")
    split = retrain_split_settings(registry, model)
    scanned = scan_dataset(data, manifest_path, split["val"], split["test"], split["seed"])
    plan = retrain_plan(registry, model, manifest_path)
    if not plan["changed"] and not force:
        print(plan["reason"])
        create_markdown_artifact(f"**No retraining**: {plan['reason']}.", key="retrain-result")
        return {"retrained": False, "reason": plan["reason"], "champion": plan["champion_version"],
                "images": scanned["images"]}
    champion_version = plan["champion_version"]
    if plan["kind"] == "linear-probe":
        st = plan["settings"]
        spec = st["spec"]
        extracted = extract_features(data, backbone=spec["name"], layers=[st["layer"]], pooling=st["pooling"],
                                     store=st["store"], weights=spec["weights"], backbone_args=spec["backbone_args"],
                                     input_size=spec["input_size"], preprocessing=spec["preprocessing"],
                                     precision=spec["precision"], resize=st["resize"],
                                     val_fraction=st["val_fraction"], test_fraction=st["test_fraction"],
                                     seed=st["split_seed"], out=out)
        print(f"extracted {extracted['computed']} new or changed images ({extracted['reused']} reused)")
        cfg = st["config"]
        challenger = train_linear(st["store"], st["layer"], st["pooling"], classifier=cfg["classifier"], C=cfg["C"],
                                  cv_folds=cfg["cv_folds"], class_weight=cfg["class_weight"],
                                  l2_normalize=cfg["l2_normalize"], pca=cfg["pca"], calibrate=cfg["calibrate"],
                                  sgd_epochs=cfg["sgd_epochs"], chunk_rows=cfg["chunk_rows"], model_name=model,
                                  registry=registry, out=out, seed=cfg["seed"])
        store = st["store"]
        extracted_new = extracted["computed"]
    else:
        cfg, spec = plan["settings"]["config"], plan["settings"]["spec"]
        challenger = fine_tune(data, backbone=spec["name"], weights=spec["weights"], backbone_args=spec["backbone_args"],
                               input_size=spec["input_size"], preprocessing=spec["preprocessing"],
                               cut_layer=cfg["cut_layer"], freeze=cfg["freeze"], freeze_batchnorm=cfg["freeze_batchnorm"],
                               head_pooling=cfg["head_pooling"], dense=cfg["dense"], dropout=cfg["dropout"],
                               optimizer=cfg["optimizer"], learning_rate=cfg["learning_rate"],
                               momentum=cfg["momentum"], head_lr_multiplier=cfg["head_lr_multiplier"],
                               schedule=cfg["schedule"], epochs=cfg["epochs"], head_epochs=cfg["head_epochs"],
                               head_learning_rate=cfg["head_learning_rate"], batch_size=cfg["batch_size"],
                               augment=cfg["augment"], monitor=cfg["monitor"], patience=cfg["patience"],
                               precision=precision_of(spec, cfg), xla=cfg["xla"],
                               resize=plan["settings"]["resize"], val_fraction=split["val"],
                               test_fraction=split["test"], seed=cfg["seed"], model_name=model,
                               registry=registry, out=out)
        store = None
        extracted_new = None
    champion_metrics = evaluate_champion(registry, model, champion_version, plan["kind"], store, manifest_path,
                                         str(Path(out) / "reports"))
    event = promote_or_keep(registry, model, champion_version, challenger["version"], champion_metrics,
                            challenger["metrics"], margin)
    print(event["reason"] + (f": v{challenger['version']} is the new champion" if event["promote"]
                             else f": v{champion_version} stays champion"))
    create_markdown_artifact(f"**{'Promoted' if event['promote'] else 'Kept'}**: {event['reason']}.",
                             key="retrain-result")
    return {"retrained": True, "reason": plan["reason"], "promoted": event["promote"],
            "champion": event["champion_after"], "challenger": challenger["version"], "decision": event,
            "challenger_report": challenger["report"], "extracted": extracted_new, "images": scanned["images"]}
