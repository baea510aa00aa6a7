"""Command-line options generated from the settings models (``tasks.settings``).

Each field of a settings model becomes one option: its name (``batch_size`` -> ``--batch-size``), its
type and choices (``Literal``), its help (the field's description) and its default (the model's, or a
command's own base object: ``transfer`` trains its head first, ``layers`` uses random weights). A few
options keep the names users already type; :data:`OVERRIDES` says which. Options a user does not give
are left out of the namespace, so the model's default applies, never a second default typed here.
"""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Literal, Sequence

from pydantic import BaseModel

SEP = "."  # dest of an option: "<group>.<field>"


@dataclass(frozen=True)
class Override:
    flag: str | None = None        # the option's name where it is not --field-name
    kind: str | None = None        # "append", "keyvalue", "comma", "widths", "store_false", "choices"
    choices: tuple | None = None
    help: str | None = None


# (model name, field) -> how the option differs from the generated one
OVERRIDES: dict[tuple[str, str], Override] = {
    ("BackboneSpec", "name"): Override("--backbone"),
    ("BackboneSpec", "backbone_args"): Override("--backbone-arg", "keyvalue",
                                                help="constructor option passed through, repeatable, e.g. "
                                                     "alpha=0.25 (recorded in the store)"),
    ("ExtractOptions", "layers"): Override("--layer", "append"),
    ("ExtractOptions", "pooling"): Override(None, "append"),
    ("FineTuneConfig", "freeze_batchnorm"): Override("--train-batchnorm", "store_false",
                                                     help="let BatchNormalization layers of the unfrozen part train "
                                                          "(default: all stay frozen)"),
    ("FineTuneConfig", "dense"): Override(None, "widths", help="hidden Dense+ReLU width of the head, repeatable "
                                                               "(0 for none)"),
    ("FineTuneConfig", "augment"): Override(None, "comma", help="comma list of flip, rotation, zoom, translation, "
                                                               "contrast, and for spectrograms time-mask, freq-mask, "
                                                               "time-shift (sound never gets flip, rotation or zoom); "
                                                               "'' for none"),
    ("Thresholds", "layers"): Override("--layers", "append"),
    ("LinearConfig", "calibrate"): Override("--no-calibrate", "store_false",
                                            help="SVM without probability calibration (no probabilities in "
                                                 "predictions)"),
    ("Thresholds", "case"): Override(None, "choices", choices=(1, 2, 3, 4)),
}


def _parts(annotation) -> tuple[type | None, tuple | None, bool]:
    """(scalar type, Literal choices, is a list) of a field's annotation."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    if typing.get_origin(annotation) in (list, tuple):
        inner = typing.get_args(annotation)[0]
        t, choices, _ = _parts(inner)
        return t, choices, True
    for a in args:  # a list form inside a union (pooling: one or a list): the list wins
        if typing.get_origin(a) in (list, tuple):
            t, choices, _ = _parts(typing.get_args(a)[0])
            return t, choices, True
    a = args[0]
    if typing.get_origin(a) is Literal:
        choices = typing.get_args(a)
        return type(choices[0]), choices, False
    if a in (int, float, str, bool, dict):
        if float in args and int in args:
            return float, None, False
        return a, None, False
    if typing.get_origin(a) is dict:
        return dict, None, False
    return str, None, False


def _or_none(scalar: type):
    """An argparse type for a number setting that may also be None: 'none' (or 'null') gives None."""
    def parse(text: str):
        if text.strip().lower() in ("none", "null"):
            return None
        return scalar(text)

    parse.__name__ = scalar.__name__  # argparse names the type in its error: "invalid float value"
    return parse


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else str(value)


def add_settings(parser: argparse.ArgumentParser, group: str, model: type[BaseModel], base: BaseModel | None = None,
                 *, exclude: Iterable[str] = (), only: Sequence[str] | None = None,
                 choices: dict[str, tuple] | None = None, helps: dict[str, str] | None = None,
                 title: str | None = None, everyday: Collection[str] | None = None) -> None:
    """Add one option per field of ``model`` to an argument group of ``parser``; defaults from ``base``;
    ``choices`` and ``helps`` narrow or reword a field for this command. With ``everyday``, only those fields show
    in ``--help``; the others work the same and are counted in the parser's default ``hidden_options``."""
    base = base if base is not None else model()
    # the settings groups this command takes: what a --config file may hold for it
    parser.set_defaults(settings_groups=tuple(parser.get_default("settings_groups") or ()) + (group,))
    names = only if only is not None else [n for n in model.model_fields if n not in set(exclude)]
    shown = everyday is None or any(n in everyday for n in names)  # a group with nothing to show: no heading
    g = parser.add_argument_group(title or f"{group} ({model.__name__})",
                                  (model.__doc__ or "").split("\n\n")[0].replace("``", "").replace("\n", " ")
                                  ) if shown else parser.add_argument_group()
    for name in names:
        info = model.model_fields[name]
        ov = OVERRIDES.get((model.__name__, name), Override())
        flag = ov.flag or "--" + name.replace("_", "-")
        dest = f"{group}{SEP}{name}"
        default = getattr(base, name)
        scalar, lits, is_list = _parts(info.annotation)
        allowed = (choices or {}).get(name) or ov.choices or lits
        help_text = (helps or {}).get(name) or ov.help or info.description or ""
        if "(default" not in help_text and scalar is not bool:  # a flag's help says what it changes
            help_text += f" (default: {_show(default)})"
        hidden = everyday is not None and name not in everyday
        if hidden:
            help_text = argparse.SUPPRESS
            parser.set_defaults(hidden_options=(parser.get_default("hidden_options") or 0) + 1)
        metavar = "{" + ",".join(str(c) for c in allowed) + "}" if allowed else \
            (name[:-1] if is_list and name.endswith("s") else name).upper()
        kind = ov.kind
        if kind == "store_false" or (scalar is bool and default is True and kind is None):
            flag = ov.flag or "--no-" + name.replace("_", "-")
            g.add_argument(flag, dest=dest, action="store_false", default=argparse.SUPPRESS, help=help_text)
        elif scalar is bool:
            g.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind == "keyvalue":
            g.add_argument(flag, dest=dest, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                           help=help_text)
        elif kind == "comma":
            g.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar="A,B", help=help_text)
        elif kind == "widths":
            g.add_argument(flag, dest=dest, type=int, action="append", metavar="WIDTH", default=argparse.SUPPRESS,
                           help=help_text)
        elif is_list or kind == "append":
            g.add_argument(flag, dest=dest, type=scalar if scalar in (int, float) else str, action="append",
                           choices=allowed, metavar=metavar,
                           default=argparse.SUPPRESS, help=help_text if hidden else help_text + "; repeatable")
        else:
            kind_of = scalar if scalar in (int, float) else str
            if kind_of is not str and type(None) in typing.get_args(info.annotation):
                kind_of = _or_none(kind_of)
                help_text = help_text.replace(" (default:", "; 'none' for none (default:", 1)
            g.add_argument(flag, dest=dest, type=kind_of, choices=allowed,
                           metavar=metavar, default=argparse.SUPPRESS, help=help_text)


