"""GPU check: the GPU tests and the GPU figures of BENCHMARKS.md, in one run, as one JSON summary.

Run by ``benchmarks/gpu.sh`` (which installs the GPU build of TensorFlow first). Measured side by
side on the same machine, on the same generated JPEGs (photo-sized, about 375 x 500 px), random
weights (the arithmetic is that of the ImageNet weights), 224 px, batch 128:

  * tests     ``pytest -m gpu``: float16 codes vs float32, float16 fine-tuning with loss scaling,
              MirroredStrategy over every GPU, GPU pinning of workers;
  * raw       the backbone cut at its last layer (average pooling), one compiled function, on a
              batch already decoded and on the GPU: the ceiling, float32 and float16;
  * cnncodes  ``extract_to_store`` on the JPEGs (decoding in threads, overlapped with the forward
              pass, writing the store), float32 and float16; model build excluded;
  * decode    JPEG decoding + resize alone: images/s on one core and on every core, which says
              whether the GPU or the decoder bounds extraction;
  * finetune  ``fine_tune`` (MobileNetV2, float16, tf.data, checkpoints, logs, early stopping)
              next to a plain ``build + fit + save`` of the same network on the same images.

Goals (issue 12): cnncodes >= 0.80 x raw float16 for ResNet50 (or the decoder named as the cap);
float16 raw >= 2 x float32 raw for ResNet50; fine-tuning within 5% of model.fit.

Usage:
    bash benchmarks/gpu.sh                                   # on a GPU machine, under 8 minutes
    .venv/bin/python benchmarks/gpu.py --dry-run             # tiny counts on a CPU: tries the script
    .venv/bin/python benchmarks/gpu.py --markdown benchmarks/results/gpu.json   # the BENCHMARKS.md table
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CNNCODES_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from report import emit  # noqa: E402  benchmarks/ is the script's folder

_LAST: dict[str, str] = {}  # backbone name -> its last layer, learnt when raw_rate builds it
GOALS = {"extract_over_raw_float16_resnet50": 0.80, "float16_over_float32_raw_resnet50": 2.0,
         "finetune_over_fit": 0.95}


def device_info() -> dict:
    from tasks import runtime

    tf = runtime.tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for g in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(g).get("device_name", g.name))
        except (ValueError, RuntimeError):
            names.append(g.name)
    return {"gpus": names, "cpu_cores": os.cpu_count(), "tensorflow": tf.__version__,
            "cuda_build": bool(tf.test.is_built_with_cuda())}


def run_gpu_tests(timeout: int) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail[0])}
        out = {"exit": proc.returncode, **counts, "summary": tail[0]}
        if proc.returncode not in (0, 5):
            out["output"] = proc.stdout[-4000:]
    except subprocess.TimeoutExpired:
        out = {"exit": None, "summary": f"timed out after {timeout} s"}
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def photos(root: Path, n: int) -> Path:
    """``n`` JPEGs of 4 texture classes at photo-like sizes, generated on every core."""
    from tasks.data.synthetic import CLASSES, make_dataset

    per = max(2, n // 4)
    parts = min(os.cpu_count() or 1, 16)
    with ThreadPoolExecutor(parts) as pool:  # Pillow and NumPy release the GIL for most of the work
        list(pool.map(lambda k: make_dataset(root / f"part{k}", CLASSES[:4], per_class=max(1, per // parts),
                                             size=(375, 500), seed=k), range(parts)))
    # one folder of class folders
    data = root / "data"
    for part in root.glob("part*"):
        for cls in part.iterdir():
            (data / cls.name).mkdir(parents=True, exist_ok=True)
            for f in cls.iterdir():
                f.rename(data / cls.name / f"{part.name}-{f.name}")
    return data


def raw_rate(spec, batch: int, seconds: float) -> float:
    """Images/s of the compiled forward pass on a decoded batch already on the device."""
    from tasks import runtime
    from tasks.backbones import Extractor, build_backbone

    tf = runtime.tensorflow()
    bb = build_backbone(spec)
    _LAST[spec.name] = bb.model.layers[-1].name  # extract_rate cuts there too, without building again
    ex = Extractor(bb, [(_LAST[spec.name], "avg")])
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, bb.size, bb.size, 3), dtype=np.uint8))
    for _ in range(3):
        ex(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        ex(x)  # returns the pooled codes on the host, as extraction needs them
        n += batch
    return n / (time.perf_counter() - t)


def extract_rate(spec, data: Path, store: Path, batch: int) -> dict:
    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_to_store

    m = scan_dataset(data)
    s = extract_to_store(m, store, spec, [(_last_layer(spec), "avg")], ExtractOptions(batch_size=batch))
    wall = s["timings"]["total"] - s["timings"]["build"]
    return {"images": s["computed"], "images_per_s": s["computed"] / wall, "forward_s": s["timings"]["forward"],
            "write_s": s["timings"]["write"], "wall_s": wall, "decode_workers": s["decode_workers"],
            "precision": s["precision"], "device": s["device"]}


def _last_layer(spec) -> str:
    return _LAST[spec.name]  # set by raw_rate, which runs first


def decode_rates(data: Path, size: int) -> dict:
    """JPEG decoding images/s: one core, then cnncodes' decoding pool (``tasks.data.decode_pool``) on every
    core in threads and in processes (started before the clock, as they are once per extraction);
    ``all_cores`` is the faster of the two."""
    from tasks.data.decode_pool import DecodePool
    from tasks.data.images import load_image

    files = sorted(str(p) for p in data.rglob("*.jpg"))
    one = files[: max(8, len(files) // 8)]
    t = time.perf_counter()
    for f in one:
        load_image(f, size)
    out = {"one_core": len(one) / (time.perf_counter() - t), "cores": os.cpu_count() or 1}
    for mode in ("threads", "processes"):
        with DecodePool("image", size, workers=out["cores"], mode=mode) as pool:
            pool.submit(files[: 2 * out["cores"]])()  # every worker started
            t = time.perf_counter()
            waits = [pool.submit(files[i:i + 128]) for i in range(0, len(files), 128)]
            for wait in waits:
                wait()
            out[f"all_cores_{mode}"] = len(files) / (time.perf_counter() - t)
    out["all_cores"] = max(out["all_cores_threads"], out["all_cores_processes"])
    out["best"] = "processes" if out["all_cores_processes"] > out["all_cores_threads"] else "threads"
    return out


def finetune_rates(data: Path, size: int, epochs: int, batch: int, out: Path) -> dict:
    """Whole wall time of fine_tune() against build + fit + save of the same network, same data."""
    from tasks import runtime
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import (FineTuneConfig, SkipLog, apply_freezing, build_network, fine_tune, make_dataset,
                                make_optimizer, split_arrays)

    keras = runtime.keras()
    m = scan_dataset(data, val_fraction=0.2)
    spec = BackboneSpec("mobilenet_v2", weights="none", input_size=size, precision="auto")
    cfg = FineTuneConfig(dense=[256], dropout=0.2, batch_size=batch, augment=[], epochs=epochs, patience=epochs)
    n_train = sum(1 for s in m.samples if s.split == "train")
    t = time.perf_counter()
    res = fine_tune(m, spec, cfg, out / "ft-run")
    flow_s = time.perf_counter() - t

    t = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    net = build_network(spec, len(m.class_names), cfg)
    apply_freezing(net, cfg.freeze, cfg.freeze_batchnorm)
    tr = split_arrays(m, "train")
    va = split_arrays(m, "val")
    skips = SkipLog()
    train_ds = make_dataset(*tr, net.size, "stretch", batch, skips, training=True, seed=0)
    val_ds = make_dataset(*va, net.size, "stretch", batch, skips, training=False)
    opt = make_optimizer(cfg, int(np.ceil(n_train / batch)), "finetune")
    opt.set_head_variables(net.head_variables())
    if res.precision == "float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    net.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    net.model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, shuffle=False)
    net.model.save(out / "plain.keras")
    plain_s = time.perf_counter() - t
    return {"images": n_train, "epochs": epochs, "precision": res.precision, "flow_s": flow_s, "fit_s": plain_s,
            "flow_images_per_s": n_train * epochs / flow_s, "fit_images_per_s": n_train * epochs / plain_s,
            "finetune_over_fit": plain_s / flow_s}


def markdown(results: dict) -> str:
    """The GPU section of BENCHMARKS.md, from a results file."""
    d = results["device"]
    lines = [f"Card: **{', '.join(d['gpus']) or 'none'}**, {d['cpu_cores']} CPU cores, TensorFlow {d['tensorflow']}; "
             f"{results['images']} JPEGs, batch {results['batch']}, {results['size']} px.", "",
             f"GPU tests (`pytest -m gpu`): {results['tests'].get('summary')}", "",
             "| backbone | precision | raw (img/s) | cnncodes extract (img/s) | extract / raw |",
             "|---|---|---|---|---|"]
    for name, r in results["extraction"].items():
        for p in ("float32", "float16"):
            lines.append(f"| {name} | {p} | {r['raw'][p]:.0f} | {r['extract'][p]['images_per_s']:.0f} | "
                         f"**{r['extract'][p]['images_per_s'] / r['raw'][p]:.2f}** |")
    dec = results["decode"]
    f = results["finetune"]
    lines += ["", f"Decoding: {dec['one_core']:.0f} img/s on one core; on {dec['cores']} cores "
              f"{dec['all_cores_threads']:.0f} img/s in threads, {dec['all_cores_processes']:.0f} in processes; bottleneck of float16 ResNet50 extraction: **{results['bottleneck']}**.", "",
              f"Fine-tuning (MobileNetV2, {f['precision']}, {f['images']} images x {f['epochs']} epochs): flow "
              f"{f['flow_images_per_s']:.0f} img/s, plain fit {f['fit_images_per_s']:.0f} img/s: "
              f"**{f['finetune_over_fit']:.2f}x**.", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for k, target in GOALS.items():
        v = results["goals"][k]
        lines.append(f"| {k} | >= {target} | {v:.2f} | {'yes' if v >= target else 'no'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=10.0, help="timing window of each raw measurement")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny counts, runs on a CPU (tries the script)")
    ap.add_argument("--markdown", default=None, metavar="RESULTS", help="print the table of a results file")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return 0
    if a.dry_run:
        a.images, a.batch, a.size, a.seconds = 32, 8, 96, 1.0
    from tasks import runtime
    from tasks.backbones import BackboneSpec

    t0 = time.perf_counter()
    dev = device_info()
    if not dev["gpus"] and not a.dry_run:
        emit({"device": dev, "error": "TensorFlow sees no GPU: install tensorflow[and-cuda] (make install-gpu) "
                                      "and check nvidia-smi"}, a.json)
        return 1
    # The tests run first, in their own process, before this one holds the GPU's memory.
    tests = run_gpu_tests(timeout=240) if dev["gpus"] else {"summary": "skipped: no GPU"}
    results = {"device": dev, "tests": tests, "images": a.images, "batch": a.batch, "size": a.size, "extraction": {}}
    precisions = ("float32", "float16")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = photos(tmp / "photos", a.images)
        for name in ("resnet50", "mobilenet_v2"):
            r = {"raw": {}, "extract": {}}
            for p in precisions:
                p_run = p if dev["gpus"] else "float32"  # dry run on a CPU: the path, not the figure
                spec = BackboneSpec(name, weights="none", input_size=a.size, precision=p_run)
                r["raw"][p] = raw_rate(spec, a.batch, a.seconds)
                r["extract"][p] = extract_rate(spec, data, tmp / f"{name}-{p}.h5", a.batch)
            results["extraction"][name] = r
        results["decode"] = decode_rates(data, a.size)
        raw16 = results["extraction"]["resnet50"]["raw"]["float16"]
        results["bottleneck"] = "decoder" if results["decode"]["all_cores"] < raw16 else "gpu"
        results["finetune"] = finetune_rates(data, a.size, 2 if a.dry_run else 3, min(64, a.batch), tmp)
    res = results["extraction"]["resnet50"]
    results["goals"] = {
        "extract_over_raw_float16_resnet50": res["extract"]["float16"]["images_per_s"] / res["raw"]["float16"],
        "float16_over_float32_raw_resnet50": res["raw"]["float16"] / res["raw"]["float32"],
        "finetune_over_fit": results["finetune"]["finetune_over_fit"]}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["tensorflow_gpus_visible"] = len(runtime.gpus())
    emit(results, a.json)
    return 0 if tests.get("exit") in (0, 5, None) or not dev["gpus"] else 1


if __name__ == "__main__":
    sys.exit(main())
