"""Extraction throughput and memory, measured side by side in one run.

For each backbone, on the same generated JPEGs (photo-sized, 300-500 px):

  (a) raw      the backbone's forward pass (cut at its last layer, average pooling) on
               pre-decoded, pre-processed tensors: the ceiling;
  (b) script   a plain Keras script: PIL load + resize, preprocess_input, predict_on_batch,
               h5py append, one batch after the other;
  (c) cnncodes scan (content hashes) + extract_to_store into a fresh store.

Model building and TensorFlow start-up are excluded from all three. Then:

  * bfloat16: (c) with --precision bfloat16 against (a) in float32, and a linear probe's
    accuracy on float32 vs bfloat16 codes (generated 4-class textures; plus the real
    ../shared/data/hymenoptera with ImageNet MobileNet 0.25 when ../shared is present);
  * memory: peak RSS of an extraction of 1,000 and of 10,000 images, each in a fresh process.

Usage:
    .venv/bin/python benchmarks/extract.py                    # full run (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/extract.py --quick            # smaller counts, to try it out
    .venv/bin/python benchmarks/extract.py --only memory
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CNNCODES_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tasks import runtime  # noqa: E402
from tasks.data.synthetic import CLASSES, make_dataset  # noqa: E402
from report import emit  # noqa: E402  benchmarks/ is the script's folder

BATCH = 32


def photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of 4 texture classes at photo-like sizes (about 375 x 500)."""
    per = max(1, n // 4)
    if not root.exists():
        make_dataset(root, CLASSES[:4], per_class=per, size=(375, 500), seed=seed)
    return root


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg"))


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_raw(model_fn, arrays: np.ndarray) -> float:
    """Images/s of the compiled forward pass on pre-processed float32 tensors."""
    tf = runtime.tensorflow()
    batches = [tf.constant(arrays[i:i + BATCH]) for i in range(0, len(arrays), BATCH)]
    model_fn(batches[0])  # trace + warm up
    t = time.perf_counter()
    for b in batches:
        model_fn(b).numpy()
    return rate(len(arrays), time.perf_counter() - t)


def bench_script(name: str, files: list[Path], size: int, out: Path) -> float:
    """The plain Keras script of the seeds: PIL, preprocess_input, predict_on_batch, h5py."""
    import h5py
    import keras
    from PIL import Image

    from tasks.backbones import REGISTRY

    info = REGISTRY[name]
    model = getattr(keras.applications, info.constructor)(include_top=False, weights=None, pooling="avg",
                                                          input_shape=(size, size, 3))
    pre = getattr(keras.applications, info.module).preprocess_input
    model.predict_on_batch(np.zeros((BATCH, size, size, 3), np.float32))  # warm up, as for the others
    t = time.perf_counter()
    with h5py.File(out, "w") as f:
        ds = None
        for i in range(0, len(files), BATCH):
            batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32)
                              for p in files[i:i + BATCH]])
            feats = model.predict_on_batch(pre(batch))
            if ds is None:
                ds = f.create_dataset("features", shape=(0, feats.shape[1]), maxshape=(None, feats.shape[1]),
                                      dtype="f4", chunks=True)
            ds.resize(ds.shape[0] + len(feats), axis=0)
            ds[-len(feats):] = feats
    return rate(len(files), time.perf_counter() - t)


def bench_cnncodes(spec, data: Path, store: Path, layer: str) -> tuple[float, dict]:
    """scan + extract_to_store, minus the model build (timed by extract_to_store itself)."""
    from tasks.data.datasets import scan_dataset
    from tasks.extract import ExtractOptions, extract_to_store

    if store.exists():
        store.unlink()
    t = time.perf_counter()
    m = scan_dataset(data)
    s = extract_to_store(m, store, spec, [(layer, "avg")], ExtractOptions(batch_size=BATCH))
    wall = time.perf_counter() - t - s["timings"]["build"]
    return rate(s["computed"], wall), s