# A command's option group -> where a settings file (or a deployment's parameters) holds it: the flows' parameter
# names, with the spectrogram inside the backbone, as in a flow's parameters.
FILE_KEYS = {"export": ("options",), "spectrogram": ("backbone", "spectrogram")}


def load_config(path: str, groups: Sequence[str]) -> dict[str, Any]:
    """The settings of a ``--config`` file (YAML or JSON): ``{group: {setting: value}}`` in the shape of the flow's
    parameters (``backbone``, ``extract``, ``split``, ``output``, ...). Raises ParameterError for a file that cannot
    be read, is not a mapping of mappings, or names a group this command does not take (``groups``)."""
    import json
    from pathlib import Path

    import yaml

    from storage.errors import ParameterError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParameterError(f"cannot read the settings file {path}: {exc}.") from exc
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ParameterError(f"the settings file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                             f"{exc}") from exc
    known = sorted({FILE_KEYS.get(g, (g,))[0] for g in groups})
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ParameterError(f"the settings file {path} must map settings groups to their settings, e.g. "
                             "'finetune: {epochs: 20}'; this command's groups: " + ", ".join(known) + ".")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ParameterError(f"the settings file {path} has group(s) {', '.join(unknown)} that this command does not "
                             f"take; its groups: {', '.join(known)}.")
    return data


def _from_file(args: argparse.Namespace, group: str) -> dict[str, Any]:
    values: Any = getattr(args, "config_settings", None) or {}
    for key in FILE_KEYS.get(group, (group,)):
        values = values.get(key) if isinstance(values, dict) else None
    values = dict(values or {})
    if group == "backbone":
        values.pop("spectrogram", None)  # its own group on the command line
    return values


def settings_from(args: argparse.Namespace, group: str, model: type[BaseModel], base: BaseModel | None = None,
                  **fixed: Any):
    """The ``model`` a command's options describe: ``base`` (or the defaults), then the ``--config`` file's values,
    the options given, then ``fixed`` values that are set (``seed`` from ``--seed``, say); validated, with the
    project's error messages."""
    from tasks.backbones import parse_backbone_args

    given: dict[str, Any] = {}
    prefix = group + SEP
    for dest, value in vars(args).items():
        if not dest.startswith(prefix):
            continue
        name = dest[len(prefix):]
        kind = OVERRIDES.get((model.__name__, name), Override()).kind
        if kind == "keyvalue":
            value = parse_backbone_args(value)
        elif kind == "comma":
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif kind == "widths":
            value = [v for v in value if v > 0]
        given[name] = value
    data = {**(base.model_dump() if base is not None else {}), **_from_file(args, group), **given,
            **{k: v for k, v in fixed.items() if k in model.model_fields and v is not None}}
    return model.model_validate(data)
