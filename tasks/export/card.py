"""The model card written beside an export: what the model is for, what it was trained and measured
on, where it comes from, and the limits known from its evaluation."""
from __future__ import annotations

from typing import Any

# Below this many test images the interval of the accuracy is wide: said in the limits.
SMALL_TEST = 100


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * float(v):.1f}%"


def limits(info: dict[str, Any]) -> list[str]:
    """The limits of an exported model that its evaluation and provenance show."""
    out = []
    test, prov, inp = info.get("test") or {}, info.get("provenance") or {}, info["input"]
    classes = info["classes"]
    out.append(f"It always answers one of its {len(classes)} classes ({', '.join(classes)}): an image of "
               "anything else still gets one of them, often with high confidence. It has no 'none of these'.")
    if not test:
        out.append("No val or test measurement is recorded: its accuracy on new images is unknown.")
    elif test.get("split") != "test":
        out.append("There was no test split: the accuracy above is measured on val, which selection steps (C "
                   "search, early stopping) may have seen, so it is optimistic.")
    if test and test.get("images", 0) < SMALL_TEST:
        lo, hi = test["interval"]
        out.append(f"The accuracy is measured on {test['images']} images only: the 95% interval "
                   f"[{_pct(lo)}, {_pct(hi)}] is wide; measure it on more images before relying on it.")
    weak = [c for c in test.get("per_class", []) if c.get("recall") is not None and test.get("accuracy") is not None
            and c["recall"] < test["accuracy"] - 0.1]
    if weak:
        out.append("Classes it finds less often than the others (test recall): " + ", ".join(
            f"{c['class']} {_pct(c['recall'])}" for c in weak) + ".")
    if prov.get("weights") == "none":
        out.append("Its backbone has random (seeded) weights, not pretrained ones: fine for tests, rarely for use.")
    if prov.get("trained_precision") not in (None, "float32"):
        out.append(f"It was trained on codes computed in {prov['trained_precision']}; the export computes in "
                   "float32, so probabilities can differ from the registry model's in the third decimal.")
    if info["output"]["kind"] == "scores":
        out.append("Its outputs are the SVM's decision scores, not probabilities (it was trained without "
                   "calibration): compare them, do not read them as confidences.")
    out.append(f"Images must be fitted to {inp['size']}x{inp['size']} the way training did it (resize "
               f"'{inp['resize']}', bilinear) before they reach the model; another resize shifts the outputs.")
    warning = ((info.get("checks") or {}).get("reload") or {}).get("warning")
    if warning:
        out.append(warning)
    int8 = info.get("int8") or {}
    if int8.get("accuracy_change") is not None and int8["accuracy_change"] < 0:
        out.append(f"The int8 model loses {_pct(-int8['accuracy_change'])} of accuracy on "
                   f"{int8['images']} {int8['split']} images against the float32 one.")
    return out


