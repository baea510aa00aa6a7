"""Flow ``extract-features``: images -> CNN codes -> HDF5 feature store.

Validate parameters, scan the dataset (content hashes), extract what the store
lacks, write the report. Runs in Prefect's embedded mode (no server needed),
or as a deployment.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow

from storage.errors import ParameterError
from tasks.backbones import BackboneSpec, is_model_file, parse_backbone_args
from tasks.datasets import check_split_params
from tasks.extract import ExtractOptions, normalise_cuts, options_dict, spec_dict
from tasks.prefect_tasks import extract_codes, extract_report, scan_dataset


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


def default_store_path(out: str, data: str, spec: BackboneSpec) -> Path:
    """``<out>/stores/<dataset>__<backbone>__<weights>.h5``: one store per dataset, backbone and weights."""
    name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    backbone = Path(spec.name).stem if is_model_file(spec.name) else spec.name
    args = "".join(f"-{k}{v}" for k, v in sorted(spec.backbone_args.items()))
    weights = spec.weights if spec.weights in ("imagenet", "none", "file") else "w-" + Path(spec.weights).stem
    return Path(out) / "stores" / f"{_slug(name)}__{_slug(backbone + args)}__{_slug(weights)}.h5"


@flow(name="extract-features", log_prints=True, flow_run_name="extract {backbone} on {data}")
def extract_features(
    data: str,
    backbone: str = "mobilenet_v2",
    layers: list[str] | None = None,
    pooling: list[str] | str = "avg",
    store: str | None = None,
    weights: str = "imagenet",
    backbone_args: dict[str, Any] | None = None,
    input_size: int | None = None,
    preprocessing: str = "auto",
    precision: str = "float32",
    batch_size: int = 32,
    dtype: str = "float32",
    compression: str | None = None,
    resize: str = "stretch",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    out: str = "cnncodes-out",
) -> dict:
    """Extract CNN codes of ``data`` at ``layers`` of ``backbone`` into ``store``.

    Returns the extraction summary (counts, skips, timings, store and report paths).
    """
    spec = BackboneSpec(backbone, weights=weights, input_size=input_size,
                        backbone_args=parse_backbone_args(backbone_args), preprocessing=preprocessing,
                        precision=precision, seed=seed).validate()
    if not layers:
        raise ParameterError("give at least one layer (--layer NAME); `cnncodes layers "
                             f"{backbone}` lists the layers of {backbone}.")
    cuts = normalise_cuts(layers, pooling)
    options = ExtractOptions(batch_size=batch_size, dtype=dtype, compression=compression, resize=resize).validate()
    check_split_params(val_fraction, test_fraction)
    store_path = Path(store) if store else default_store_path(out, data, spec)
    runs = Path(out) / "runs"
    manifest_path = runs / f"{store_path.stem}.manifest.json"

    scanned = scan_dataset(data, str(manifest_path), val_fraction, test_fraction, seed)
    print(f"scanned {scanned['images']} images in {len(scanned['classes'])} classes "
          f"({scanned['layout']} layout), {scanned['skipped']} files skipped")
    summary = extract_codes(str(manifest_path), str(store_path), spec_dict(spec), [list(c) for c in cuts],
                            options_dict(options))
    summary["report"] = extract_report(summary, str(Path(out) / "reports" / f"{store_path.stem}.extract.md"))
    summary["manifest"] = str(manifest_path.resolve())
    print(f"store: {summary['store']} ({summary['computed']} computed, {summary['reused']} reused, "
          f"{len(summary['skipped'])} skipped); report: {summary['report']}")
    return summary


if __name__ == "__main__":
    import sys

    print(extract_features(sys.argv[1], layers=sys.argv[2:] or None))