def raw_model(spec, layer: str):
    """The backbone cut at ``layer`` with average pooling, compiled, on float32 input."""
    tf = runtime.tensorflow()
    keras = runtime.keras()
    from tasks.backbones import build_backbone

    bb = build_backbone(spec)
    cut = keras.Model(bb.model.inputs, bb.model.get_layer(layer).output)

    @tf.function(input_signature=[tf.TensorSpec([None, bb.size, bb.size, 3], tf.float32)])
    def fn(x):
        return tf.reduce_mean(tf.cast(cut(x, training=False), tf.float32), axis=[1, 2])

    return fn


def decoded(files: list[Path], size: int, module: str) -> np.ndarray:
    keras = runtime.keras()
    from tasks.data.images import load_image

    x = np.stack([load_image(p, size) for p in files]).astype(np.float32)
    return getattr(keras.applications, module).preprocess_input(x)


def throughput(name: str, layer: str, n: int, work: Path, bf16: bool) -> dict:
    from tasks.backbones import REGISTRY, BackboneSpec

    info = REGISTRY[name]
    size = 224
    data = photos(work / f"photos-{n}", n)
    files = files_of(data)
    arrays = decoded(files, size, info.module)
    spec32 = BackboneSpec(name=name, weights="none", input_size=size)
    res = {"backbone": name, "images": len(files), "input_size": size}
    res["raw_float32"] = bench_raw(raw_model(spec32, layer), arrays)
    res["script"] = bench_script(name, files, size, work / f"script-{name}.h5")
    res["cnncodes_float32"], s = bench_cnncodes(spec32, data, work / f"c-{name}.h5", layer)
    res["cnncodes_timings"] = s["timings"]
    if bf16:
        spec16 = BackboneSpec(name=name, weights="none", input_size=size, precision="bfloat16")
        res["raw_bfloat16"] = bench_raw(raw_model(spec16, layer), arrays)
        res["cnncodes_bfloat16"], _ = bench_cnncodes(spec16, data, work / f"c16-{name}.h5", layer)
    del arrays
    res["ratio_cnncodes_to_raw"] = res["cnncodes_float32"] / res["raw_float32"]
    res["ratio_cnncodes_to_script"] = res["cnncodes_float32"] / res["script"]
    if bf16:
        res["ratio_bf16_cnncodes_to_fp32_raw"] = res["cnncodes_bfloat16"] / res["raw_float32"]
        res["ratio_bf16_raw_to_fp32_raw"] = res["raw_bfloat16"] / res["raw_float32"]
    return res


