"""Flow ``retrain``: rescan, extract only what is new, train a challenger the champion's way,
judge both on the lineage's pinned holdout, promote only a clear winner. Meant to run on a schedule."""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.backbones import BackboneSpec
from tasks.extract import ExtractOptions
from tasks.finetune import FineTuneConfig, precision_of
from tasks.decide.retrain import one_at_a_time
from tasks.probe.linear import LinearConfig
from tasks.prefect_tasks import (evaluate_champion, promote_or_keep, retrain_plan, retrain_split_settings,
                                  scan_dataset)
from tasks.results import RetrainResult
from tasks.settings import Output, SplitConfig
from tasks.runtime import use_backend

from flows.extract_features import extract_features
from flows.fine_tune import fine_tune
from flows.train_linear import train_linear


@flow(name="retrain", log_prints=True, flow_run_name="retrain {model}")
def retrain(data: str, model: str, output: Output = Output(), margin: float = 0.0,
            force: bool = False, rehash: bool = False, group_by: str | None = None) -> RetrainResult:
    """Retrain lineage ``model`` (a registry name in ``output.registry``) on ``data`` if the data changed
    (or ``force``), with the champion's own settings, rebuilt from its metadata.

    The lineage's pinned splits keep every image it has seen on its side: test images stay out of
    training, new test images come only from new data. Returns a RetrainResult (``retrained``, ``reason``,
    ``champion``, ...); the registry's ``champion`` alias moves only when the challenger's test accuracy beats the
    champion's by more than ``margin`` on the same images, with a paired bootstrap interval of the
    difference above zero; images the lineage trained on are never judged on. ``rehash``: read and hash
    every file again instead of trusting the stat cache of the last scan. One retraining of a lineage at a
    time: another one meanwhile (a schedule firing while a run by hand goes on) is refused, naming it."""
    use_backend(output.backend)  # Keras's backend for this process: before anything imports Keras
    with one_at_a_time(output.registry_path, model):  # a second retraining of the lineage meanwhile is refused
        return _retrain(data, model, output, margin, force, rehash, group_by)


def _retrain(data: str, model: str, output: Output, margin: float, force: bool, rehash: bool,
             group_by: str | None) -> RetrainResult:
    """The retraining itself (see :func:`retrain`), with the lineage held."""
    registry = output.registry_path
    output = output.model_copy(update={"registry": registry})
    manifest_path = str(output.runs / f"retrain-{model}.manifest.json")
    split = retrain_split_settings(registry, model)
    group_by = group_by or split.get("group_by")  # the lineage's own grouping unless told otherwise
    scanned = scan_dataset(data, manifest_path, split["val"], split["test"], split["seed"], split["pinned"],
                           rehash, group_by=group_by)
    split_cfg = SplitConfig(val_fraction=split["val"], test_fraction=split["test"], seed=split["seed"],
                            pinned=split["pinned"], rehash=rehash, group_by=group_by)
    plan = retrain_plan(registry, model, manifest_path)
    if not plan["changed"] and not force:
        print(plan["reason"])
        create_markdown_artifact(f"**No retraining**: {plan['reason']}.", key="retrain-result")
        return RetrainResult(retrained=False, reason=plan["reason"], champion=plan["champion_version"],
                             images=scanned["images"])
    champion_version = plan["champion_version"]
    st = plan["settings"]
    if plan["kind"] == "linear-probe":
        extracted = extract_features(
            data, BackboneSpec.model_validate(st["spec"]),
            ExtractOptions(layers=[st["layer"]], pooling=st["pooling"], store=st["store"], resize=st["resize"]),
            split_cfg, output)
        print(f"extracted {extracted.computed} new or changed images ({extracted.reused} reused)")
        challenger = train_linear(st["store"], st["layer"], st["pooling"], LinearConfig.model_validate(st["config"]),
                                  model_name=model, output=output)
        store = st["store"]
        extracted_new = extracted.computed
    else:
        finetune = FineTuneConfig.model_validate({**st["config"], "resize": st["resize"]})
        spec = BackboneSpec.model_validate({**st["spec"], "precision": precision_of(st["spec"], st["config"])})
        challenger = fine_tune(data, spec, finetune, split_cfg, model_name=model, output=output)
        store = None
        extracted_new = None
    champion_metrics = evaluate_champion(registry, model, champion_version, plan["kind"], store, manifest_path,
                                         output.reports)
    event = promote_or_keep(registry, model, champion_version, challenger.version, champion_metrics,
                            challenger.metrics, margin)
    print(event["reason"] + (f": v{challenger.version} is the new champion" if event["promote"]
                             else f": v{champion_version} stays champion"))
    create_markdown_artifact(f"**{'Promoted' if event['promote'] else 'Kept'}**: {event['reason']}.",
                             key="retrain-result")
    return RetrainResult(retrained=True, reason=plan["reason"], promoted=event["promote"],
                         champion=event["champion_after"], challenger=challenger.version, decision=event,
                         challenger_report=challenger.report, extracted=extracted_new, images=scanned["images"])
