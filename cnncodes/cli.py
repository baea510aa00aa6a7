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


def apply_env_defaults() -> None:
    """Quiet TensorFlow's C++ logging and Prefect's server analytics, unless the user set them."""
    from cnncodes.handoff import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


apply_env_defaults()

EXIT_USER_ERROR = 2

from cnncodes.options import add_settings, settings_from  # noqa: E402
from tasks import internals  # noqa: E402


def _parents(show_all: bool = True) -> dict[str, argparse.ArgumentParser]:
    """Options shared by the flow commands, declared once: --json, --seed, --out, --registry."""
    from tasks.settings import Output

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--help-all", action="store_true", help="show every option, not only the everyday ones")
    common.add_argument("--config", default=None, metavar="FILE",
                        help="settings from a YAML or JSON file in the shape of the flow's parameters (backbone:, "
                             "finetune:, ...); options given here override it")
    common.add_argument("--backend", default=None, choices=["tensorflow", "jax", "torch"],
                        help="Keras backend to compute on (default: KERAS_BACKEND, else keras.json's, else "
                             "tensorflow)")
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=int, default=None,
                      help="seed of the drawn split, of random weights and of training (default: 0)")
    out = argparse.ArgumentParser(add_help=False)
    add_settings(out, "output", Output, only=["out"], title="output")
    registry = argparse.ArgumentParser(add_help=False)
    add_settings(registry, "output", Output, only=["out", "registry"], title="output",
                 everyday=None if show_all else ["out"])
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--model-name", default=None,
                       help="registry name of the model; each run adds a version (default: derived from the data "
                            "or store, the backbone or layer, and the kind of model)")
    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("--pooling", default=None,
                       help="pooling of the layer group(s) to use (needed where a layer was stored with several)")
    return {"common": common, "seed": seed, "out": out, "registry": registry, "named": named, "group": group}


DATA_HELP = ("folder of class folders, folder with train/ val/ [test/], or CSV path,label[,split][,group]; of images "
             "or of sound recordings (drawn as spectrograms)")
SOUND_TITLE = "sound (Spectrogram): when the data is audio, how each recording becomes the input image"


def _add_store_parser(sub, common: argparse.ArgumentParser) -> None:
    """`cnncodes store ls|info|export|verify|repair`: look after feature stores (no TensorFlow needed)."""
    store = sub.add_parser("store", help="list, inspect, export, verify and repair feature stores")
    ssub = store.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")

    p = ssub.add_parser("ls", parents=[common], help="size, provenance and layer groups of a store")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")

    p = ssub.add_parser("info", parents=[common], help="ls plus per-group split/class counts and the first rows")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--head", type=int, default=5, help="rows shown per group (default: %(default)s)")

    p = ssub.add_parser("export", parents=[common], help="export one group to .parquet, .csv or .npy (+ .rows.csv)")
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

    p = ssub.add_parser("verify", parents=[common],
                        help="check a store's structure and contents; exit 1 when problems are found")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--check-files", action="store_true",
                   help="also re-hash each image and compare with the stored sha256")
    p.add_argument("--dataset", default=None,
                   help="dataset root the image paths are relative to (default: the one the store records)")

    p = ssub.add_parser("repair", parents=[common],
                        help="drop the rows whose checksums fail (`store verify` lists them); the next "
                             "`cnncodes extract` of the same data recomputes them")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")


