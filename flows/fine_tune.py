"""Flow ``fine-tune``: cases 3 and 4 of transfer learning, the backbone itself is trained.

Scan the dataset, fine-tune (resuming a killed run of the same configuration), evaluate on every
split, register the ``.keras`` model, write the report (same metrics as a linear probe, plus
learning curves and the phases' frozen/trainable counts).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow

from storage.hashing import fingerprint
from storage.files import atomic_write_json
from tasks.backbones import BackboneSpec, is_model_file
from tasks.extract import spec_dict
from tasks.finetune import FineTuneConfig
from tasks.prefect_tasks import fine_tune_network, register_finetuned, scan_dataset
from tasks.results import FineTuneRunResult
from tasks.settings import Output, SplitConfig
from tasks.runtime import use_backend


def run_dir(out: str, name: str, key: dict[str, Any]) -> Path:
    """One folder per (model name, data, configuration): the same run killed and started again finds
    its checkpoints there; a finished one is started afresh."""
    d = Path(out) / "runs" / f"finetune-{name}-{fingerprint(key)[:10]}"
    if (d / "registered.json").exists():
        shutil.rmtree(d)
    return d


@flow(name="fine-tune", log_prints=True, flow_run_name="fine-tune {backbone.name} on {data}")
def fine_tune(
    data: str,
    backbone: BackboneSpec = BackboneSpec(),
    finetune: FineTuneConfig = FineTuneConfig(),
    split: SplitConfig = SplitConfig(),
    model_name: str | None = None,
    output: Output = Output(),
) -> FineTuneRunResult:
    """Fine-tune ``backbone`` on ``data``; returns model name and version, metrics per split, report path.

    ``backbone.precision`` (float32, float16, bfloat16, auto) applies to the whole network: 'auto' is
    mixed float16 on a GPU (with loss scaling), float32 on a CPU; the last Dense and softmax stay float32."""
    use_backend(output.backend)  # Keras's backend for this process: before anything imports Keras
    registry = output.registry_path
    data_name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    name = model_name or f"{data_name}-{Path(backbone.name).stem if is_model_file(backbone.name) else backbone.name}" \
                         "-finetuned"
    manifest_path = output.runs / f"{name}.manifest.json"
    scanned = scan_dataset(data, str(manifest_path), split.val_fraction, split.test_fraction, split.seed,
                           split.pinned, split.rehash, split.group_by)
    print(f"scanned {scanned['images']} images in {len(scanned['classes'])} classes ({scanned['files_read']} "
          f"files read, {scanned['files_reused']} unchanged since the last scan)")
    workdir = run_dir(output.out, name, {"manifest": scanned["fingerprint"], "spec": spec_dict(backbone),
                                         "config": finetune.as_dict(), "resize": finetune.resize})
    trained = fine_tune_network(str(manifest_path), spec_dict(backbone), finetune.as_dict(), str(workdir),
                                finetune.resize)
    if trained["resumed_from_epoch"]:
        print(f"resumed from the last checkpoint: {trained['resumed_from_epoch']}")
    result = register_finetuned(trained, str(manifest_path), spec_dict(backbone), finetune.as_dict(),
                                finetune.resize, registry, name, output.reports)
    atomic_write_json(workdir / "registered.json", {"name": result["name"], "version": result["version"]})
    for split_name, m in result["metrics"].items():
        print(f"{split_name}: accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f} on "
              f"{m['images']} images")
    print(f"registered {result['name']} v{result['version']}; report: {result['report']}")
    return FineTuneRunResult(model=result["name"], version=result["version"], metrics=result["metrics"],
                             report=result["report"], learning_curves=result["learning_curves"],
                             workdir=str(workdir.resolve()), skipped=result["skipped"],
                             resumed_from_epoch=result["resumed_from_epoch"], stopped_early=result["stopped_early"],
                             registry=str(Path(registry).resolve()))
