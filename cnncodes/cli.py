"""The ``cnncodes`` command line: one sub-command per flow, plus listings.

A thin layer: it parses options, runs the flow (in Prefect's embedded mode:
no server needed) and prints the result. ``--json`` prints one JSON object on
stdout; logs and progress bars go to stderr. Errors print their message, not a
traceback, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

EXIT_USER_ERROR = 2


def _add_backbone_options(p: argparse.ArgumentParser, weights_default: str = "imagenet") -> None:
    p.add_argument("--weights", default=weights_default,
                   help="'imagenet' (through Keras's cache, KERAS_HOME), 'none' (random, seeded), "
                        "or a weights file (default: %(default)s)")
    p.add_argument("--backbone-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor option passed through, repeatable, e.g. alpha=0.25 (recorded in the store)")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input size in pixels (default: the backbone's own, e.g. 224)")
    p.add_argument("--preprocessing", default="auto",
                   help="'auto' (the family's preprocess_input), 'none', 'tf', 'caffe', 'torch', 'scale01', "
                        "or a keras.applications module name (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["float32", "float16", "bfloat16", "auto"],
                   help="compute precision of the whole network: float32; float16 (mixed, GPUs); bfloat16 (GPUs "
                        "and CPUs with AVX512-BF16/AMX); auto = float16 on a GPU, float32 on a CPU (an existing "
                        "store keeps its own where it runs here) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random split and of random weights (default: %(default)s)")


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", action="append", default=[], metavar="NAME",
                   help="Keras layer name to cut at, repeatable (one forward pass stores them all); "
                        "NAME:POOLING sets its pooling. `cnncodes layers BACKBONE` lists the names")
    p.add_argument("--pooling", action="append", default=[], choices=["avg", "max", "flatten", "none"],
                   help="pooling of the layer outputs: one for all layers or one per --layer (default: avg)")
    p.add_argument("--store", default=None,
                   help="HDF5 feature store (default: OUT/stores/<dataset>__<backbone>__<weights>.h5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage type of the features (default: %(default)s)")
    p.add_argument("--compression", default=None, choices=["gzip", "lzf"],
                   help="HDF5 compression of the features (default: none)")
    p.add_argument("--resize", default="stretch", choices=["stretch", "crop", "pad"],
                   help="how images are fitted to the square input (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class held out for validation when the data has no split (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="share of each class held out for test when the data has no split (default: %(default)s)")
    p.add_argument("--out", default="cnncodes-out",
                   help="folder for stores, manifests and reports (default: %(default)s)")
    p.add_argument("--shards", type=int, default=1,
                   help="split the dataset into N shards extracted side by side by Dask workers, each into its "
                        "own store file; --store is then an index that reads as one store (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes of the local Dask cluster for --shards (default: one per shard)")
    p.add_argument("--dask-address", default=None,
                   help="use this Dask scheduler (tcp://host:8786) instead of a local cluster")
    p.add_argument("--gpus", type=int, default=0,
                   help="one shard per GPU of this machine, each worker pinned to its GPU (default: %(default)s)")
    p.add_argument("--xla", action="store_true",
                   help="compile the forward pass with XLA (the same codes; faster on GPUs)")


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None, help="model registry folder (default: OUT/registry)")
    p.add_argument("--out", default="cnncodes-out", help="output folder (default: %(default)s)")


def _add_store_parser(sub) -> None:
    """`cnncodes store ls|info|export|verify`: look after feature stores (no TensorFlow needed)."""
    store = sub.add_parser("store", help="list, inspect, export and verify feature stores")
    ssub = store.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")

    p = ssub.add_parser("ls", help="size, provenance and layer groups of a store")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = ssub.add_parser("info", help="ls plus per-group split/class counts and the first rows")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--head", type=int, default=5, help="rows shown per group (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = ssub.add_parser("export", help="export one group to .parquet, .csv or .npy (+ .rows.csv)")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--layer", required=True, help="layer group to export")
    p.add_argument("--pooling", default=None, help="pooling of that group (needed when it has several)")
    p.add_argument("--split", action="append", default=None, help="only this split, repeatable (default: all)")
    p.add_argument("--class", dest="classes", action="append", default=None, metavar="CLASS",
                   help="only this class (name or index), repeatable (default: all)")
    p.add_argument("--output", "-o", required=True,
                   help="output file; its suffix (.parquet, .csv, .npy) sets the format unless --format does")
    p.add_argument("--format", default=None, choices=["parquet", "csv", "npy"], help="output format")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows in memory at a time (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = ssub.add_parser("verify", help="check a store's structure and contents; exit 1 when problems are found")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--check-files", action="store_true",
                   help="also re-hash each image and compare with the stored sha256")
    p.add_argument("--dataset", default=None,
                   help="dataset root the image paths are relative to (default: the one the store records)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnncodes", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backbones", help="list the registered backbones")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("layers", help="list a backbone's layers with output shape, stride and parameters")
    p.add_argument("backbone", help="registered name (e.g. resnet50) or a .keras/.h5 model file")
    _add_backbone_options(p, weights_default="none")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("extract", help="flow extract-features: images -> CNN codes in an HDF5 store")
    p.add_argument("data", help="folder of class folders, folder with train/ val/ [test/], or CSV path,label[,split]")
    p.add_argument("--backbone", default="mobilenet_v2",
                   help="registered name (see `cnncodes backbones`) or a .keras/.h5 model file (default: %(default)s)")
    _add_backbone_options(p)
    _add_extract_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("train-linear", help="flow train-linear: linear SVM/softmax/SGD on a store's codes")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--layer", required=True, help="layer group to train on (`cnncodes extract` --layer)")
    p.add_argument("--pooling", default=None, help="pooling of that group (needed when it has several)")
    p.add_argument("--classifier", default="softmax", choices=["svm", "softmax", "sgd"],
                   help="linear SVM (calibrated), multinomial logistic regression, or SGD trained chunk by "
                        "chunk for stores larger than memory (default: %(default)s)")
    p.add_argument("--C", type=float, default=None,
                   help="inverse regularisation strength (default: chosen by stratified k-fold CV among "
                        "0.001, 0.01, 0.1, 1, 10)")
    p.add_argument("--cv-folds", type=int, default=5, help="folds of the C search (default: %(default)s)")
    p.add_argument("--class-weight", default=None, choices=["balanced"],
                   help="weight classes inversely to their frequency (default: none)")
    p.add_argument("--l2-normalize", action="store_true", help="L2-normalise codes after standardisation")
    p.add_argument("--pca", type=float, default=None,
                   help="PCA before the classifier: components (>= 1) or share of variance (< 1)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="SVM without probability calibration (no probabilities in predictions)")
    p.add_argument("--sgd-epochs", type=int, default=5, help="passes over the store for --classifier sgd")
    p.add_argument("--chunk-rows", type=int, default=8192, help="rows per chunk for --classifier sgd")
    p.add_argument("--model-name", default=None,
                   help="registry name (default: <store>-<layer>-<classifier>); each run adds a version")
    _add_registry_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of CV folds and solvers (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("sweep", help="flow sweep: cross-validate a probe on each layer of a store")
    p.add_argument("store", help="feature store with several layer groups")
    p.add_argument("--layer", action="append", default=[], help="layers to compare (default: every group)")
    p.add_argument("--pooling", default=None, help="only groups with this pooling")
    p.add_argument("--classifier", default="softmax", choices=["svm", "softmax"], help="(default: %(default)s)")
    p.add_argument("--C", type=float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--cv-folds", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--out", default="cnncodes-out", help="reports go to OUT/reports (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("predict", help="flow predict: classify new images with a registered model")
    p.add_argument("images", help="folder of images (searched recursively), an image, or a .txt/.csv list")
    p.add_argument("--model", required=True, help="registered model name (`train-linear` prints it)")
    p.add_argument("--version", default=None, help="version number or alias (default: the latest)")
    _add_registry_options(p)
    p.add_argument("--output", default=None,
                   help="predictions file, .csv or .parquet (default: OUT/predictions/<model>.csv)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("fine-tune", help="flow fine-tune: train the backbone itself with a new head (large data)")
    p.add_argument("data", help="folder of class folders, folder with train/ val/ [test/], or CSV path,label[,split]")
    p.add_argument("--backbone", default="mobilenet_v2", help="registered name or .keras/.h5 file (default: %(default)s)")
    _add_backbone_options(p)
    p.add_argument("--cut-layer", default=None, help="use the backbone only up to this layer")
    p.add_argument("--freeze", default="none",
                   help="'all' (head only), 'none', 'first:N' or 'until:LAYER' (default: %(default)s)")
    p.add_argument("--train-batchnorm", dest="freeze_batchnorm", action="store_false",
                   help="let BatchNormalization layers of the unfrozen part train (default: all stay frozen)")
    p.add_argument("--head-pooling", default="avg", choices=["avg", "flatten"], help="(default: %(default)s)")
    p.add_argument("--dense", type=int, action="append", default=None,
                   help="hidden Dense+ReLU width of the head, repeatable (default: 1024; 0 for none)")
    p.add_argument("--dropout", type=float, default=0.5, help="after each hidden Dense (default: %(default)s)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="(default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="base rate of the backbone (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--head-lr-multiplier", type=float, default=10.0,
                   help="the new head learns at base rate x this (default: %(default)s)")
    p.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine", "plateau"],
                   help="learning-rate schedule (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default: %(default)s)")
    p.add_argument("--head-epochs", type=int, default=0,
                   help="two-phase: first train the head alone this many epochs with Adam (default: %(default)s)")
    p.add_argument("--head-learning-rate", type=float, default=1e-3, help="phase one's rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--augment", default="flip,rotation,zoom",
                   help="comma list of flip, rotation, zoom, translation, contrast; '' for none (default: %(default)s)")
    p.add_argument("--monitor", default="val_accuracy", help="metric for checkpoints and early stopping (default: %(default)s)")
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (default: %(default)s)")
    # Before --precision covered fine-tuning too: kept so that existing scripts run; off means float32.
    p.add_argument("--mixed-precision", default=None, choices=["auto", "off", "float16", "bfloat16"],
                   help=argparse.SUPPRESS)
    p.add_argument("--xla", action="store_true", help="compile the training step with XLA")
    p.add_argument("--resize", default="stretch", choices=["stretch", "crop", "pad"], help="(default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="(default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--model-name", default=None, help="registry name (default: <dataset>-<backbone>-finetuned)")
    _add_registry_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("transfer", help="flow transfer: measure size and similarity, pick the case, train, gate")
    p.add_argument("data", help="folder of class folders, folder with train/ val/ [test/], or CSV path,label[,split]")
    p.add_argument("--backbone", default="mobilenet_v2", help="registered name or .keras/.h5 file (default: %(default)s)")
    _add_backbone_options(p)
    p.add_argument("--layers", action="append", default=[], metavar="NAME",
                   help="candidate layers to compare, last one = the late layer (default: the end of each "
                        "stage at strides 8, 16, 32 plus the last layer)")
    p.add_argument("--case", type=int, choices=[1, 2, 3, 4], default=None, help="force a case instead of measuring")
    p.add_argument("--layer", default=None, help="force the linear probe's layer")
    p.add_argument("--large-per-class", type=int, default=500,
                   help="median training images per class from which data is 'large' (default: %(default)s)")
    p.add_argument("--similarity-margin", type=float, default=0.02,
                   help="similar when the last layer's CV score >= best earlier layer's minus this (default: %(default)s)")
    p.add_argument("--gate-margin", type=float, default=0.01,
                   help="a fine-tuned model must beat the probe by this accuracy to be champion (default: %(default)s)")
    p.add_argument("--from-scratch", action="store_true", help="case 4 trains from random weights")
    p.add_argument("--classifier", default="softmax", choices=["svm", "softmax", "sgd"], help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs, cases 3 and 4 (default: %(default)s)")
    p.add_argument("--head-epochs", type=int, default=3, help="head-only epochs first (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="fine-tuning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="(default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--model-name", default=None, help="base name of the models (default: <dataset>-<backbone>)")
    _add_registry_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    _add_store_parser(sub)

    p = sub.add_parser("demo", help="generate a small dataset and run the pipeline on it end to end")
    p.add_argument("--out", default="cnncodes-out", help="output folder (default: %(default)s)")
    p.add_argument("--images-per-class", type=int, default=40, help="generated images per class (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _emit(result: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")


def cmd_backbones(args) -> int:
    from tasks.backbones import REGISTRY

    rows = [{"name": b.name, "constructor": f"keras.applications.{b.constructor}", "default_size": b.default_size,
             "min_size": b.min_size, "preprocessing": b.preprocessing, "options": list(b.options)}
            for b in REGISTRY.values()]
    text = "\n".join(f"{r['name']:<22} {r['constructor']:<40} {r['default_size']:>4}px  "
                     f"options: {', '.join(r['options']) or '-'}" for r in rows)
    _emit({"backbones": rows}, args.json, text)
    return 0


def cmd_layers(args) -> int:
    from tasks.backbones import BackboneSpec, build_backbone, parse_backbone_args

    spec = BackboneSpec(args.backbone, weights=args.weights, input_size=args.input_size,
                        backbone_args=parse_backbone_args(args.backbone_arg), preprocessing=args.preprocessing,
                        precision=args.precision, seed=args.seed)
    bb = build_backbone(spec)
    layers = [layer.as_dict() for layer in bb.layers()]
    head = f"{'layer':<32} {'kind':<24} {'output shape':<22} {'stride':>6} {'params':>10}"
    text = "\n".join([f"{args.backbone} at {bb.size}px: {len(layers)} layers", head] + [
        f"{d['name']:<32} {d['kind']:<24} {str(tuple(d['output_shape'][1:])):<22} "
        f"{d['stride'] if d['stride'] else '-':>6} {d['params']:>10}" for d in layers])
    _emit({"backbone": args.backbone, "input_size": bb.size, "layers": layers}, args.json, text)
    return 0


def _extract_kwargs(args) -> dict[str, Any]:
    from tasks.backbones import parse_backbone_args

    return dict(data=args.data, backbone=args.backbone, layers=args.layer, pooling=args.pooling or "avg",
                store=args.store, weights=args.weights, backbone_args=parse_backbone_args(args.backbone_arg),
                input_size=args.input_size, preprocessing=args.preprocessing, precision=args.precision,
                batch_size=args.batch_size, dtype=args.dtype, compression=args.compression, resize=args.resize,
                val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, out=args.out,
                shards=args.shards, workers=args.workers, dask_address=args.dask_address, gpus=args.gpus,
                xla=args.xla)


def _extract_text(s: dict[str, Any]) -> str:
    lines = [f"store:  {s['store']}", f"report: {s['report']}",
             f"images: {s['images']} ({s['computed']} computed, {s['reused']} reused, {s['removed']} removed, "
             f"{len(s['skipped'])} skipped)"]
    lines += [f"group:  {g['group']} rows={g['rows']} shape={g['feature_shape']}" for g in s["groups"]]
    lines += [f"skipped {k['path']}: {k['reason']}" for k in s["skipped"][:20]]
    if len(s["skipped"]) > 20:
        lines.append(f"... and {len(s['skipped']) - 20} more skipped files: see the report")
    return "\n".join(lines)


def cmd_extract(args) -> int:
    from flows.extract_features import extract_features

    summary = extract_features(**_extract_kwargs(args))
    _emit(summary, args.json, _extract_text(summary))
    return 0


def _registry(args) -> str:
    return args.registry or str(Path(args.out) / "registry")


def _metrics_text(metrics: dict[str, Any]) -> list[str]:
    return [f"{split:<6} accuracy {m['accuracy']:.3f}  balanced {m['balanced_accuracy']:.3f}  "
            f"macro-F1 {m['macro_f1']:.3f}  ({m['images']} images)" for split, m in metrics.items()]


def cmd_train_linear(args) -> int:
    from flows.train_linear import train_linear

    pca = args.pca
    if pca is not None and pca >= 1:
        pca = int(pca)
    r = train_linear(store=args.store, layer=args.layer, pooling=args.pooling, classifier=args.classifier, C=args.C,
                     cv_folds=args.cv_folds, class_weight=args.class_weight, l2_normalize=args.l2_normalize,
                     pca=pca, calibrate=args.calibrate, sgd_epochs=args.sgd_epochs, chunk_rows=args.chunk_rows,
                     model_name=args.model_name, registry=_registry(args), out=args.out, seed=args.seed)
    text = [f"model:  {r['model']} v{r['version']} (C={r['C']:g}) in {r['registry']}", f"report: {r['report']}"]
    _emit(r, args.json, "\n".join(text + _metrics_text(r["metrics"])))
    return 0


def cmd_sweep(args) -> int:
    from flows.sweep import sweep

    r = sweep(store=args.store, layers=args.layer or None, pooling=args.pooling, classifier=args.classifier,
              C=args.C, cv_folds=args.cv_folds, out=args.out, seed=args.seed)
    text = [f"{x['layer'] + '/' + x['pooling']:<40} {x['mean']:.3f} ± {x['std']:.3f}" for x in r["rows"]]
    text += [f"best:   {r['best']['layer']}/{r['best']['pooling']}", f"report: {r['report']}", f"plot:   {r['plot']}"]
    _emit(r, args.json, "\n".join(text))
    return 0


def cmd_predict(args) -> int:
    from flows.predict import predict

    output = args.output or str(Path(args.out) / "predictions" / f"{args.model}.csv")
    r = predict(images=args.images, model=args.model, version=args.version, registry=_registry(args),
                output=output, batch_size=args.batch_size)
    text = [f"predictions: {r['predictions']}",
            f"images: {r['images']} ({r['reused']} codes reused, {r['computed']} computed, "
            f"{len(r['skipped'])} skipped) with {r['model']} v{r['version']}"]
    text += [f"  {c}: {n}" for c, n in r["class_counts"].items()]
    text += [f"skipped {k['path']}: {k['reason']}" for k in r["skipped"][:20]]
    _emit(r, args.json, "\n".join(text))
    return 0


def _precision(args) -> str:
    """--precision, or the older --mixed-precision (off = float32) where a script still gives it."""
    if args.mixed_precision is not None:
        return {"off": "float32"}.get(args.mixed_precision, args.mixed_precision)
    return args.precision


def cmd_fine_tune(args) -> int:
    from flows.fine_tune import fine_tune
    from tasks.backbones import parse_backbone_args

    dense = [d for d in (args.dense if args.dense is not None else [1024]) if d > 0]
    r = fine_tune(data=args.data, backbone=args.backbone, weights=args.weights,
                  backbone_args=parse_backbone_args(args.backbone_arg), input_size=args.input_size,
                  preprocessing=args.preprocessing, cut_layer=args.cut_layer, freeze=args.freeze,
                  freeze_batchnorm=args.freeze_batchnorm, head_pooling=args.head_pooling, dense=dense,
                  dropout=args.dropout, optimizer=args.optimizer, learning_rate=args.learning_rate,
                  momentum=args.momentum, head_lr_multiplier=args.head_lr_multiplier, schedule=args.schedule,
                  epochs=args.epochs, head_epochs=args.head_epochs, head_learning_rate=args.head_learning_rate,
                  batch_size=args.batch_size, augment=[a for a in args.augment.split(",") if a.strip()],
                  monitor=args.monitor, patience=args.patience, precision=_precision(args), xla=args.xla,
                  resize=args.resize, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                  seed=args.seed, model_name=args.model_name, registry=_registry(args), out=args.out)
    text = [f"model:  {r['model']} v{r['version']} in {r['registry']}", f"report: {r['report']}",
            f"curves: {r['learning_curves']}", f"run:    {r['workdir']} (checkpoints, history.csv, tensorboard/)"]
    _emit(r, args.json, "\n".join(text + _metrics_text(r["metrics"])))
    return 0


def _transfer_text(r: dict[str, Any]) -> str:
    d = r["decision"]
    lines = [f"case {r['case']}: {r['description']}", d["reason"],
             f"champion: {r['champion']['name']} v{r['champion']['version']} ({r['gate']['reason']})",
             f"store:    {r['store']}", f"registry: {r['registry']}", f"report:   {r['report']}"]
    return "\n".join(lines + _metrics_text(r["champion"]["metrics"]))


def cmd_transfer(args) -> int:
    from flows.transfer import transfer
    from tasks.backbones import parse_backbone_args

    r = transfer(data=args.data, backbone=args.backbone, weights=args.weights,
                 backbone_args=parse_backbone_args(args.backbone_arg), input_size=args.input_size,
                 preprocessing=args.preprocessing, precision=args.precision, layers=args.layers or None,
                 case=args.case, layer=args.layer,
                 large_per_class=args.large_per_class, similarity_margin=args.similarity_margin,
                 gate_margin=args.gate_margin, from_scratch=args.from_scratch, classifier=args.classifier,
                 epochs=args.epochs, head_epochs=args.head_epochs, learning_rate=args.learning_rate,
                 batch_size=args.batch_size, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                 seed=args.seed, model_name=args.model_name, registry=_registry(args), out=args.out)
    _emit(r, args.json, _transfer_text(r))
    return 0


def cmd_demo(args) -> int:
    from flows.demo import demo

    r = demo(out=args.out, images_per_class=args.images_per_class)
    text = "\n".join([f"dataset:     {r['dataset']}", _transfer_text(r["transfer"]),
                      f"predictions: {r['predict']['predictions']}"])
    result = r
    _emit(result, args.json, text)
    return 0


def cmd_store(args) -> int:
    from storage import tools

    if args.store_command == "ls":
        r = tools.list_store(args.store)
        _emit(r, args.json, tools.list_text(r))
    elif args.store_command == "info":
        r = tools.store_info(args.store, head=args.head)
        _emit(r, args.json, tools.info_text(r))
    elif args.store_command == "export":
        r = tools.export_group(args.store, args.layer, pooling=args.pooling, out=args.output, fmt=args.format,
                               split=args.split, classes=args.classes, rows=args.chunk_rows)
        _emit(r, args.json, tools.export_text(r))
    else:
        r = tools.verify_store(args.store, check_files=args.check_files, dataset=args.dataset)
        _emit(r, args.json, tools.verify_text(r))
        return 0 if r["ok"] else 1
    return 0


COMMANDS = {"backbones": cmd_backbones, "layers": cmd_layers, "extract": cmd_extract, "train-linear": cmd_train_linear,
            "sweep": cmd_sweep, "predict": cmd_predict, "fine-tune": cmd_fine_tune, "transfer": cmd_transfer,
            "demo": cmd_demo, "store": cmd_store}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storage.errors import CnncodesError

    try:
        return COMMANDS[args.command](args)
    except CnncodesError as exc:
        sys.stderr.write(f"cnncodes {args.command}: error: {exc}\n")
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: every committed batch is kept; run the same command again to resume.\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
