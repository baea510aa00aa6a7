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
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute precision: float32; bfloat16 on GPUs and CPUs with AVX512-BF16/AMX; "
                        "float16 (mixed) on GPUs (default: %(default)s)")
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
                val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, out=args.out)


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


def cmd_demo(args) -> int:
    from flows.demo import demo

    result = demo(out=args.out, images_per_class=args.images_per_class)
    text = "\n".join([f"dataset: {result['dataset']}", _extract_text(result["extract"])])
    _emit(result, args.json, text)
    return 0


COMMANDS = {"backbones": cmd_backbones, "layers": cmd_layers, "extract": cmd_extract, "demo": cmd_demo}


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