# The settings each command shows in --help (field names); the others are listed by --help-all. Options that are
# not settings (--json, --config, --backend, --seed, --out, --model-name, ...) always show.
EVERYDAY = {
    "extract": {"name", "weights", "backbone_args", "layers", "pooling", "store", "batch_size"},
    "train-linear": {"classifier", "C"},
    "sweep": {"classifier"},
    "fine-tune": {"name", "weights", "backbone_args", "epochs", "learning_rate", "freeze", "augment"},
    "transfer": {"name", "weights", "backbone_args", "case", "epochs", "test_fraction"},
    "spectrogram": {"name", "input_size", "n_mels"},
}


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    """The ``cnncodes`` parser; ``show_all``: every option in each command's help (``--help-all``), else the
    everyday ones (:data:`EVERYDAY`) and a line that points to ``--help-all``."""
    parser = argparse.ArgumentParser(prog="cnncodes", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def everyday(command: str):
        return None if show_all else EVERYDAY.get(command)

    par = _parents(show_all)
    _add_code_commands(sub, par, everyday)
    _add_model_commands(sub, par, everyday)
    _add_other_commands(sub, par, everyday)
    for name, command in sub.choices.items():
        hidden = command.get_default("hidden_options")
        if hidden:
            command.epilog = (f"{hidden} more options: cnncodes {name} --help-all. Any of them can also come from a "
                              "file (--config FILE).")
    return parser


def _add_code_commands(sub, par: dict, everyday) -> None:
    """backbones, layers, extract, train-linear, sweep: from images to codes, and probes on them."""
    from tasks.backbones import BackboneSpec
    from tasks.data.audio import Spectrogram
    from tasks.extract import ExtractOptions
    from tasks.probe.linear import SWEEP_PROBE, LinearConfig
    from tasks.settings import ScaleOut, SplitConfig

    common, seed, out, registry, named, group = (par[k] for k in ("common", "seed", "out", "registry", "named",
                                                                   "group"))
    layers_backbone = BackboneSpec(weights="none")  # listing layers needs no weights
    sub.add_parser("backbones", parents=[common], help="list the registered backbones")

    p = sub.add_parser("layers", parents=[common, seed],
                       help="list a backbone's layers with output shape, stride and parameters")
    p.add_argument("backbone", help="registered name (e.g. resnet50) or a .keras/.h5 model file")
    add_settings(p, "backbone", BackboneSpec, layers_backbone, exclude=("name", "seed", "spectrogram"),
                 everyday=everyday("layers"))

    p = sub.add_parser("extract", parents=[common, seed, out],
                       help="flow extract-features: images -> CNN codes in an HDF5 store")
    p.add_argument("data", help=DATA_HELP)
    add_settings(p, "backbone", BackboneSpec, exclude=("seed", "spectrogram"), everyday=everyday("extract"))
    add_settings(p, "spectrogram", Spectrogram, title=SOUND_TITLE, everyday=everyday("extract"))
    add_settings(p, "extract", ExtractOptions, everyday=everyday("extract"))
    add_settings(p, "split", SplitConfig, exclude=("seed",), everyday=everyday("extract"))
    add_settings(p, "scale", ScaleOut, everyday=everyday("extract"))

    p = sub.add_parser("train-linear", parents=[common, seed, registry, named, group],
                       help="flow train-linear: linear SVM/softmax/SGD on a store's codes")
    p.add_argument("store", help="feature store (HDF5) written by `cnncodes extract`")
    p.add_argument("--layer", required=True, help="layer group to train on (`cnncodes extract` --layer)")
    add_settings(p, "linear", LinearConfig, exclude=("seed",), everyday=everyday("train-linear"))

    p = sub.add_parser("sweep", parents=[common, seed, out, group],
                       help="flow sweep: cross-validate a probe on each layer of a store")
    p.add_argument("store", help="feature store with several layer groups")
    p.add_argument("--layer", action="append", default=[], help="layers to compare (default: every group)")
    p.add_argument("--max-images", type=int, default=None, help="stratified sample of images per layer")
    add_settings(p, "linear", LinearConfig, SWEEP_PROBE, only=["classifier", "C", "cv_folds", "class_weight",
                                                               "l2_normalize", "pca"],
                 choices={"classifier": ("svm", "softmax")},
                 helps={"classifier": "linear SVM or multinomial logistic regression",
                        "cv_folds": "folds of the cross-validation that scores each layer",
                        "C": "inverse regularisation strength, the same for every layer (a search per layer would "
                             "compare searches, not layers)"}, everyday=everyday("sweep"))



def _add_model_commands(sub, par: dict, everyday) -> None:
    """predict, export, fine-tune, transfer, retrain: models, their training and their use."""
    from tasks.backbones import BackboneSpec
    from tasks.data.audio import Spectrogram
    from tasks.decide.transfer import Thresholds
    from tasks.finetune import FineTuneConfig
    from tasks.finetune.config import TRANSFER_FINETUNE
    from tasks.probe.linear import LinearConfig
    from tasks.settings import ExportOptions, SplitConfig

    common, seed, registry, named = (par[k] for k in ("common", "seed", "registry", "named"))
    p = sub.add_parser("predict", parents=[common, registry],
                       help="flow predict: classify new images with a registered model")
    p.add_argument("images", help="folder of images (searched recursively), an image, or a .txt/.csv list")
    p.add_argument("--model", required=True, help="registered model name (`train-linear` prints it)")
    p.add_argument("--version", default=None, help="version number or alias (default: the latest)")
    p.add_argument("--output", default=None,
                   help="predictions file, .csv or .parquet (default: OUT/predictions/<model>.csv)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--group-by", default=None, metavar="REGEX",
                   help="a model trained with --adapt-batchnorm adapts to each group of files (the regular "
                        "expression's first capture group in a file name, e.g. '^\\d+_([a-z]+)_' for a speaker) "
                        "in turn; default: all files are one group")

    p = sub.add_parser("export", parents=[common, registry],
                       help="flow export: a registered model as one folder that serves without cnncodes (Keras, "
                            "SavedModel for TensorFlow Serving, TFLite), with its classes and a model card")
    p.add_argument("--model", required=True, help="registered model name (`train-linear` or `transfer` prints it)")
    p.add_argument("--version", default=None,
                   help="version number or alias (default: the champion, else the latest version)")
    p.add_argument("--output", required=True,
                   help="folder to write (refused if it exists, unless --force): the model file, model.json "
                        "(classes, input, provenance) and MODEL_CARD.md")
    add_settings(p, "export", ExportOptions, everyday=everyday("export"))

    p = sub.add_parser("fine-tune", parents=[common, seed, registry, named],
                       help="flow fine-tune: train the backbone itself with a new head (large data)")
    p.add_argument("data", help=DATA_HELP)
    add_settings(p, "backbone", BackboneSpec, exclude=("seed", "spectrogram"), everyday=everyday("fine-tune"))
    add_settings(p, "spectrogram", Spectrogram, title=SOUND_TITLE, everyday=everyday("fine-tune"))
    add_settings(p, "finetune", FineTuneConfig, exclude=("seed",), everyday=everyday("fine-tune"))
    add_settings(p, "split", SplitConfig, exclude=("seed",), everyday=everyday("fine-tune"))

    p = sub.add_parser("transfer", parents=[common, seed, registry, named],
                       help="flow transfer: measure size and similarity, pick the case, train, gate")
    p.add_argument("data", help=DATA_HELP)
    add_settings(p, "backbone", BackboneSpec, exclude=("seed", "spectrogram"), everyday=everyday("transfer"))
    add_settings(p, "spectrogram", Spectrogram, title=SOUND_TITLE, everyday=everyday("transfer"))
    add_settings(p, "thresholds", Thresholds, everyday=everyday("transfer"))
    add_settings(p, "probe", LinearConfig, only=["classifier", "C", "cv_folds", "class_weight", "l2_normalize",
                                                 "pca", "calibrate"], title="probe (LinearConfig)",
                 everyday=everyday("transfer"))
    add_settings(p, "finetune", FineTuneConfig, TRANSFER_FINETUNE,
                 exclude=("seed", "freeze"), title="fine-tuning, cases 3 and 4 (FineTuneConfig)",
                 everyday=everyday("transfer"))
    add_settings(p, "split", SplitConfig, exclude=("seed",), everyday=everyday("transfer"))

    p = sub.add_parser("retrain", parents=[common, registry],
                       help="flow retrain: if the data changed, train a challenger the champion's way; "
                            "promote only a clear winner")
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--model", required=True, help="the lineage: a registered model name with a champion")
    p.add_argument("--margin", type=float, default=0.0,
                   help="the challenger must beat the champion's accuracy by more than this (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="train a challenger even if the data did not change")
    add_settings(p, "split", SplitConfig, only=("rehash",), title="scanning", everyday=everyday("retrain"))
    p.add_argument("--group-by", default=None, metavar="REGEX",
                   help="the grouping of file names (as `extract --group-by`): new files of a group join it in "
                        "one split; a CSV's group column is read without it (default: the lineage's own, "
                        "recorded when it was first trained)")



def _add_other_commands(sub, par: dict, everyday) -> None:
    """spectrogram, store, server, demo."""
    from tasks.backbones import BackboneSpec
    from tasks.data.audio import Spectrogram

    common, out = par["common"], par["out"]
    p = sub.add_parser("spectrogram", parents=[common],
                       help="write the exact image the network sees for one sound recording, as a PNG")
    p.add_argument("file", help="a sound recording (WAV, FLAC, OGG, ...)")
    p.add_argument("--output", "-o", required=True, help="PNG file to write")
    add_settings(p, "backbone", BackboneSpec, only=["name", "input_size", "backbone_args"],
                 title="input size (BackboneSpec): the image is rendered at this backbone's input size",
                 everyday=everyday("spectrogram"))
    add_settings(p, "spectrogram", Spectrogram, title=SOUND_TITLE, everyday=everyday("spectrogram"))

    _add_store_parser(sub, common)

    p = sub.add_parser("server", parents=[common],
                       help="a long-lived local Prefect server that every command uses: its UI, and no start-up "
                            "cost per command")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=4200, help="port of `server start` (default: %(default)s)")

    p = sub.add_parser("demo", parents=[common, out],
                       help="generate a small dataset and run the pipeline on it end to end")
    p.add_argument("--images-per-class", type=int, default=40, help="generated images per class (default: %(default)s)")


def _emit(result: Any, as_json: bool, text: str) -> None:
    if as_json:
        if hasattr(result, "as_dict"):  # a flow's typed result
            result = result.as_dict()
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
    from tasks.backbones import BackboneSpec, build_backbone

    spec = settings_from(args, "backbone", BackboneSpec, BackboneSpec(weights="none"), name=args.backbone,
                         seed=args.seed)
    bb = build_backbone(spec)
    layers = [layer.as_dict() for layer in bb.layers()]
    head = f"{'layer':<32} {'kind':<24} {'output shape':<22} {'stride':>6} {'params':>10}"
    text = "\n".join([f"{args.backbone} at {bb.size}px: {len(layers)} layers", head] + [
        f"{d['name']:<32} {d['kind']:<24} {str(tuple(d['output_shape'][1:])):<22} "
        f"{d['stride'] if d['stride'] else '-':>6} {d['params']:>10}" for d in layers])
    _emit({"backbone": args.backbone, "input_size": bb.size, "layers": layers}, args.json, text)
    return 0


def _backbone(args):
    from tasks.backbones import BackboneSpec

    fixed = {"seed": args.seed}
    in_file = "spectrogram" in (getattr(args, "config_settings", None) or {}).get("backbone", {})
    if in_file or any(k.startswith("spectrogram.") for k in vars(args)):
        from tasks.data.audio import Spectrogram

        fixed["spectrogram"] = settings_from(args, "spectrogram", Spectrogram)
    return settings_from(args, "backbone", BackboneSpec, **fixed)


def _split(args):
    from tasks.settings import SplitConfig

    return settings_from(args, "split", SplitConfig, seed=args.seed)


def _output(args):
    from tasks.settings import Output

    return settings_from(args, "output", Output, backend=args.backend)


def _extract_text(s) -> str:
    lines = [f"store:  {s.store}", f"report: {s.report}",
             f"images: {s.images} ({s.computed} computed, {s.reused} reused, {s.removed} removed, "
             f"{len(s.skipped)} skipped)"]
    lines += [f"group:  {g['group']} rows={g['rows']} shape={g['feature_shape']}" for g in s.groups]
    lines += [f"skipped {k['path']}: {k['reason']}" for k in s.skipped[:20]]
    if len(s.skipped) > 20:
        lines.append(f"... and {len(s.skipped) - 20} more skipped files: see the report")
    return "\n".join(lines)


def cmd_extract(args) -> int:
    from flows.extract_features import extract_features
    from tasks.extract import ExtractOptions
    from tasks.settings import ScaleOut

    summary = extract_features(args.data, _backbone(args), settings_from(args, "extract", ExtractOptions),
                               _split(args), _output(args), settings_from(args, "scale", ScaleOut))
    _emit(summary, args.json, _extract_text(summary))
    return 0


def _metrics_text(metrics: dict[str, Any]) -> list[str]:
    return [f"{split:<6} accuracy {m['accuracy']:.3f}  balanced {m['balanced_accuracy']:.3f}  "
            f"macro-F1 {m['macro_f1']:.3f}  ({m['images']} images)" for split, m in metrics.items()]


def cmd_train_linear(args) -> int:
    from flows.train_linear import train_linear
    from tasks.probe.linear import LinearConfig

    r = train_linear(args.store, args.layer, args.pooling, settings_from(args, "linear", LinearConfig, seed=args.seed),
                     model_name=args.model_name, output=_output(args))
    text = [f"model:  {r.model} v{r.version} (C={r.C:g}) in {r.registry}", f"report: {r.report}"]
    _emit(r, args.json, "\n".join(text + _metrics_text(r.metrics)))
    return 0


def cmd_sweep(args) -> int:
    from flows.sweep import SWEEP_PROBE, sweep
    from tasks.probe.linear import LinearConfig

    r = sweep(args.store, layers=args.layer or None, pooling=args.pooling,
              linear=settings_from(args, "linear", LinearConfig, SWEEP_PROBE, seed=args.seed), output=_output(args),
              max_images=args.max_images)
    text = [f"{x['layer'] + '/' + x['pooling']:<40} {x['mean']:.3f} ± {x['std']:.3f}" for x in r.rows]
    text += [f"best:   {r.best['layer']}/{r.best['pooling']}", f"report: {r.report}", f"plot:   {r.plot}"]
    _emit(r, args.json, "\n".join(text))
    return 0


def cmd_predict(args) -> int:
    from flows.predict import predict

    r = predict(args.images, args.model, version=args.version, output=_output(args), predictions=args.output,
                batch_size=args.batch_size, group_by=args.group_by)
    text = [f"predictions: {r.predictions}",
            f"images: {r.images} ({r.reused} codes reused, {r.computed} computed, "
            f"{len(r.skipped)} skipped) with {r.model} v{r.version}"]
    text += [f"  {c}: {n}" for c, n in r.class_counts.items()]
    text += [f"skipped {k['path']}: {k['reason']}" for k in r.skipped[:20]]
    _emit(r, args.json, "\n".join(text))
    return 0


def cmd_export(args) -> int:
    from flows.export import export
    from tasks.settings import ExportOptions

    r = export(args.model, args.output, version=args.version, options=settings_from(args, "export", ExportOptions),
               output=_output(args))
    text = [f"exported {r.model} v{r.version} ({r.outputs} of {len(r.classes)} classes, input {r.input_size} px) "
            f"as {r.format}: {r.output}"] + [f"  {f}" for f in r.files]
    if r.test:
        lo, hi = r.test["interval"]
        text.append(f"{r.test['split']} accuracy {r.test['accuracy']:.3f} (95% interval {lo:.3f}-{hi:.3f}, "
                    f"{r.test['images']} images)")
    if r.int8 and r.int8.get("images"):
        text.append(f"int8: accuracy {r.int8['int8_accuracy']:.3f} against {r.int8['float32_accuracy']:.3f} in float32 "
                    f"({r.int8['accuracy_change']:+.3f}) on {r.int8['images']} {r.int8['split']} images")
    if r.reload_check.get("warning"):
        text.append(f"warning: {r.reload_check['warning']}")
    _emit(r, args.json, "\n".join(text))
    return 0


def cmd_fine_tune(args) -> int:
    from flows.fine_tune import fine_tune
    from tasks.finetune import FineTuneConfig

    r = fine_tune(args.data, _backbone(args), settings_from(args, "finetune", FineTuneConfig, seed=args.seed),
                  _split(args), model_name=args.model_name, output=_output(args))
    text = [f"model:  {r.model} v{r.version} in {r.registry}", f"report: {r.report}",
            f"curves: {r.learning_curves}", f"run:    {r.workdir} (checkpoints, history.csv, tensorboard/)"]
    _emit(r, args.json, "\n".join(text + _metrics_text(r.metrics)))
    return 0


def _transfer_text(r) -> str:
    d = r.decision
    lines = [f"case {r.case}: {r.description}", d["reason"],
             f"champion: {r.champion['name']} v{r.champion['version']} ({r.gate['reason']})",
             f"store:    {r.store}", f"registry: {r.registry}", f"report:   {r.report}"]
    return "\n".join(lines + _metrics_text(r.champion["metrics"]))


def cmd_transfer(args) -> int:
    from flows.transfer import TRANSFER_FINETUNE, transfer
    from tasks.finetune import FineTuneConfig
    from tasks.probe.linear import LinearConfig
    from tasks.decide.transfer import Thresholds

    r = transfer(args.data, _backbone(args), settings_from(args, "thresholds", Thresholds),
                 settings_from(args, "probe", LinearConfig, seed=args.seed),
                 settings_from(args, "finetune", FineTuneConfig, TRANSFER_FINETUNE, seed=args.seed), _split(args),
                 model_name=args.model_name, output=_output(args))
    _emit(r, args.json, _transfer_text(r))
    return 0


def cmd_retrain(args) -> int:
    from flows.retrain import retrain
    from tasks.settings import SplitConfig

    r = retrain(args.data, args.model, _output(args), margin=args.margin, force=args.force,
                rehash=settings_from(args, "split", SplitConfig).rehash, group_by=args.group_by)
    if not r.retrained:
        text = [r.reason, f"champion: {args.model} v{r.champion}"]
    else:
        text = [r.decision["reason"], f"champion: {args.model} v{r.champion} "
                f"({'promoted' if r.promoted else 'kept'}); challenger v{r.challenger}",
                f"report: {r.challenger_report}"]
    _emit(r, args.json, "\n".join(text))
    return 0


def cmd_spectrogram(args) -> int:
    from tasks.backbones import BackboneSpec
    from tasks.data.audio import Spectrogram, write_png

    spec = settings_from(args, "backbone", BackboneSpec, weights="none",
                         spectrogram=settings_from(args, "spectrogram", Spectrogram))
    r = write_png(args.file, args.output, spec.size or 224, spec.spectrogram)
    _emit(r, args.json, f"{r['output']}: {r['size']}x{r['size']} spectrogram of {r['file']} "
                        f"({r['seconds']:.2f} s at {r['sample_rate']} Hz; low frequencies at the bottom)")
    return 0


def cmd_demo(args) -> int:
    from flows.demo import demo

    r = demo(out=_output(args).out, images_per_class=args.images_per_class, backend=args.backend)
    text = "\n".join([f"dataset:     {r.dataset}", _transfer_text(r.transfer),
                      f"predictions: {r.predict['predictions']}"])
    result = r
    _emit(result, args.json, text)
    return 0


def cmd_server(args) -> int:
    from cnncodes import server

    if args.action == "start":
        try:
            r = server.start(args.port)
        except server.ServerError as exc:
            from storage.errors import CnncodesError

            raise CnncodesError(str(exc)) from exc
        runner = r.get("runner") or {}
        warm = ("the warm runner is up: commands start in it" if runner.get("running") else
                f"warning: no warm runner ({runner['error']})" if runner.get("error") else
                "no warm runner on this platform: each command runs in its own process")
        text = (f"Prefect server {'started' if r['started'] else 'already running'}: UI {r['ui_url']}\n"
                f"every cnncodes command now uses it; for prefect's own commands: export PREFECT_API_URL={r['api_url']}\n"
                f"{warm}")
    elif args.action == "stop":
        r = server.stop()
        text = "stopped" if r["stopped"] else f"no cnncodes server was running ({r['message'] or 'nothing to stop'})"
    else:
        r = server.status()
        recorded = f" (recorded: {r['api_url']})" if r["api_url"] else ""
        runner = r["runner"]
        text = (f"running: {r['api_url']} ({r['source']})" if r["running"] else
                f"not running{recorded}; each command starts a temporary server")
        text += (f"\nwarm runner: pid {runner['pid']}, {runner['socket']}" if runner["running"] else
                 "\nwarm runner: not running")
    _emit(r, args.json, text)
    return 0


def cmd_store(args) -> int:
    from storage import tools, verify

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
    elif args.store_command == "repair":
        r = tools.repair_store(args.store)
        _emit(r, args.json, tools.repair_text(r))
    else:
        r = verify.verify_store(args.store, check_files=args.check_files, dataset=args.dataset)
        _emit(r, args.json, verify.verify_text(r))
        return 0 if r["ok"] else 1
    return 0


COMMANDS = {"retrain": cmd_retrain, "backbones": cmd_backbones, "layers": cmd_layers, "extract": cmd_extract, "train-linear": cmd_train_linear,
            "sweep": cmd_sweep, "predict": cmd_predict, "export": cmd_export, "fine-tune": cmd_fine_tune,
            "transfer": cmd_transfer, "demo": cmd_demo, "store": cmd_store, "server": cmd_server,
            "spectrogram": cmd_spectrogram}
# Commands that run a flow (they need the Prefect API) and, of those, the ones that import Keras and its backend:
# the API comes up in the background while the backend and the flow's modules import.
FLOW_MODULES = {"extract": "flows.extract_features", "train-linear": "flows.train_linear", "sweep": "flows.sweep",
                "predict": "flows.predict", "export": "flows.export", "fine-tune": "flows.fine_tune", "transfer": "flows.transfer",
                "retrain": "flows.retrain", "demo": "flows.demo"}
KERAS_COMMANDS = ("extract", "fine-tune", "transfer", "retrain", "demo", "export")


def _prepare(command: str):
    """Start the Prefect API (or find a running one) while Keras, its backend and the flow import; returns the
    :class:`~cnncodes.server.Warmup` (None for commands that run no flow)."""
    if command not in FLOW_MODULES:
        return None
    import importlib

    from cnncodes.server import ServerError, Warmup

    warm = Warmup()
    try:
        if command in KERAS_COMMANDS:
            from tasks import runtime

            runtime.keras()
        importlib.import_module(FLOW_MODULES[command])
    except BaseException:
        warm.close()
        raise
    try:
        warm.wait()
    except ServerError as exc:  # the temporary server did not come up (wait stopped it)
        from storage.errors import CnncodesError

        raise CnncodesError(str(exc)) from exc
    return warm


def _run_settings(warm):
    """Prefect settings for the flow runs of a command: no flow-run heartbeats. Heartbeats let a
    lasting server mark a run whose process was killed as crashed (after three missed beats, nine
    minutes by default); for a command run by hand the terminal already says so, and stopping their
    thread costs up to a second at the end of every flow run (Prefect's thread sleeps in one-second
    steps). Runs of deployments, started by a worker, keep them."""
    import contextlib

    if warm is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _stop_temporary_server(warm) -> None:
    """Hand the runs' last logs and events to the temporary Prefect server, then tell it to stop
    without waiting for it: the user does not wait for work at exit. Every other exit hook (joblib's
    worker and temporary-file cleanup) runs as usual."""
    internals.drain_prefect_queues()
    warm.close()


def _finish() -> bool:
    """What ends a ``cnncodes`` process, short of ending it: Prefect's queued logs and events are handed
    over, every exit hook runs (joblib's worker and temporary-file cleanup, ...), output is flushed.
    False, having done nothing, where that cannot be done here (:mod:`tasks.internals`): the process
    must then end the normal way."""
    if not internals.drain_prefect_queues() or not internals.run_exit_work():
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    return True


def _exit_fast(code: int) -> None:
    """End a ``cnncodes`` process (:func:`_finish`) without the interpreter's module teardown, which only
    frees memory the process gives back anyway (seconds with TensorFlow, scikit-learn and Prefect loaded);
    the normal way where :func:`_finish` cannot."""
    if _finish():
        os._exit(code)
    sys.exit(code)


# what a user can do about an operating system's refusal that no step of the command explains itself
OS_ADVICE = {"ENOSPC": "the disk is full: free space there", "EDQUOT": "the disk quota is used up: free space there",
             "EACCES": "permission denied: give the user running cnncodes access to it, or use another folder (--out)",
             "EPERM": "not permitted: give the user running cnncodes access to it, or use another folder (--out)",
             "EROFS": "the file system is read-only: use another folder (--out)"}


def _said_of_os_error(exc: OSError) -> str | None:
    """A full disk, a denied permission or a read-only file system, said as what happened and what to do
    (None for other errors: they keep their traceback)."""
    import errno

    advice = OS_ADVICE.get(errno.errorcode.get(exc.errno or 0, ""))
    if advice is None:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"{exc.strerror or exc}{where}. {advice[0].upper()}{advice[1:]}, then run the same command again: what "
            "was already committed (store rows, registered models) is kept.")


