"""What cnncodes knows about backbones before building one: the registry of ``keras.applications``
constructors, model files, constructor options, and the one table of preprocessing."""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from typing import Any, Sequence


from storage.errors import BackboneError, ParameterError



@dataclass(frozen=True)
class BackboneInfo:
    """What cnncodes knows about one ``keras.applications`` constructor."""

    name: str
    constructor: str
    module: str            # keras.applications submodule holding preprocess_input
    default_size: int
    min_size: int
    builtin_preprocessing: bool = False   # the model rescales its own input (EfficientNet, ConvNeXt, MobileNetV3)
    options: tuple[str, ...] = ()         # constructor options that may be passed through

    @property
    def preprocessing(self) -> str:
        return f"keras.applications.{self.module}.preprocess_input"


def _entries() -> dict[str, BackboneInfo]:
    e: list[BackboneInfo] = [
        BackboneInfo("vgg16", "VGG16", "vgg16", 224, 32),
        BackboneInfo("vgg19", "VGG19", "vgg19", 224, 32),
        BackboneInfo("xception", "Xception", "xception", 299, 71),
        BackboneInfo("inception_v3", "InceptionV3", "inception_v3", 299, 75),
        BackboneInfo("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 75),
        BackboneInfo("mobilenet", "MobileNet", "mobilenet", 224, 32, options=("alpha", "depth_multiplier", "dropout")),
        BackboneInfo("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 32, options=("alpha",)),
        BackboneInfo("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 32, True, ("alpha", "minimalistic")),
        BackboneInfo("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 32, True, ("alpha", "minimalistic")),
        BackboneInfo("nasnet_mobile", "NASNetMobile", "nasnet", 224, 32),
        BackboneInfo("nasnet_large", "NASNetLarge", "nasnet", 331, 32),
    ]
    for depth in (50, 101, 152):
        e.append(BackboneInfo(f"resnet{depth}", f"ResNet{depth}", "resnet", 224, 32))
        e.append(BackboneInfo(f"resnet{depth}_v2", f"ResNet{depth}V2", "resnet_v2", 224, 32))
    for depth in (121, 169, 201):
        e.append(BackboneInfo(f"densenet{depth}", f"DenseNet{depth}", "densenet", 224, 32))
    for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600)):
        e.append(BackboneInfo(f"efficientnet_b{i}", f"EfficientNetB{i}", "efficientnet", size, 32, True))
    for suffix, size in (("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300), ("s", 384), ("m", 480), ("l", 480)):
        e.append(BackboneInfo(f"efficientnet_v2_{suffix}", f"EfficientNetV2{suffix.upper()}", "efficientnet_v2",
                              size, 32, True, ("include_preprocessing",)))
    for size in ("tiny", "small", "base", "large", "xlarge"):
        e.append(BackboneInfo(f"convnext_{size}", f"ConvNeXt{size.capitalize()}", "convnext", 224, 32, True,
                              ("include_preprocessing",)))
    return {b.name: b for b in e}


REGISTRY: dict[str, BackboneInfo] = _entries()
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def is_model_file(name: str) -> bool:
    return str(name).lower().endswith(MODEL_SUFFIXES)


def suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry of ``name``; BackboneError listing the choices if unknown."""
    if name in REGISTRY:
        return REGISTRY[name]
    raise BackboneError(f"unknown backbone {name!r}.{suggest(name, list(REGISTRY))} Known backbones: "
                        f"{', '.join(list_backbones())}; or give the path of a .keras/.h5 model file. "
                        "`cnncodes backbones` lists them.")


def parse_backbone_args(items: Sequence[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["alpha=0.25", "minimalistic=True"]`` -> ``{"alpha": 0.25, "minimalistic": True}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ParameterError(f"backbone argument {item!r} is not KEY=VALUE (for example alpha=0.25).")
        key, raw = item.split("=", 1)
        key, raw = key.strip(), raw.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        out[key] = value
    return out

# The one table of preprocessing. A mode is what runs; MODES says how provenance names it.
MODES = {"none": "none", "scale01": "x/255",
         "tf": "imagenet_utils.preprocess_input(mode='tf')",
         "caffe": "imagenet_utils.preprocess_input(mode='caffe')",
         "torch": "imagenet_utils.preprocess_input(mode='torch')"}
# Preprocessing that can be named explicitly (for a user's own model, or to override).
PREPROCESSING_MODES = ("auto", *MODES)
# The mode each keras.applications module's preprocess_input applies (the fine-tuned model's layer form).
FAMILY_MODES = {"vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe", "resnet_v2": "tf", "inception_v3": "tf",
                "inception_resnet_v2": "tf", "xception": "tf", "mobilenet": "tf", "mobilenet_v2": "tf",
                "nasnet": "tf", "densenet": "torch", "mobilenet_v3": "none", "efficientnet": "none",
                "efficientnet_v2": "none", "convnext": "none"}


def preprocessing_of(spec) -> tuple[str, str]:
    """``(what runs, its name in provenance)`` for a backbone spec: what runs is a mode of
    :data:`MODES` or a ``keras.applications`` module whose ``preprocess_input`` runs."""
    p = spec.preprocessing
    if p != "auto":
        return p, MODES.get(p) or f"keras.applications.{p}.preprocess_input"
    if is_model_file(spec.name):
        return "none", "none"
    info = backbone_info(spec.name)
    if info.builtin_preprocessing:
        if spec.backbone_args.get("include_preprocessing", True) is not False:
            return "none", f"built into the model ({info.preprocessing} is the identity)"
        return "none", info.preprocessing
    return info.module, info.preprocessing


def preprocess_mode(spec) -> str:
    """The serialisable mode of ``spec``'s preprocessing (the fine-tuned model's ``Preprocess`` layer)."""
    what, _ = preprocessing_of(spec)
    if what in MODES:
        return what
    if what in FAMILY_MODES:
        return FAMILY_MODES[what]
    raise ParameterError(f"preprocessing {what!r} has no layer form for fine-tuning; use one of "
                         f"{tuple(MODES)}.")
