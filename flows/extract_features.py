"""Flow ``extract-features``: images -> CNN codes -> HDF5 feature store.

Validate parameters, scan the dataset (content hashes), extract what the store
lacks, write the report. Runs in Prefect's embedded mode (no server needed),
or as a deployment.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prefect import flow

from storage.errors import ParameterError
from tasks.backbones import BackboneSpec, is_model_file, parse_backbone_args
from tasks.datasets import check_split_params
from tasks.extract import ExtractOptions, normalise_cuts, options_dict, spec_dict
from tasks.prefect_tasks import extract_codes, extract_codes_shard, extract_report, index_shards, scan_dataset


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


def default_store_path(out: str, data: str, spec: BackboneSpec) -> Path:
    """``<out>/stores/<dataset>__<backbone>__<weights>.h5``: one store per dataset, backbone and weights."""
    name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    backbone = Path(spec.name).stem if is_model_file(spec.name) else spec.name
    args = "".join(f"-{k}{v}" for k, v in sorted(spec.backbone_args.items()))
    weights = spec.weights if spec.weights in ("imagenet", "none", "file") else "w-" + Path(spec.weights).stem
    return Path(out) / "stores" / f"{_slug(name)}__{_slug(backbone + args)}__{_slug(weights)}.h5"


def dask_runner(workers: int, address: str | None):
    """A Dask task runner: the cluster at ``address``, or a local cluster of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="extract-shards", log_prints=True, flow_run_name="extract {shards} shards into {store}")
def extract_shards(manifest_path: str, store: str, shards: int, spec: dict[str, Any], cuts: list[list[str]],
                   options: dict[str, Any], threads: int | None, gpus: int = 0) -> dict:
    """Each shard by its own worker, side by side (with ``gpus``, each worker pinned to its own GPU);
    then the index that reads them as one store."""
    futures = [extract_codes_shard.submit(manifest_path, store, i, shards, spec, cuts, options, threads, gpus)
               for i in range(shards)]
    parts = [f.result() for f in futures]
    return index_shards(store, shards, manifest_path, parts)


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
    precision: str = "auto",
    batch_size: int = 32,
    dtype: str = "float32",
    compression: str | None = None,
    resize: str = "stretch",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    out: str = "cnncodes-out",
    shards: int = 1,
    workers: int | None = None,
    dask_address: str | None = None,
    gpus: int = 0,
    xla: bool = False,
) -> dict:
    """Extract CNN codes of ``data`` at ``layers`` of ``backbone`` into ``store``.

    With ``shards`` > 1 the dataset is split into that many shards (by a hash of each image's path),
    each extracted into its own store file by a Dask worker: ``workers`` processes of a local cluster
    (default: one per shard), or the cluster at ``dask_address``. ``store`` is then an index that
    reads as one store. ``gpus`` > 0 runs one shard per GPU of this machine (``shards`` and ``workers``
    default to it), each worker pinned to its GPU. ``precision`` is float32, float16 (mixed, GPUs),
    bfloat16 or auto (float16 on a GPU, float32 on a CPU); ``xla`` compiles the forward pass. Returns the extraction summary (counts, skips, timings, store and report paths).
    """
    spec = BackboneSpec(backbone, weights=weights, input_size=input_size,
                        backbone_args=parse_backbone_args(backbone_args), preprocessing=preprocessing,
                        precision=precision, seed=seed).validate()
    if not layers:
        raise ParameterError("give at least one layer (--layer NAME); `cnncodes layers "
                             f"{backbone}` lists the layers of {backbone}.")
    cuts = normalise_cuts(layers, pooling)
    options = ExtractOptions(batch_size=batch_size, dtype=dtype, compression=compression, resize=resize,
                             xla=xla).validate()
    check_split_params(val_fraction, test_fraction)
    store_path = Path(store) if store else default_store_path(out, data, spec)
    runs = Path(out) / "runs"
    manifest_path = runs / f"{store_path.stem}.manifest.json"

    scanned = scan_dataset(data, str(manifest_path), val_fraction, test_fraction, seed)
    print(f"scanned {scanned['images']} images in {len(scanned['classes'])} classes "
          f"({scanned['layout']} layout), {scanned['skipped']} files skipped")
    if not isinstance(gpus, int) or gpus < 0:
        raise ParameterError(f"gpus must be an integer >= 0; got {gpus!r}.")
    if gpus and shards == 1:
        shards = gpus
    if not isinstance(shards, int) or shards < 1:
        raise ParameterError(f"shards must be a positive integer; got {shards!r}.")
    if shards == 1:
        summary = extract_codes(str(manifest_path), str(store_path), spec_dict(spec), [list(c) for c in cuts],
                                options_dict(options), gpus)
    else:
        n_workers = workers or (min(gpus, shards) if gpus else shards)
        threads = None if dask_address else max(1, (os.cpu_count() or 1) // n_workers)
        summary = extract_shards.with_options(task_runner=dask_runner(n_workers, dask_address))(
            str(manifest_path), str(store_path), shards, spec_dict(spec), [list(c) for c in cuts],
            options_dict(options), threads, gpus)
    summary["report"] = extract_report(summary, str(Path(out) / "reports" / f"{store_path.stem}.extract.md"))
    summary["manifest"] = str(manifest_path.resolve())
    print(f"store: {summary['store']} ({summary['computed']} computed, {summary['reused']} reused, "
          f"{len(summary['skipped'])} skipped); report: {summary['report']}")
    return summary


if __name__ == "__main__":
    import sys

    print(extract_features(sys.argv[1], layers=sys.argv[2:] or None))
