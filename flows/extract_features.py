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
from tasks.backbones import BackboneSpec, is_model_file
from tasks.extract import ExtractOptions, options_dict, spec_dict
from tasks.results import ExtractResult
from tasks.settings import Output, ScaleOut, SplitConfig
from tasks.prefect_tasks import extract_codes, extract_codes_shard, extract_report, index_shards, scan_dataset
from tasks.runtime import configured_backend, use_backend


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
                   options: dict[str, Any], threads: int | None, gpus: int = 0) -> ExtractResult:
    """Each shard by its own worker, side by side (with ``gpus``, each worker pinned to its own GPU);
    then the index that reads them as one store."""
    backend = configured_backend()  # each worker computes on the flow's backend (or says why it cannot)
    futures = [extract_codes_shard.submit(manifest_path, store, i, shards, spec, cuts, options, threads, gpus,
                                          backend) for i in range(shards)]
    parts = [f.result() for f in futures]
    return ExtractResult(**index_shards(store, shards, manifest_path, parts))


@flow(name="extract-features", log_prints=True, flow_run_name="extract {backbone.name} on {data}")
def extract_features(
    data: str,
    backbone: BackboneSpec = BackboneSpec(),
    extract: ExtractOptions = ExtractOptions(),
    split: SplitConfig = SplitConfig(),
    output: Output = Output(),
    scale: ScaleOut = ScaleOut(),
) -> ExtractResult:
    """Extract CNN codes of ``data`` at ``extract.layers`` of ``backbone`` into ``extract.store``.

    With ``scale.shards`` > 1 the dataset is split into that many shards (by a hash of each image's
    path), each extracted into its own store file by a Dask worker: ``scale.workers`` processes of a
    local cluster (default: one per shard), or the cluster at ``scale.dask_address``. The store is then
    an index that reads as one store. ``scale.gpus`` > 0 runs one shard per GPU of this machine (shards
    and workers default to it), each worker pinned to its GPU. ``backbone.precision`` is float32,
    float16 (mixed, GPUs), bfloat16 or auto (float16 on a GPU, float32 on a CPU); ``extract.xla``
    compiles the forward pass. Returns the extraction summary (counts, skips, timings, store and
    report paths).
    """
    use_backend(output.backend)  # Keras's backend for this process: before anything imports Keras
    if not extract.layers:
        raise ParameterError("give at least one layer (--layer NAME); `cnncodes layers "
                             f"{backbone.name}` lists the layers of {backbone.name}.")
    cuts = extract.cuts()
    store_path = Path(extract.store) if extract.store else default_store_path(output.out, data, backbone)
    manifest_path = output.runs / f"{store_path.stem}.manifest.json"

    scanned = scan_dataset(data, str(manifest_path), split.val_fraction, split.test_fraction, split.seed,
                           split.pinned, split.rehash, split.group_by)
    print(f"scanned {scanned['images']} images in {len(scanned['classes'])} classes "
          f"({scanned['layout']} layout), {scanned['skipped']} files skipped; {scanned['files_read']} files read, "
          f"{scanned['files_reused']} unchanged since the last scan")
    shards = scale.gpus if scale.gpus and scale.shards == 1 else scale.shards
    if shards == 1:
        summary = extract_codes(str(manifest_path), str(store_path), spec_dict(backbone), [list(c) for c in cuts],
                                options_dict(extract), scale.gpus)
    else:
        n_workers = scale.workers or (min(scale.gpus, shards) if scale.gpus else shards)
        threads = None if scale.dask_address else max(1, (os.cpu_count() or 1) // n_workers)
        summary = extract_shards.with_options(task_runner=dask_runner(n_workers, scale.dask_address))(
            str(manifest_path), str(store_path), shards, spec_dict(backbone), [list(c) for c in cuts],
            options_dict(extract), threads, scale.gpus).as_dict()
    summary["report"] = extract_report(summary, str(Path(output.reports) / f"{store_path.stem}.extract.md"))
    summary["manifest"] = str(manifest_path.resolve())
    result = ExtractResult(**summary)
    print(f"store: {result.store} ({result.computed} computed, {result.reused} reused, "
          f"{len(result.skipped)} skipped); report: {result.report}")
    return result


if __name__ == "__main__":
    import sys

    print(extract_features(sys.argv[1], extract=ExtractOptions(layers=sys.argv[2:])))
