"""Extraction throughput with 1 and 2 Dask workers on this machine, and the per-image costs behind it.

Same generated JPEGs (photo-sized), MobileNetV2 at 224 px (random weights), batch 32. Each run is a
fresh ``distributed.LocalCluster`` whose workers run ``tasks.extract.extract_shard`` (what the
``extract-features`` flow submits with ``--shards N``), each writing its own shard store:

  * 1 worker,  1 shard,  TensorFlow with all cores in that worker;
  * 2 workers, 2 shards, TensorFlow with cores / 2 threads in each worker.

Reported: wall time from submission to the last shard (with worker start, TensorFlow import and model
build) and steady throughput (images / (shard time - model build)); and, measured in this process,
the per-image costs: decode (Pillow, draft mode), forward pass (per core-second), HDF5 write.

Usage:
    .venv/bin/python benchmarks/scale.py [--images 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from report import emit  # noqa: E402  benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CNNCODES_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_cluster(workers: int, manifest, store: Path, spec, cuts) -> dict:
    from distributed import Client, LocalCluster

    from tasks.extract import ExtractOptions, extract_shard

    threads = max(1, (os.cpu_count() or 1) // workers)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        t = time.perf_counter()
        futures = [client.submit(extract_shard, manifest, store, i, workers, spec, cuts, ExtractOptions(),
                                 threads, pure=False) for i in range(workers)]
        parts = client.gather(futures)
        wall = time.perf_counter() - t
    computed = sum(p["computed"] for p in parts)
    steady = max(p["timings"]["total"] - p["timings"]["build"] for p in parts)
    return {"workers": workers, "tf_threads_per_worker": threads, "images": computed, "wall_s": round(wall, 2),
            "wall_images_per_s": round(computed / wall, 2), "steady_s": round(steady, 2),
            "steady_images_per_s": round(computed / steady, 2),
            "per_shard": [{"shard": p["shard"], "images": p["computed"], "build_s": p["timings"]["build"],
                           "total_s": p["timings"]["total"]} for p in parts]}


def per_image_costs(manifest, spec, cuts) -> dict:
    import numpy as np

    from tasks.backbones import Extractor, build_backbone
    from tasks.data.images import load_image

    files = [manifest.abspath(s) for s in manifest.samples[:128]]
    t = time.perf_counter()
    arrays = [load_image(f, 224) for f in files]
    decode = (time.perf_counter() - t) / len(files)
    ex = Extractor(build_backbone(spec), cuts)
    batch = np.stack(arrays[:32])
    ex(batch)
    t = time.perf_counter()
    for _ in range(3):
        ex(batch)
    forward = (time.perf_counter() - t) / (3 * 32)
    return {"decode_ms_per_image_one_core": round(1000 * decode, 2),
            "forward_ms_per_image_all_cores": round(1000 * forward, 2),
            "forward_core_ms_per_image": round(1000 * forward * (os.cpu_count() or 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from tasks import runtime
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.data.synthetic import CLASSES, make_dataset

    spec = BackboneSpec(name="mobilenet_v2", weights="none", input_size=224)
    cuts = [("out_relu", "avg")]
    with tempfile.TemporaryDirectory(prefix="cnncodes-scale-") as tmp:
        data = make_dataset(Path(tmp) / "data", CLASSES[:4], per_class=args.images // 4, size=(375, 500), seed=5)
        manifest = scan_dataset(data)
        runs = [run_cluster(n, manifest, Path(tmp) / f"store-{n}.h5", spec, cuts) for n in (1, 2)]
        costs = per_image_costs(manifest, spec, cuts)
    result = {"device": runtime.device_name(), "cores": os.cpu_count(), "backbone": "mobilenet_v2 224px",
              "runs": runs, "per_image": costs,
              "speedup_2_workers_steady": round(runs[1]["steady_images_per_s"] / runs[0]["steady_images_per_s"], 3),
              "speedup_2_workers_wall": round(runs[1]["wall_images_per_s"] / runs[0]["wall_images_per_s"], 3)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
