"""Export a registered model as one folder that serves without cnncodes.

``<output>/`` holds the network (``model.keras``, ``saved_model/``, or ``model.tflite`` and optionally
``model-int8.tflite``), ``model.json`` (classes in output order, input size and preprocessing,
provenance, the source model's sha256, the checks run) and ``MODEL_CARD.md``. The folder is written
under a temporary name beside ``output`` and renamed into place when complete: a crash leaves no
half export. An existing ``output`` is refused unless ``force``.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage import ModelRegistry, open_store
from storage.files import fsync_dir, now_iso, temp_beside
from storage.hashing import file_sha256

from .. import runtime
from ..settings import ExportOptions
from .card import model_card
from .fold import ExportError
from .model import Built, build, preprocessing_text, resolve

EXPORT_FORMAT = "cnncodes-export/1"
FILES = {"keras": "model.keras", "savedmodel": "saved_model", "tflite": "model.tflite"}
INT8_FILE = "model-int8.tflite"
# Largest difference tolerated between the written file, loaded back, and the network in memory.
RELOAD_TOLERANCE = {"keras": 1e-5, "savedmodel": 1e-5, "tflite": 1e-3}


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise ExportError(f"{output} exists; choose another --output, or pass --force to replace it.")
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} exists and is not a folder (an export is a folder); choose another --output.")
    if output.exists() and not (output / "model.json").exists() and any(output.iterdir()):
        raise ExportError(f"{output} is a folder that holds no export (no model.json); --force only replaces an "
                          "earlier export. Choose another --output.")


# ----------------------------------------------------------------------------- test images
def test_images(registry: str | Path, built: Built) -> tuple[list[str], np.ndarray, str | None]:
    """Absolute paths and labels of the model's test split (val when it has none); the split's name
    (None when neither is known)."""
    meta = built.record.metadata
    if meta.get("kind") == "linear-probe":
        fs = open_store(meta["store"])
        root = Path(fs.provenance.get("dataset") or "")
        for split in ("test", "val"):
            codes = fs.read(meta["layer"], meta["pooling"], split=split)
            if len(codes):
                return [str(root / p) for p in codes.paths], np.asarray(codes.labels), split
        return [], np.zeros(0, int), None
    from ..data.datasets import scan_dataset

    root = meta.get("dataset")
    if not root or not Path(root).exists():
        return [], np.zeros(0, int), None
    fractions = (meta.get("split") or {}).get("fractions") or {}
    pinned = (ModelRegistry(registry).splits(built.record.name).get("samples")) or None
    m = scan_dataset(root, float(fractions.get("val", 0.2)), float(fractions.get("test", 0.15)),
                     int((meta.get("split") or {}).get("seed") or 0), pinned=pinned)
    for split in ("test", "val"):
        samples = [s for s in m.samples if s.split == split]
        if samples:
            names = list(m.class_names)
            if names != list(meta["class_names"]):
                return [], np.zeros(0, int), None
            return [m.abspath(s) for s in samples], np.array([s.label for s in samples]), split
    return [], np.zeros(0, int), None


def _decode(paths: list[str], size: int, resize: str) -> tuple[np.ndarray, list[int]]:
    from ..data.images import ImageError, load_image

    arrays, ok = [], []
    for i, p in enumerate(paths):
        try:
            arrays.append(load_image(p, size, resize))
            ok.append(i)
        except (ImageError, OSError):
            continue
    return (np.stack(arrays).astype(np.float32) if arrays else np.zeros((0, size, size, 3), np.float32)), ok


# ----------------------------------------------------------------------------- writers
def _tflite_bytes(saved_model: Path, int8: bool) -> bytes:
    tf = runtime.tensorflow()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if int8:  # dynamic range: int8 weights, float activations; no calibration data needed
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def tflite_predict(path: str | Path, images: np.ndarray, delegates: bool = False) -> np.ndarray:
    """Run a .tflite file on float32 images, one at a time (the interpreter's fixed batch of 1), with
    TFLite's reference kernels, or with its default delegates (XNNPACK on CPUs) when ``delegates``."""
    import warnings

    tf = runtime.tensorflow()
    kinds = tf.lite.experimental.OpResolverType
    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice: it still runs the file
        warnings.simplefilter("ignore")
        interp = tf.lite.Interpreter(model_path=str(path), experimental_op_resolver_type=(
            kinds.AUTO if delegates else kinds.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for img in images:
        interp.set_tensor(inp["index"], img[None].astype(np.float32))
        interp.invoke()
        rows.append(np.array(interp.get_tensor(out["index"])[0]))
    return np.stack(rows) if rows else np.zeros((0, int(out["shape"][-1])))


def _saved_model_predict(path: Path, images: np.ndarray) -> np.ndarray:
    tf = runtime.tensorflow()
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["serving_default"]
    out = fn(tf.constant(images))
    return np.asarray(next(iter(out.values())))


def _write(built: Built, fmt: str, tmp: Path, int8: bool) -> dict[str, Path]:
    """Write the network in ``fmt`` into the folder ``tmp``; returns {role: path}."""
    model = built.model
    if fmt == "keras":
        path = tmp / FILES["keras"]
        model.save(path)
        return {"model": path}
    saved = tmp / FILES["savedmodel"] if fmt == "savedmodel" else tmp / ".saved_model"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    if fmt == "savedmodel":
        return {"model": saved}
    files = {"model": tmp / FILES["tflite"]}
    files["model"].write_bytes(_tflite_bytes(saved, int8=False))
    if int8:
        files["int8"] = tmp / INT8_FILE
        files["int8"].write_bytes(_tflite_bytes(saved, int8=True))
    shutil.rmtree(saved)
    return files


def _run_file(fmt: str, path: Path, images: np.ndarray) -> np.ndarray:
    if fmt == "keras":
        keras = runtime.keras()
        return np.asarray(keras.saving.load_model(path, compile=False).predict(images, verbose=0))
    if fmt == "savedmodel":
        return _saved_model_predict(path, images)
    return tflite_predict(path, images)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels)) if len(labels) else float("nan")


def _interval(correct: int, n: int, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of an accuracy of ``correct`` out of ``n`` (resampling images)."""
    from ..decide.evidence import paired_bootstrap

    if n == 0:
        return [float("nan"), float("nan")]
    outcomes = np.r_[np.ones(correct), np.zeros(n - correct)]
    return list(paired_bootstrap(np.zeros(n), outcomes, seed=seed))


# ----------------------------------------------------------------------------- evidence for the card
def _splits_and_test(registry: str | Path, built: Built) -> tuple[dict[str, int], dict[str, Any]]:
    """Images per split, and the test metrics (accuracy, interval, per-class recall) of the model."""
    from ..reports.evaluate import evaluate_scores

    meta = built.record.metadata
    names = list(meta["class_names"])
    if meta.get("kind") == "linear-probe":
        fs = open_store(meta["store"])
        counts = dict(Counter(fs.row_splits(meta["layer"], meta["pooling"]).values()))
        probe = built.model.get_layer("probe")
        for split in ("test", "val"):
            codes = fs.read(meta["layer"], meta["pooling"], split=split)
            if len(codes):
                X = codes.features.reshape(len(codes), -1).astype(np.float32)
                scores = np.asarray(probe.predict(X, verbose=0))
                m = evaluate_scores(scores, codes.labels, names)
                break
        else:
            return counts, {}
    else:
        metrics = meta.get("metrics") or {}
        counts = {s: int(v.get("images", 0)) for s, v in metrics.items()}
        split = "test" if "test" in metrics else ("val" if "val" in metrics else None)
        if split is None:
            return counts, {}
        m = metrics[split]
    n = int(m["images"])
    correct = int(round(m["accuracy"] * n))
    return counts, {"split": split, "images": n, "accuracy": float(m["accuracy"]),
                    "balanced_accuracy": m.get("balanced_accuracy"), "interval": _interval(correct, n),
                    "level": 0.95, "per_class": [{k: c.get(k) for k in ("class", "recall", "precision", "support")}
                                                 for c in m.get("per_class", [])],
                    "adaptation": m.get("adaptation")}


# ----------------------------------------------------------------------------- the export
def export_model(registry: str | Path, name: str, version: int | str | None, output: str | Path,
                 options: ExportOptions | None = None, progress: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Export model ``name`` (``version``: number, alias; default the champion, else the latest) of
    ``registry`` into the folder ``output``; returns what was written and the checks run."""
    options = options or ExportOptions()
    output = Path(output)
    say = progress or (lambda _msg: None)
    _check_output(output, options.force)
    if options.int8 and options.format != "tflite":
        raise ExportError("--int8 quantises a TFLite model; use it with --format tflite.")
    if options.format in ("savedmodel", "tflite") and runtime.backend() != "tensorflow":
        raise ExportError(f"--format {options.format} is written by TensorFlow, and this process computes on the "
                          f"{runtime.backend()} backend: export it with --backend tensorflow (a model trained on any "
                          "backend exports there), or use --format keras, which every backend reads.")
    record = resolve(registry, name, version)
    say(f"building {record.name} v{record.version}")
    built = build(registry, record)
    meta = record.metadata
    class_names = list(meta["class_names"])

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(output)
    tmp.mkdir()
    try:
        say(f"writing {options.format}")
        files = _write(built, options.format, tmp, options.int8)
        paths, labels, split = test_images(registry, built) if options.int8 else ([], np.zeros(0, int), None)
        # Loaded back: the file computes what the network in memory computes (test images, else random ones).
        rng = np.random.default_rng(0)
        probe_images = rng.integers(0, 256, (4, built.size, built.size, 3)).astype(np.float32)
        want = np.asarray(built.model.predict(probe_images, verbose=0))
        got = _run_file(options.format, files["model"], probe_images)
        reload_diff = float(np.max(np.abs(got - want)))
        tol = RELOAD_TOLERANCE[options.format] * (1.0 if built.outputs == "probabilities" else
                                                  max(1.0, float(np.max(np.abs(want)))))
        if reload_diff > tol:
            raise ExportError(f"the written {options.format} model, loaded back, differs from the network by up to "
                              f"{reload_diff:.3g} (tolerated: {tol:g}); nothing was exported. Report this as a bug, "
                              "or try another --format.")
        reload = {"images": int(len(probe_images)), "max_abs_difference": reload_diff}
        if options.format == "tflite":
            # TFLite's default CPU delegate (XNNPACK) computes a few layer shapes differently from the
            # reference kernels (seen: a convolution whose stride exceeds its kernel): measured, and said.
            xnn = float(np.max(np.abs(tflite_predict(files["model"], probe_images, delegates=True) - want)))
            reload["kernels"] = "TFLite reference kernels (no default delegate)"
            reload["default_delegate_max_abs_difference"] = xnn
            if xnn > tol:
                reload["warning"] = (f"TFLite's default CPU delegate (XNNPACK) computes this network differently "
                                     f"(up to {xnn:.3g}): create the interpreter with experimental_op_resolver_type="
                                     "tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, and "
                                     "check the runtime you deploy to on a few images.")
        int8 = None
        if options.int8:
            say("measuring the int8 model")
            int8 = _measure_int8(files, paths, labels, split, built)
        counts, test = _splits_and_test(registry, built)
        info = _info(built, options, files, tmp, class_names, counts, test, int8, reload)
        (tmp / "model.json").write_text(json.dumps(info, indent=1, default=str))
        (tmp / "MODEL_CARD.md").write_text(model_card(info))
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(output.resolve()), "format": options.format, "model": record.name,
            "version": record.version, "files": sorted(str(Path(output) / Path(f).relative_to(tmp))
                                                       for f in files.values()) + [
                str(output / "model.json"), str(output / "MODEL_CARD.md")],
            "classes": class_names, "input_size": built.size, "outputs": built.outputs,
            "self_check": built.self_check, "reload_check": info["checks"]["reload"], "test": test, "int8": int8}


def _replace(tmp: Path, output: Path) -> None:
    """Rename the finished folder into place; an earlier export there (``--force``) goes only then."""
    old = None
    if output.exists():
        old = temp_beside(output, ".old")
        os.rename(output, old)
    os.rename(tmp, output)
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _measure_int8(files: dict[str, Path], paths: list[str], labels: np.ndarray, split: str | None,
                  built: Built) -> dict[str, Any]:
    out: dict[str, Any] = {"file": files["int8"].name, "bytes": files["int8"].stat().st_size,
                           "float32_bytes": files["model"].stat().st_size, "split": split}
    if not paths:
        out["note"] = ("no test or val images were found (the dataset moved?): the accuracy change is not "
                       "measured")
        return out
    images, ok = _decode(paths, built.size, built.resize)
    labels = labels[ok]
    p32 = tflite_predict(files["model"], images)
    p8 = tflite_predict(files["int8"], images)
    a32, a8 = _accuracy(p32, labels), _accuracy(p8, labels)
    agree = float(np.mean(np.argmax(p32, 1) == np.argmax(p8, 1))) if len(labels) else float("nan")
    out.update(images=int(len(labels)), float32_accuracy=a32, int8_accuracy=a8, accuracy_change=a8 - a32,
               same_prediction=agree, max_abs_difference=float(np.max(np.abs(p32 - p8))) if len(labels) else None)
    return out


def _info(built: Built, options: ExportOptions, files: dict[str, Path], tmp: Path, class_names: list[str],
          counts: dict[str, int], test: dict[str, Any], int8: dict[str, Any] | None,
          reload: dict[str, Any]) -> dict[str, Any]:
    rec = built.record
    meta = rec.metadata

    def digest(p: Path) -> dict[str, str]:
        if p.is_dir():
            return {str(f.relative_to(tmp)): file_sha256(f) for f in sorted(p.rglob("*")) if f.is_file()}
        return {p.name: file_sha256(p)}

    hashes: dict[str, str] = {}
    for p in files.values():
        hashes.update(digest(p))
    return {
        "export_format": EXPORT_FORMAT, "format": options.format, "model_file": files["model"].name,
        "created": now_iso(), "classes": class_names,
        "input": {"shape": [built.size, built.size, 3], "dtype": "float32", "range": [0, 255], "color": "RGB",
                  "size": built.size, "resize": built.resize,
                  "preprocessing": f"inside the model: {preprocessing_text(built.preprocessing)}",
                  "preprocessing_mode": built.preprocessing},
        "output": {"kind": built.outputs, "order": "classes", "columns": len(class_names)},
        "source": {"registry_model": rec.name, "version": rec.version, "kind": meta.get("kind"),
                   "model_file": meta.get("model_file"), "model_sha256": meta.get("model_sha256"),
                   "metadata_sha256": meta.get("metadata_sha256"), "created": meta.get("created"),
                   "libraries": meta.get("libraries")},
        "provenance": {**built.details, "dataset": meta.get("dataset"), "split": meta.get("split"),
                       "train_images": meta.get("train_images"), "manifest_fingerprint":
                           meta.get("manifest_fingerprint")},
        "data": {"splits": counts},
        "test": test,
        "int8": int8,
        "checks": {"fold": built.self_check, "reload": reload},
        "files": hashes,
        "libraries": runtime.library_versions(),
    }
