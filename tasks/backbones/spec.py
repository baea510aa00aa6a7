"""The backbone spec: everything needed to rebuild the same backbone, recorded as provenance."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from storage.errors import BackboneError, ParameterError
from storage.hashing import file_sha256

from .. import runtime
from ..data.audio import Spectrogram
from ..settings import Settings
from .catalog import (PREPROCESSING_MODES, REGISTRY, backbone_info, is_model_file, preprocessing_of)


class BackboneSpec(Settings):
    """Everything needed to rebuild the same backbone; recorded as provenance.

    A bare string is a backbone name (``"resnet50"`` as a flow parameter means
    ``{"name": "resnet50"}``). Weights spelled ``none``/``null``/``random`` mean ``"none"``, and a
    model file asked for ``imagenet`` weights uses the weights inside it (``"file"``): both are
    settled at construction, so the object never changes afterwards."""

    name: str = Field("mobilenet_v2", description="registered backbone (`cnncodes backbones` lists them) or a "
                                                   ".keras/.h5 model file")
    weights: str = Field("imagenet", description="'imagenet' (through Keras's cache, KERAS_HOME), 'none' (random, "
                                                 "seeded), or a weights file")
    input_size: int | None = Field(None, description="square input size in pixels (default: the backbone's own, "
                                                     "e.g. 224)")
    backbone_args: dict[str, Any] = Field(default_factory=dict, description="constructor options passed through, "
                                                                             "e.g. alpha=0.25 (recorded in the store)")
    preprocessing: str = Field("auto", description="'auto' (the family's preprocess_input), 'none', 'tf', 'caffe', "
                                                   "'torch', 'scale01', or a keras.applications module name")
    precision: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        "auto", description="compute precision of the whole network: float32; float16 (mixed, GPUs); bfloat16 "
                            "(GPUs and CPUs with AVX512-BF16/AMX); auto = float16 on a GPU, float32 on a CPU")
    seed: int = Field(0, description="initialisation seed for weights 'none'")
    spectrogram: Spectrogram = Field(default_factory=Spectrogram,
                                     description="how sound becomes the input image, when the data is audio "
                                                 "(the spectrogram recipe; recorded in the store)")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        w = str(data.get("weights", "imagenet"))
        if w.lower() in ("none", "null", "random"):
            data["weights"] = "none"
        elif w == "imagenet" and is_model_file(str(data.get("name", ""))):
            data["weights"] = "file"  # the model file carries its own weights
        if data.get("backbone_args") is None:
            data["backbone_args"] = {}
        if data.get("spectrogram") is None:
            data.pop("spectrogram", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> "BackboneSpec":
        """Everything that can be checked without TensorFlow."""
        if self.preprocessing not in PREPROCESSING_MODES and self.preprocessing not in {
                b.module for b in REGISTRY.values()}:
            raise ParameterError(f"preprocessing must be one of {PREPROCESSING_MODES} or a keras.applications "
                                 f"module name (e.g. 'resnet', 'mobilenet_v2'); got {self.preprocessing!r}.")
        w = self.weights
        if w == "file" and not is_model_file(self.name):
            raise ParameterError("weights 'file' means the weights inside a model file; give a weights file path.")
        if w not in ("imagenet", "file", "none") and not Path(w).is_file():
            raise ParameterError(f"weights must be 'imagenet', 'none' or an existing weights file; "
                                 f"{w!r} is neither (no such file).")
        if is_model_file(self.name):
            if not Path(self.name).is_file():
                raise BackboneError(f"model file {self.name} does not exist.")
            if self.backbone_args:
                raise ParameterError("backbone arguments only apply to keras.applications backbones, "
                                     f"not to a model file ({self.name}).")
            return self
        info = backbone_info(self.name)
        unknown = sorted(set(self.backbone_args) - set(info.options))
        if unknown:
            allowed = ", ".join(info.options) or "none"
            raise ParameterError(f"{self.name} does not take backbone argument(s) {unknown}; it takes: {allowed}.")
        if self.input_size is not None and self.input_size < info.min_size:
            raise BackboneError(f"{self.name} cannot take input size {self.input_size!r}: the smallest it "
                                f"accepts is {info.min_size} (default {info.default_size}).")
        return self

    def resolved(self) -> "BackboneSpec":
        """This spec with ``precision`` 'auto' replaced by what it means on this machine (imports
        TensorFlow only then): stores and models record the precision that actually ran."""
        if self.precision != "auto":
            return self
        return self.model_copy(update={"precision": runtime.resolve_precision(self.precision)})

    @property
    def size(self) -> int | None:
        if self.input_size is not None:
            return int(self.input_size)
        return None if is_model_file(self.name) else backbone_info(self.name).default_size

    def preprocessing_name(self) -> str:
        """How provenance names this spec's preprocessing (see :func:`~.catalog.preprocessing_of`)."""
        return preprocessing_of(self)[1]

    def identity(self) -> dict[str, Any]:
        """The configuration part of a store's identity (the weights digest is added once built)."""
        weights = self.weights
        if weights not in ("imagenet", "none", "file"):
            weights = f"file:{file_sha256(weights)}"
        name = self.name
        if is_model_file(name):
            name = f"model-file:{file_sha256(name)}"
        return {"backbone": name, "backbone_args": dict(sorted(self.backbone_args.items())),
                "weights": weights, "init_seed": self.seed if weights == "none" else None,
                "input_size": self.size, "preprocessing": self.preprocessing_name(),
                "precision": self.precision}
