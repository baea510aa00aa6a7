"""After fine-tuning: register the model, evaluate it, and write the same report as a linear probe's
(plus learning curves and the phases' frozen/trainable counts)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from storage.files import atomic_write
from storage.manifest import Manifest

from ..reports import evaluate as ev
from ..backbones import BackboneSpec, preprocess_mode
from ..probe import metrics_markdown
from .config import FineTuneConfig
from .data import augmentations_for
from .evaluation import evaluate_finetuned, load_finetuned, plot_learning_curves, self_training_for
from .training import FineTuneResult


def evaluate_register_report(trained: dict[str, Any], manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig,
                             resize: str, registry: str | Path, name: str, report_dir: str | Path,
                             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate the trained model on every split (``progress``: of its self-training, if it has any), register
    it, and write its report."""
    # trained records the input size; older records only have the model file to ask
    size = int(trained.get("input_size") or load_finetuned(trained["model_path"]).input_shape[1])
    report_dir = Path(report_dir)
    pending = report_dir / f".{name}-unregistered"
    metrics, skipped = evaluate_finetuned(trained["model_path"], manifest, size, resize, cfg.batch_size,
                                          outcomes_prefix=pending, spectrogram=spec.spectrogram,
                                          adapt=cfg.adapt_batchnorm,
                                          self_training=self_training_for(cfg, manifest.media, progress))
    result_obj = FineTuneResult(trained["model_path"], trained["history"], trained["phases"], trained["counts"],
                                trained["skipped"], trained["seconds"], trained.get("resumed_from_epoch", {}),
                                trained.get("stopped_early", False), size, trained.get("precision"),
                                trained.get("devices", 1))
    reg = register_finetuned(result_obj, manifest, spec, cfg, resize, size, metrics, registry, name)
    stem = f"{reg['name']}-v{reg['version']}"
    for split, m in metrics.items():  # the per-image outcomes take the registered version's name
        if m.get("outcomes"):
            m["outcomes"] = str(Path(m["outcomes"]).replace(report_dir / f"{stem}.outcomes-{split}.csv").resolve())
    plots = {split: str(ev.plot_confusion(m["confusion"], manifest.class_names,
                                          report_dir / f"{stem}.confusion-{split}.png",
                                          title=f"{reg['name']} v{reg['version']}: {split}").resolve())
             for split, m in metrics.items()}
    curves = str(plot_learning_curves(trained["history"], report_dir / f"{stem}.curves.png").resolve()) \
        if trained["history"] else None
    result = {"name": reg["name"], "version": reg["version"], "metrics": metrics, "confusion_plots": plots,
              "class_names": list(manifest.class_names), "learning_curves": curves, "model_path": reg["model_path"],
              "skipped": trained["skipped"] + [s for s in skipped if s not in trained["skipped"]],
              "history": trained["history"], "counts": trained["counts"], "phases": trained["phases"],
              "resumed_from_epoch": trained.get("resumed_from_epoch", {}), "stopped_early": trained.get("stopped_early")}
    header = [f"# Fine-tuned `{reg['name']}` v{reg['version']}", "",
              f"- backbone: `{spec.name}` {spec.backbone_args or ''}, weights `{spec.weights}`, input {size} px"
              + (f", cut at `{cfg.cut_layer}`" if cfg.cut_layer else ""),
              f"- precision: {trained.get('precision') or spec.precision}, "
              f"{trained.get('devices', 1)} replica(s)",
              f"- head: {cfg.head_pooling} pooling, dense {list(cfg.dense)}, dropout {cfg.dropout}"
              + (f", dropout after the pooling {cfg.pool_dropout}" if cfg.pool_dropout else ""),
              f"- optimizer: {cfg.optimizer}, learning rate {cfg.learning_rate:g} (head x{cfg.head_lr_multiplier:g}), "
              f"schedule {cfg.schedule}; augmentation: {', '.join(augmentations_for(cfg, manifest.media)) or 'none'}",
              "- kept: the last epoch (monitor none: no checkpoint choice, no early stopping)" if cfg.monitor == "none"
              else f"- kept: the best epoch by {cfg.monitor} (early stopping patience {cfg.patience})",
              *([f"- ensemble: {cfg.ensemble} networks (seeds {cfg.seed} to {cfg.seed + cfg.ensemble - 1}), "
                 "their class probabilities averaged"] if cfg.ensemble > 1 else []),
              *adaptation_lines(metrics),
              f"- trained in {trained['seconds']:.1f} s" + (", stopped early" if trained.get("stopped_early") else "")
              + (f"; resumed from epoch {trained['resumed_from_epoch']}" if trained.get("resumed_from_epoch") else ""),
              "", "## Phases", "", "| phase | frozen | epochs run | trainable layers | frozen layers | trainable params |",
              "|---|---|---|---|---|---|"]
    header += [f"| {p['phase']}{' (network %d)' % p['network'] if p.get('network') else ''} | {p['freeze']} | "
               f"{p['epochs_run']}/{p['epochs']} | "
               f"{p['counts']['body_trainable_layers']} | {p['counts']['body_frozen_layers']} | "
               f"{p['counts']['trainable_params']:,} |" for p in trained["phases"]]
    if curves:
        header += ["", f"![learning curves]({Path(curves).name})"]
    if result["skipped"]:
        header += ["", f"Skipped files: {len(result['skipped'])} (see the JSON report)."]
    report = report_dir / f"{stem}.report.md"
    atomic_write(report, metrics_markdown(header, result, {"cv_scores": None}))
    atomic_write(report.with_suffix(".json"), json.dumps(result, indent=1, default=float))
    result["report"] = str(report.resolve())
    return result