def probe_accuracy(store: Path, layer: str, pooling: str = "avg") -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from storage import FeatureStore

    fs = FeatureStore(store)
    tr, va = fs.read(layer, pooling, split="train"), fs.read(layer, pooling, split="val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    clf.fit(tr.features, tr.labels)
    return float(clf.score(va.features, va.labels))


def cv_accuracy(X: np.ndarray, y: np.ndarray, repeats: int = 4) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    return float(cross_val_score(clf, X.reshape(len(X), -1), y, cv=cv).mean())


def precision_effect(work: Path, n: int) -> list[dict]:
    """Linear-probe accuracy and code agreement, float32 vs bfloat16, on the same images."""
    from storage import FeatureStore
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.extract import extract_to_store

    cases = [("generated textures, 4 classes", photos(work / f"photos-{n}", n),
              dict(name="resnet50", weights="none", input_size=224), "conv4_block6_out")]
    hym = ROOT.parent / "shared" / "data" / "hymenoptera"
    keras_home = os.environ.get("KERAS_HOME", "")
    if hym.exists() and Path(keras_home, "models", "mobilenet_2_5_224_tf_no_top.h5").exists():
        cases.append(("hymenoptera (real photos), ImageNet weights", hym,
                      dict(name="mobilenet", weights="imagenet", backbone_args={"alpha": 0.25}), "conv_pw_13_relu"))
    out = []
    for label, data, kw, layer in cases:
        m = scan_dataset(data, val_fraction=0.3)
        row = {"data": label, "backbone": kw["name"], "layer": layer, "images": len(m.samples)}
        feats = {}
        for prec in ("float32", "bfloat16"):
            store = work / f"prec-{kw['name']}-{prec}-{len(m.samples)}.h5"
            if store.exists():
                store.unlink()
            extract_to_store(m, store, BackboneSpec(**kw, precision=prec), [(layer, "avg")])
            row[f"probe_accuracy_{prec}"] = probe_accuracy(store, layer)
            c = FeatureStore(store).read(layer, "avg")
            feats[prec] = c.features[np.argsort(c.paths.astype(str))]
        a, b = feats["float32"], feats["bfloat16"]
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        row["mean_cosine_fp32_bf16"] = float(cos.mean())
        row["relative_l2_error"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        row["accuracy_delta_points"] = 100 * (row["probe_accuracy_bfloat16"] - row["probe_accuracy_float32"])
        # One val split of a few hundred images moves by whole images; repeated CV over every image,
        # on the same folds for both precisions, measures the difference with less noise.
        labels = np.asarray([lab for _, lab in sorted(zip(c.paths.astype(str), c.labels))])
        for prec in ("float32", "bfloat16"):
            row[f"cv_accuracy_{prec}"] = cv_accuracy(feats[prec], labels)
        row["cv_accuracy_delta_points"] = 100 * (row["cv_accuracy_bfloat16"] - row["cv_accuracy_float32"])
        out.append(row)
    return out


MEMORY_CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
os.environ["CNNCODES_PROGRESS"] = "0"
from tasks.backbones import BackboneSpec
from tasks.data.datasets import scan_dataset
from tasks.extract import extract_to_store

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

during = []
def progress(done, total):  # called after every batch: the resident set while extracting
    during.append(rss_mb())

m = scan_dataset({data!r})
t = time.perf_counter()
s = extract_to_store(m, {store!r}, BackboneSpec(name="mobilenet_v2", weights="none", input_size=96,
                     backbone_args={{"alpha": 0.35}}), [("out_relu", "avg"), ("block_6_expand_relu", "avg")],
                     progress=progress)
print(json.dumps({{"images": s["computed"], "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_first_batch_mb": during[1], "rss_max_during_extraction_mb": max(during),
                  "rss_last_batch_mb": during[-1]}}))
"""


def memory(work: Path, sizes=(1000, 10000)) -> list[dict]:
    out = []
    for n in sizes:
        data = work / f"small-{n}"
        if not data.exists():
            make_dataset(data, CLASSES[:4], per_class=n // 4, size=(120, 160), seed=n)
        store = work / f"mem-{n}.h5"
        if store.exists():
            store.unlink()
        code = MEMORY_CHILD.format(root=str(ROOT), data=str(data), store=str(store))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts, to try the script")
    ap.add_argument("--only", choices=["throughput", "precision", "memory"], action="append")
    ap.add_argument("--work", default=None, help="folder for generated images and stores (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    only = set(args.only or ["throughput", "precision", "memory"])
    work = Path(args.work or tempfile.mkdtemp(prefix="cnncodes-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n_resnet, n_mobile = (64, 128) if args.quick else (256, 512)
    bf16 = runtime.cpu_supports_bfloat16() or bool(runtime.gpus())
    results: dict = {"device": runtime.device_name(), "cpu_bf16": runtime.cpu_supports_bfloat16(),
                     "cores": os.cpu_count(), "batch_size": BATCH}
    if "throughput" in only:
        results["throughput"] = [throughput("resnet50", "conv5_block3_out", n_resnet, work, bf16),
                                 throughput("mobilenet_v2", "out_relu", n_mobile, work, False)]
    if "precision" in only and bf16:
        results["precision"] = precision_effect(work, n_resnet)
    if "memory" in only:
        results["memory"] = memory(work, (200, 2000) if args.quick else (1000, 10000))
        a, b = results["memory"]
        results["memory_ratio"] = b["peak_rss_mb"] / a["peak_rss_mb"]
        results["memory_ratio_during_extraction"] = b["rss_max_during_extraction_mb"] / a["rss_max_during_extraction_mb"]
    emit(results, args.json)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
