"""Thin Prefect wrappers over the plain task functions.

Each wrapper only adapts arguments (paths and small dicts in, small dicts
out), reports progress, and sets retries. The work is in the plain functions,
which tests call directly. Retries apply to transient failures only: a
:class:`~storage.errors.CnncodesError` is the user's to fix and is not retried.
"""
from __future__ import annotations

import errno

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.errors import CnncodesError
from storage.manifest import Manifest

from . import extract, finetune, predict, probe, reports, runtime
from .data import datasets
from .decide import retrain, transfer
from .backbones import BackboneSpec
from .probe.linear import LinearConfig
from .progress import Progress


# operating-system refusals that a retry cannot overcome: a full disk, a denied permission, a read-only disk
USER_FIXES = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def transient_only(task_, task_run, state) -> bool:
    """Retry condition: retry unless the failure is one the user has to fix."""
    try:
        state.result()
    except CnncodesError:
        return False
    except OSError as exc:
        return exc.errno not in USER_FIXES
    except Exception:  # noqa: BLE001 - anything else (I/O, a flaky disk) may pass
        return True
    return False


def _metrics_artifact(metrics: dict[str, dict], key: str) -> None:
    create_table_artifact([{"split": s, "images": m["images"], "accuracy": round(m["accuracy"], 4),
                            "balanced_accuracy": round(m["balanced_accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}
                           for s, m in metrics.items()], key=key, description="Metrics per split")


@task(name="scan-dataset", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def scan_dataset(data: str, manifest_path: str, val_fraction: float, test_fraction: float, seed: int,
                 pinned: str | None = None, rehash: bool = False, group_by: str | None = None) -> dict:
    """Scan ``data`` into a manifest JSON at ``manifest_path``; returns a small summary. ``pinned``: a JSON
    file of splits that images must keep (see :func:`tasks.data.datasets.load_pinned`). The scan's stat
    cache lives beside the manifest (``<manifest_path>.statcache``): a re-run reads only the files whose
    stat changed, unless ``rehash``."""
    bar = Progress("hashing images", unit="file", key="scan-dataset")
    stats: dict[str, Any] = {}
    try:
        manifest = datasets.scan_dataset(data, val_fraction, test_fraction, seed, progress=bar,
                                         pinned=datasets.load_pinned(pinned) if pinned else None,
                                         cache=datasets.cache_path_for(manifest_path), rehash=rehash, stats=stats,
                                         group_by=group_by)
    finally:
        bar.close()
    fingerprint = manifest.fingerprint()
    manifest.save(manifest_path, fingerprint)
    return {"manifest": manifest_path, "images": len(manifest.samples), "classes": manifest.class_names,
            "layout": manifest.layout, "skipped": len(manifest.skipped), "fingerprint": fingerprint,
            "media": manifest.media, "files_read": stats["read"], "files_reused": stats["reused"]}


@task(name="dataset-media", cache_policy=NO_CACHE)
def dataset_media(data: str) -> str:
    """``"audio"`` or ``"image"``: what ``data`` holds, by its files' extensions (nothing is read)."""
    return datasets.peek_media(data)


# The store is the cache: extraction checks it (content hashes) and computes only what is missing,
# so Prefect's result cache would add nothing but a way to go stale when a store is deleted.
@task(name="extract-codes", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def extract_codes(manifest_path: str, store: str, spec: dict[str, Any], cuts: list[list[str]],
                  options: dict[str, Any], gpus: int = 0) -> dict:
    """Bring the store up to date for the manifest; returns the extraction summary. ``gpus`` (0 or 1
    here) says a GPU was asked for: its absence is then an error, not a silent run on the CPU."""
    if gpus:
        extract.require_gpus(gpus)
    manifest = Manifest.load(manifest_path)
    bar = Progress("extracting codes", unit="img", key="extract-codes")
    try:
        return extract.extract_to_store(manifest, store, BackboneSpec.model_validate(spec), [tuple(c) for c in cuts],
                                        extract.ExtractOptions.model_validate(options), progress=bar)
    finally:
        bar.close()


@task(name="extract-report", cache_policy=NO_CACHE)
def extract_report(summary: dict, report_path: str) -> str:
    """Write the Markdown report and publish it, with tables, as Prefect artifacts."""
    text = reports.extract_markdown(summary)
    path = reports.write_report(report_path, text, summary)
    create_markdown_artifact(text, key="extract-report", description=f"Extraction into {summary['store']}")
    create_table_artifact(reports.extract_table(summary), key="extract-counts",
                          description="Images computed, reused, removed and skipped; timings in seconds")
    if summary["skipped"]:
        create_table_artifact(summary["skipped"], key="extract-skipped", description="Files skipped, with the reason")
    return str(Path(path).resolve())


@task(name="fit-probe", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def fit_probe(store: str, layer: str, pooling: str | None, config: dict[str, Any], registry: str,
              name: str | None) -> dict:
    """Train a linear probe on the store's train split and register it."""
    bar = Progress("SGD epochs", unit="epoch", key="fit-probe")
    try:
        return probe.fit_probe(store, layer, pooling, LinearConfig.model_validate(config), registry, name, progress=bar)
    finally:
        bar.close()


@task(name="evaluate-probe", cache_policy=NO_CACHE)
def evaluate_probe(registry: str, name: str, version: int, store: str | None, report_dir: str) -> dict:
    """Evaluate on every split, write the report and plots, publish them as artifacts."""
    result = probe.evaluate_probe(registry, name, version, store, report_dir=report_dir)
    create_markdown_artifact(Path(result["report"]).read_text(), key="probe-report",
                             description=f"Linear probe {name} v{version}")
    _metrics_artifact(result["metrics"], "probe-metrics")
    for split in ("val", "test"):
        if split in result["metrics"]:
            names = result["class_names"]
            create_table_artifact([{"true": names[i], **{f"pred {names[j]}": v for j, v in enumerate(row)}}
                                   for i, row in enumerate(result["metrics"][split]["confusion"])],
                                  key=f"probe-confusion-{split}", description=f"Confusion matrix ({split})")
    return result


@task(name="sweep-layers", cache_policy=NO_CACHE)
def sweep_layers(store: str, layers: list[str] | None, pooling: str | None, config: dict[str, Any],
                 report_dir: str, max_images: int | None = None) -> dict:
    result = probe.sweep_layers(store, probe.resolve_groups(store, layers, pooling), LinearConfig.model_validate(config),
                                report_dir, max_images)
    create_table_artifact(result["rows"], key="layer-sweep", description=f"Probe CV score by layer; best: "
                          f"{result['best']['layer']}/{result['best']['pooling']}")
    create_markdown_artifact(Path(result["report"]).read_text(), key="layer-sweep-report")
    return result


@task(name="predict-images", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def predict_images(source: str, registry: str, name: str, version: int | str | None, output: str,
                   options: dict[str, Any] | None, group_by: str | None = None) -> dict:
    bar = Progress("extracting codes", unit="img", key="predict-codes")
    trained = Progress("self-training per group", unit="epoch", key="predict-self-training")  # shown once told
    try:
        opts = extract.ExtractOptions.model_validate(options) if options else None
        result = predict.predict_images(source, registry, name, version, output, opts, progress=bar, group_by=group_by,
                                        self_train_progress=trained)
    finally:
        bar.close()
        trained.close()
    create_table_artifact([{"class": c, "images": n} for c, n in result["class_counts"].items()],
                          key="predictions", description=f"Predictions of {name} v{result['version']}: "
                          f"{result['predictions']}")
    return result


# Tagged "gpu": with `prefect concurrency-limit create gpu 1` one such task holds the GPU at a time.
@task(name="fine-tune-network", tags=["gpu"], retries=1, retry_delay_seconds=10,
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def fine_tune_network(manifest_path: str, spec: dict[str, Any], config: dict[str, Any], workdir: str,
                      resize: str) -> dict:
    """Train (resuming a killed run in ``workdir``); returns paths and the training summary."""
    manifest = Manifest.load(manifest_path)
    cfg = finetune.FineTuneConfig.from_dict(config)
    bar = Progress("fine-tuning", unit="epoch", key="fine-tune-epochs")
    try:
        r = finetune.fine_tune(manifest, BackboneSpec.model_validate(spec), cfg, workdir, resize=resize, progress=bar)
    finally:
        bar.close()
    return {"model_path": r.model_path, "history": r.history, "phases": r.phases, "counts": r.counts,
            "skipped": r.skipped, "seconds": r.seconds, "resumed_from_epoch": r.resumed_from_epoch,
            "stopped_early": r.stopped_early, "input_size": r.input_size, "precision": r.precision,
            "devices": r.devices}


@task(name="register-finetuned", cache_policy=NO_CACHE)
def register_finetuned(trained: dict, manifest_path: str, spec: dict[str, Any], config: dict[str, Any],
                       resize: str, registry: str, name: str, report_dir: str) -> dict:
    """Register the trained model with its metrics on every split and write its report (learning curves)."""
    bar = Progress("self-training per group", unit="epoch", key="evaluate-self-training")  # shown once told
    try:
        result = finetune.evaluate_register_report(trained, Manifest.load(manifest_path),
                                                   BackboneSpec.model_validate(spec),
                                                   finetune.FineTuneConfig.from_dict(config), resize, registry, name,
                                                   report_dir, progress=bar)
    finally:
        bar.close()
    create_markdown_artifact(Path(result["report"]).read_text(), key="finetune-report",
                             description=f"Fine-tuned {name} v{result['version']}")
    _metrics_artifact(result["metrics"], "finetune-metrics")
    create_table_artifact(trained["history"], key="finetune-history", description="Loss and accuracy per epoch")
    return result


@task(name="inspect-backbone", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def inspect_backbone(spec: dict[str, Any]) -> list[dict]:
    """The backbone's layers (name, kind, output shape, stride, parameters)."""
    from .backbones import build_backbone

    return [layer.as_dict() for layer in build_backbone(BackboneSpec.model_validate(spec)).layers()]


@task(name="decide-case", cache_policy=NO_CACHE)
def decide_case(manifest_path: str, sweep_rows: list[dict], late_layer: str, thresholds: dict[str, Any],
                pretrained: bool, force_case: int | None, force_layer: str | None, top_freeze: str | None,
                from_scratch: bool) -> dict:
    th = transfer.Thresholds.model_validate(thresholds)
    size = transfer.measure_size(Manifest.load(manifest_path), th.large_per_class)
    sim = transfer.measure_similarity(sweep_rows, late_layer, th.similarity_margin, pretrained)
    d = transfer.decide(size, sim, force_case=force_case, force_layer=force_layer, top_freeze=top_freeze,
                        from_scratch=from_scratch)
    create_markdown_artifact(f"**Case {d.case}**: {transfer.CASES[d.case]}\n\n{d.reason}", key="transfer-decision")
    return d.as_dict()


@task(name="champion-gate", cache_policy=NO_CACHE)
def champion_gate(finetuned: dict | None, probe_result: dict, margin: float, registry: str) -> dict:
    """Pick the champion and point its registry alias 'champion' at it."""
    from storage import ModelRegistry

    g = transfer.gate(finetuned, probe_result, margin)
    winner = finetuned if g["promoted"] == "finetuned" else probe_result
    ModelRegistry(registry).set_alias(winner["model"], "champion", winner["version"])
    g["champion"] = {"name": winner["model"], "version": winner["version"]}
    create_table_artifact([g], key="champion-gate", description=g["reason"])
    return g


@task(name="decision-report", cache_policy=NO_CACHE)
def decision_report(result: dict, path: str) -> str:
    p = transfer.write_decision(path, result)
    create_markdown_artifact(p.read_text(), key="transfer-report", description="Why this case, and the evidence")
    return str(p.resolve())


@task(name="retrain-split-settings", cache_policy=NO_CACHE)
def retrain_split_settings(registry: str, name: str) -> dict:
    """The split fractions and seed the champion's data was split with (to rescan the same way)."""
    return retrain.split_settings(registry, name)


@task(name="retrain-plan", cache_policy=NO_CACHE)
def retrain_plan(registry: str, name: str, manifest_path: str) -> dict:
    plan = retrain.retrain_plan(registry, name, Manifest.load(manifest_path))
    if plan["kind"] == "linear-probe":
        plan["settings"] = retrain.probe_settings(registry, name)
    else:
        meta = retrain.champion_record(registry, name).metadata
        plan["settings"] = {"config": meta["config"], "spec": meta["spec"], "resize": meta.get("resize") or "stretch"}
    return plan


@task(name="evaluate-champion", cache_policy=NO_CACHE)
def evaluate_champion(registry: str, name: str, version: int, kind: str, store: str | None, manifest_path: str,
                      report_dir: str) -> dict:
    """The champion's metrics on the current data's splits (the same holdout the challenger is judged on)."""
    if kind == "linear-probe":
        return probe.evaluate_probe(registry, name, version, store, report_dir=report_dir)["metrics"]
    from storage import ModelRegistry

    rec = ModelRegistry(registry).record(name, version)
    path, rec = ModelRegistry(registry).load(name, version)
    manifest = Manifest.load(manifest_path)
    bar = Progress("self-training per group", unit="epoch", key="champion-self-training")  # shown once told
    try:
        cfg = rec.metadata["config"]
        metrics, _ = finetune.evaluate_finetuned(
            path, manifest, int(rec.metadata["input_size"]), rec.metadata.get("resize") or "stretch",
            int(cfg["batch_size"]), outcomes_prefix=Path(report_dir) / f"{name}-v{version}",
            spectrogram=BackboneSpec.model_validate(rec.metadata["spec"]).spectrogram,
            adapt=bool(cfg.get("adapt_batchnorm")), self_training=finetune.self_training_for(cfg, manifest.media, bar))
    finally:
        bar.close()
    return metrics


@task(name="promote-or-keep", cache_policy=NO_CACHE)
def promote_or_keep(registry: str, name: str, champion_version: int, challenger_version: int,
                    champion_metrics: dict, challenger_metrics: dict, margin: float) -> dict:
    decision = retrain.decide_promotion(champion_metrics, challenger_metrics, margin,
                                        exclude=retrain.trained_on(registry, name))
    event = retrain.apply_promotion(registry, name, champion_version, challenger_version, decision)
    create_table_artifact([{"role": "champion", "version": champion_version,
                            "accuracy": decision["champion_accuracy"]},
                           {"role": "challenger", "version": challenger_version,
                            "accuracy": decision["challenger_accuracy"]}],
                          key="retrain-challenge", description=decision["reason"])
    return event


@task(name="extract-shard", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE, task_run_name="extract shard {index} of {shards}")
def extract_codes_shard(manifest_path: str, store: str, index: int, shards: int, spec: dict[str, Any],
                        cuts: list[list[str]], options: dict[str, Any], threads: int | None,
                        gpus: int = 0, backend: str | None = None) -> dict:
    """One shard of a sharded extraction, into its own store file (one writer per shard); with ``gpus``
    the worker is pinned to one of them. ``backend``: the Keras backend the flow computes on; a worker
    whose Keras already runs on another one refuses the shard with a message that says so."""
    runtime.use_backend(backend)
    manifest = Manifest.load(manifest_path)
    gpu = extract.gpu_for_shard(index, gpus) if gpus else None
    bar = Progress(f"shard {index}", unit="img", key=f"extract-shard-{index}")
    try:
        return extract.extract_shard(manifest, store, index, shards, BackboneSpec.model_validate(spec), [tuple(c) for c in cuts],
                                     extract.ExtractOptions.model_validate(options), threads=threads, progress=bar, gpu=gpu)
    finally:
        bar.close()


@task(name="index-shards", cache_policy=NO_CACHE)
def index_shards(store: str, shards: int, manifest_path: str, parts: list[dict]) -> dict:
    """Write the index that reads the shards as one store."""
    summary = extract.finish_sharded(store, shards, Manifest.load(manifest_path), sorted(parts, key=lambda p: p["shard"]))
    create_table_artifact(summary["per_shard"], key="extract-shards", description=f"Shards of {store}")
    return summary


@task(name="export-model", cache_policy=NO_CACHE)
def export_model(registry: str, name: str, version: int | str | None, path: str, options: dict[str, Any]) -> dict:
    """Export a registered model into a folder that serves without cnncodes; publish its model card."""
    from .export import export_model as export
    from .settings import ExportOptions

    result = export(registry, name, version, path, ExportOptions.model_validate(options))
    create_markdown_artifact((Path(result["output"]) / "MODEL_CARD.md").read_text(), key="model-card",
                             description=f"Export of {name} v{result['version']} ({result['format']})")
    return result