def model_card(info: dict[str, Any]) -> str:
    src, prov, inp, test = info["source"], info["provenance"], info["input"], info.get("test") or {}
    splits = (info.get("data") or {}).get("splits") or {}
    kind = prov.get("kind")
    what = (f"linear probe ({prov.get('classifier')}) on the `{prov.get('layer')}` codes ({prov.get('pooling')} "
            f"pooling, {prov.get('feature_dim')} values) of `{prov.get('backbone')}`" if kind == "linear-probe"
            else f"fine-tuned `{prov.get('backbone')}`")
    lines = [f"# Model card: {src['registry_model']} v{src['version']}", "",
             f"Exported by cnncodes as `{info['model_file']}` ({info['format']}) on {info['created']}.", "",
             "## Model", "",
             f"- {what} {prov.get('backbone_args') or ''}, weights `{prov.get('weights')}`",
             f"- input: RGB images {inp['size']}x{inp['size']}, float32 values 0-255; preprocessing "
             f"{inp['preprocessing']}",
             f"- output: {len(info['classes'])} class {info['output']['kind']}, in this order: "
             f"{', '.join(info['classes'])}"]
    if prov.get("fold"):
        lines.append(f"- the scikit-learn probe as layers: {'; '.join(prov['fold'])}")
    lines += ["", "## Intended use", "",
              f"Classifying images like those of its training data (`{prov.get('dataset')}`) into "
              f"{', '.join(info['classes'])}. Not for other kinds of images, nor for decisions about people "
              "without a measurement on their data.", "",
              "## Data", "",
              f"- dataset: `{prov.get('dataset')}` (layout {(prov.get('split') or {}).get('layout')})",
              "- images per split: " + (", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "unknown"),
              f"- split seed {(prov.get('split') or {}).get('seed')}, fractions "
              f"{(prov.get('split') or {}).get('fractions')}", "",
              "## Performance", ""]
    if test:
        lo, hi = test["interval"]
        lines += [f"- {test['split']} accuracy **{_pct(test['accuracy'])}** (95% bootstrap interval {_pct(lo)} to "
                  f"{_pct(hi)}, {test['images']} images); balanced accuracy {_pct(test.get('balanced_accuracy'))}"]
        if test.get("adaptation"):
            a = test["adaptation"]
            lines += [f"- measured the way `cnncodes predict` serves it: BatchNormalization statistics adapted to each "
                      f"of {len(a['adapted_groups'])} group(s) of the {test['split']} split (AdaBN, "
                      "`--adapt-batchnorm`). **This exported file carries the trained statistics** and predicts every "
                      f"input alike; so measured, the {test['split']} accuracy was {_pct(a['unadapted_accuracy'])}"
                      + ("" if not a.get("self_training") else
                         f". `cnncodes predict` also self-trains the network on each group's own confident predictions "
                         f"(`--self-train {a['self_training']['rounds']}`); with AdaBN alone it was "
                         f"{_pct(a['adabn_accuracy'])}")]
        if test.get("per_class"):
            lines += ["", "| class | recall | precision | images |", "|---|---|---|---|"]
            lines += [f"| {c['class']} | {_pct(c.get('recall'))} | {_pct(c.get('precision'))} | {c.get('support')} |"
                      for c in test["per_class"]]
    else:
        lines.append("- no measurement recorded")
    int8 = info.get("int8")
    if int8 and int8.get("images"):
        lines += ["", f"int8 TFLite (`{int8['file']}`, {int8['bytes']:,} bytes against {int8['float32_bytes']:,}): "
                      f"accuracy {_pct(int8['int8_accuracy'])} against {_pct(int8['float32_accuracy'])} in float32 "
                      f"on {int8['images']} {int8['split']} images (change {100 * int8['accuracy_change']:+.1f} "
                      f"points; same prediction on {_pct(int8['same_prediction'])})."]
    elif int8:
        lines += ["", f"int8 TFLite (`{int8['file']}`): {int8.get('note')}"]
    lines += ["", "## Provenance", "",
              f"- registry model `{src['registry_model']}` v{src['version']} ({src['kind']}), created {src['created']}",
              f"- model file `{src['model_file']}` sha256 `{src['model_sha256']}`",
              f"- backbone weights digest `{prov.get('weights_digest')}`" if prov.get("weights_digest") else
              f"- backbone `{prov.get('backbone')}`"]
    if prov.get("store"):
        lines.append(f"- codes: store `{prov['store']}`, group `{prov.get('layer')}/{prov.get('pooling')}`")
    lines += [f"- export checks: folded layers against the model, max difference "
              f"{info['checks']['fold'].get('max_abs_difference', 0):.2g} "
              f"({info['checks']['fold'].get('against', '-')}); the written file loaded back, max difference "
              f"{info['checks']['reload']['max_abs_difference']:.2g}", "",
              "## Limits", ""]
    lines += [f"- {x}" for x in limits(info)]
    return "\n".join(lines) + "\n"
