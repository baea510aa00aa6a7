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
from tasks.backbones import BackboneSpec, is_model_file, parse_backbone_args
from tasks.datasets import check_split_params
from tasks.extract import spec_dict
from tasks.finetune import FineTuneConfig
from tasks.images import RESIZE_MODES
from tasks.prefect_tasks import evaluate_finetuned, fine_tune_network, scan_dataset
from storage.errors import ParameterError
from storage.files import atomic_write_json


def run_dir(out: str, name: str, key: dict[str, Any]) -> Path:
    """One folder per (model name, data, configuration): the same run killed and started again finds
    its checkpoints there; a finished one is started afresh."""
    d = Path(out) / "runs" / f"finetune-{name}-{fingerprint(key)[:10]}"
    if (d / "registered.json").exists():
        shutil.rmtree(d)
    return d


@flow(name="fine-tune", log_prints=True, flow_run_name="fine-tune {backbone} on {data}")
def fine_tune(
    data: str,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    backbone_args: dict[str, Any] | None = None,
    input_size: int | None = None,
    preprocessing: str = "auto",
    cut_layer: str | None = None,
    freeze: str = "none",
    freeze_batchnorm: bool = True,
    head_pooling: str = "avg",
    dense: list[int] = (1024,),
    dropout: float = 0.5,
    optimizer: str = "sgd",
    learning_rate: float = 1e-4,
    momentum: float = 0.9,
    head_lr_multiplier: float = 10.0,
    schedule: str = "constant",
    epochs: int = 10,
    head_epochs: int = 0,
    head_learning_rate: float = 1e-3,
    batch_size: int = 32,
    augment: list[str] = ("flip", "rotation", "zoom"),
    monitor: str = "val_accuracy",
    patience: int = 3,
    precision: str = "auto",
    xla: bool = False,
    resize: str = "stretch",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    model_name: str | None = None,
    registry: str = "cnncodes-out/registry",
    out: str = "cnncodes-out",
) -> dict:
    """Fine-tune ``backbone`` on ``data``; returns model name and version, metrics per split, report path.

    ``precision`` (float32, float16, bfloat16, auto) applies to the whole network: 'auto' is mixed
    float16 on a GPU (with loss scaling), float32 on a CPU; the last Dense and softmax stay float32."""
    spec = BackboneSpec(backbone, weights=weights, input_size=input_size,
                        backbone_args=parse_backbone_args(backbone_args), preprocessing=preprocessing,
                        precision=precision, seed=seed).validate()
    cfg = FineTuneConfig(freeze=freeze, freeze_batchnorm=freeze_batchnorm, cut_layer=cut_layer,
                         head_pooling=head_pooling, dense=list(dense), dropout=dropout, optimizer=optimizer,
                         learning_rate=learning_rate, momentum=momentum, head_lr_multiplier=head_lr_multiplier,
                         schedule=schedule, epochs=epochs, head_epochs=head_epochs,
                         head_learning_rate=head_learning_rate, batch_size=batch_size, augment=list(augment),
                         monitor=monitor, patience=patience, xla=xla,
                         seed=seed).validate()
    if resize not in RESIZE_MODES:
        raise ParameterError(f"resize must be one of {RESIZE_MODES}; got {resize!r}.")
    check_split_params(val_fraction, test_fraction)
    data_name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    name = model_name or f"{data_name}-{Path(backbone).stem if is_model_file(backbone) else backbone}-finetuned"
    manifest_path = Path(out) / "runs" / f"{name}.manifest.json"
    scanned = scan_dataset(data, str(manifest_path), val_fraction, test_fraction, seed)
    print(f"scanned {scanned['images']} images in {len(scanned['classes'])} classes")
    workdir = run_dir(out, name, {"manifest": scanned["fingerprint"], "spec": spec_dict(spec),
                                  "config": cfg.as_dict(), "resize": resize})
    trained = fine_tune_network(str(manifest_path), spec_dict(spec), cfg.as_dict(), str(workdir), resize)
    if trained["resumed_from_epoch"]:
        print(f"resumed from the last checkpoint: {trained['resumed_from_epoch']}")
    result = evaluate_finetuned(trained, str(manifest_path), spec_dict(spec), cfg.as_dict(), resize, registry, name,
                                str(Path(out) / "reports"))
    atomic_write_json(workdir / "registered.json", {"name": result["name"], "version": result["version"]})
    for split, m in result["metrics"].items():
        print(f"{split}: accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f} on {m['images']} images")
    print(f"registered {result['name']} v{result['version']}; report: {result['report']}")
    return {"model": result["name"], "version": result["version"], "metrics": result["metrics"],
            "report": result["report"], "learning_curves": result["learning_curves"], "workdir": str(workdir.resolve()),
            "skipped": result["skipped"], "resumed_from_epoch": result["resumed_from_epoch"],
            "stopped_early": result["stopped_early"], "registry": str(Path(registry).resolve())}