def run_program(argv: Sequence[str]) -> int:
    """One command as the ``cnncodes`` program runs it, in a warm runner's child
    (:mod:`cnncodes.runner`): run, finish as the program does, return the status (the runner sends it
    to the command's process, then ends the child)."""
    code = _main(argv)
    _finish()
    return code


def main(argv: Sequence[str] | None = None, try_runner: bool = True) -> int:
    """Run one command. Called without ``argv`` (the ``cnncodes`` program), it first offers the command to
    the warm runner (:mod:`cnncodes.handoff`; ``cnncodes server start`` starts one), then runs it here,
    and ends the process when done (see :func:`_exit_fast`); with ``argv`` (from Python) it returns the
    exit status."""
    if argv is None:
        if try_runner:
            from cnncodes import handoff

            code = handoff.try_run(sys.argv[1:])
            if code is not None:
                sys.exit(code)
        _exit_fast(_main(None))
    return _main(argv)


def apply_config(args: argparse.Namespace) -> None:
    """Read ``--config FILE`` into ``args.config_settings`` (what :func:`settings_from` starts from); the file's
    ``output.backend`` chooses the backend where ``--backend`` does not."""
    if getattr(args, "config", None):
        from cnncodes.options import load_config

        args.config_settings = load_config(args.config, getattr(args, "settings_groups", ()))
        args.backend = args.backend or args.config_settings.get("output", {}).get("backend")


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:  # the same help, every option listed
        build_parser(show_all=True).parse_args([a if a != "--help-all" else "--help" for a in argv])
    args = build_parser().parse_args(argv)
    from storage.errors import CnncodesError

    warm = None
    try:
        apply_config(args)
        if getattr(args, "backend", None):
            from tasks import runtime

            runtime.use_backend(args.backend)  # before anything imports Keras
        warm = _prepare(args.command)
        with _run_settings(warm):
            return COMMANDS[args.command](args)
    except CnncodesError as exc:
        sys.stderr.write(f"cnncodes {args.command}: error: {exc}\n")
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        return EXIT_USER_ERROR
    except OSError as exc:
        said = _said_of_os_error(exc)
        if said is None:
            raise
        sys.stderr.write(f"cnncodes {args.command}: error: {said}\n")
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps({"error": said, "type": type(exc).__name__}) + "\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: every committed batch is kept; run the same command again to resume.\n")
        return 130
    finally:
        if warm is not None and warm.owned:
            _stop_temporary_server(warm)


if __name__ == "__main__":
    sys.exit(main())