def adaptation_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's word on AdaBN: per split, the groups adapted and the accuracy with the trained statistics."""
    out = []
    for split, m in metrics.items():
        a = m.get("adaptation")
        if a:
            kept = f", {len(a['kept_groups'])} kept the trained statistics (fewer than {a['min_images']} files)" \
                if a["kept_groups"] else ""
            st = a.get("self_training")
            shares = ", ".join(f"{f:g}" for f in st["fractions"]) if st else ""
            trained = (f"; self-trained on each adapted group ({st['rounds']} round(s) of {st['epochs']} epochs on the "
                       f"most confident {shares} of each predicted class, no label): accuracy {m['accuracy']:.3f}, "
                       f"with AdaBN alone {a['adabn_accuracy']:.3f}") if st else f"; accuracy {m['accuracy']:.3f}"
            out.append(f"- {split}: BatchNormalization statistics adapted to each of {len(a['adapted_groups'])} "
                       f"group(s) (AdaBN, {a['batchnorm_layers']} layers){kept}{trained}, "
                       f"with the trained statistics {a['unadapted_accuracy']:.3f}")
    return out


def register_finetuned(result: FineTuneResult, manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig,
                       resize: str, size: int, metrics: dict[str, Any], registry: str | Path,
                       name: str) -> dict[str, Any]:
    from storage import ModelRegistry

    from ..extract import spec_dict

    meta = {"kind": "fine-tuned", "config": cfg.as_dict(), "spec": spec_dict(spec), **spec.identity(),
            "precision": result.precision or spec.precision, "replicas": result.devices,
            "input_size": size, "resize": resize, "preprocess_layer": preprocess_mode(spec), "media": manifest.media,
            "class_names": list(manifest.class_names), "dataset": manifest.root,
            "manifest_fingerprint": manifest.fingerprint(), "counts": result.counts, "phases": [
                {k: v for k, v in p.items() if k != "history"} for p in result.phases],
            "history": result.history, "train_seconds": round(result.seconds, 2),
            "metrics": {k: {m: v for m, v in d.items() if m != "outcomes"} for k, d in metrics.items()},
            "split": {"seed": manifest.split_seed, "fractions": dict(manifest.split_fractions),
                      "layout": manifest.layout, "group_by": manifest.group_by},
            "stopped_early": result.stopped_early, "train_images": sum(1 for s in manifest.samples
                                                                        if s.split == "train")}
    reg = ModelRegistry(registry)
    record = reg.save(name, metadata=meta, file=result.model_path)
    with reg.kept_only_with_its_splits(record):
        reg.pin_splits(name, {s.sha256: s.split for s in manifest.samples}, manifest.split_fractions,
                       manifest.split_seed, manifest.group_by)
    return {"name": record.name, "version": record.version, "model_path": str(record.model_path)}
