"""Settings as frozen, validated pydantic models: one place that says what each knob means.

Every group of settings (:class:`~tasks.backbones.BackboneSpec`, :class:`~tasks.extract.ExtractOptions`,
:class:`SplitConfig`, :class:`~tasks.probe.linear.LinearConfig`, :class:`~tasks.finetune.FineTuneConfig`,
:class:`~tasks.decide.transfer.Thresholds`, :class:`Output`, :class:`ScaleOut`) derives from :class:`Settings`:

* fields carry their type, constraints (``Literal``, ``Field(ge=...)``) and a description, so the
  Prefect UI shows a grouped, validated form for a deployment, and the CLI builds its options and
  help from the same fields (``cnncodes.cli``);
* models are frozen: a changed setting is a new object (``model_copy(update=...)``), never a value
  rewritten behind the caller's back;
* validation happens at construction, and :func:`settings_error` turns pydantic's report into the
  project's own error with a message that names the setting, what is allowed and what was given.

Nothing here imports TensorFlow or Prefect.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from storage.errors import CnncodesError, ParameterError


def _choices(model: type[BaseModel], field: str) -> list[Any] | None:
    info = model.model_fields.get(field)
    if info is None:
        return None
    ann = info.annotation
    for arg in (ann, *typing.get_args(ann)):
        if typing.get_origin(arg) is Literal:
            return list(typing.get_args(arg))
    return None


def settings_error(model: type[BaseModel], exc: ValidationError) -> CnncodesError:
    """The first problem of ``exc`` as a project error: a check of our own keeps its exception and
    message; pydantic's type and range checks become "NAME must be ...; got VALUE."."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    # A union (a list of choices or one choice) reports one error per member: the choice error says most.
    same_field = [e for e in errors if e.get("loc", ())[:1] == err.get("loc", ())[:1]]
    err = next((e for e in same_field if e.get("type") == "literal_error"), err)
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, CnncodesError):
        return original
    loc = err.get("loc", ())
    name = str(loc[0]) if loc else model.__name__
    if len(loc) > 1 and isinstance(loc[1], int):  # an item of a list setting
        name = f"{name}[{loc[1]}]"
    got = err.get("input")
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    choices = _choices(model, str(err["loc"][0])) if err.get("loc") else None
    if kind == "literal_error" and choices:
        want = "one of " + ", ".join(str(c) for c in choices)
    elif kind == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return ParameterError(f"{model.__name__} has no setting {name!r}; its settings are: {known}.")
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "")
        want = f"a number {sign} {bound}"
    elif kind.startswith("int"):
        want = "an integer"
    elif kind.startswith("float"):
        want = "a number"
    elif kind.startswith("bool"):
        want = "true or false"
    elif kind.startswith(("list", "tuple")):
        want = "a list"
    elif kind.startswith("dict"):
        want = "a mapping of names to values"
    elif original is not None:
        return ParameterError(str(original))
    else:
        want = err.get("msg", "valid")
    return ParameterError(f"{name} must be {want}; got {got!r}.")


class Settings(BaseModel):
    """Base of every settings group: frozen, no unknown keys, validated at construction."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), validate_default=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise settings_error(type(self), exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise settings_error(cls, exc) from None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for Prefect task inputs, metadata and reports)."""
        return self.model_dump(mode="json")


def check_fractions(val: float, test: float) -> None:
    for name, v in (("val_fraction", val), ("test_fraction", test)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
            raise ParameterError(f"{name} must be a number in [0, 1); got {v!r}.")
    if val + test >= 1.0:
        raise ParameterError(f"val_fraction + test_fraction must be below 1 so that some images are left "
                             f"to train on; got {val} + {test}.")


class SplitConfig(Settings):
    """How a dataset is scanned, and split when it has no split folders: stratified per class, seeded, recorded."""

    val_fraction: float = Field(0.2, description="share of each class held out for validation when the data "
                                                 "has no split")
    test_fraction: float = Field(0.15, description="share of each class held out for test, which no selection step "
                                                   "sees, when the data has no test split (from val first when the data "
                                                   "has train and val); 0 reports val accuracy, which is optimistic")
    seed: int = Field(0, description="seed of the drawn split")
    pinned: str | None = Field(None, description="JSON file of pinned splits ({sha256: split}, or a registry "
                                                 "lineage's splits.json): those images keep their split, only "
                                                 "the others are drawn")
    group_by: str | None = Field(None, description="regular expression searched in each file's name whose first "
                                                   "capture group names the file's group (a speaker, a patient): a "
                                                   "group's files all stay in one split, and a drawn split is "
                                                   "grouped and stratified; a CSV's group column does the same")
    rehash: bool = Field(False, description="read and hash every file again instead of trusting the stat cache "
                                            "of the last scan (files whose size, mtime, ctime and inode are "
                                            "unchanged are not read): for data changed behind the filesystem's "
                                            "back")

    @model_validator(mode="before")
    @classmethod
    def _fractions(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_fractions(data.get("val_fraction", 0.2), data.get("test_fraction", 0.15))
        return data


class Output(Settings):
    """Where results go (stores, manifests, reports and runs under ``out``; models in ``registry``) and the Keras
    backend that computes them. Every flow takes it, so a deployment chooses its backend here."""

    out: str = Field("cnncodes-out", description="folder for stores, manifests, runs and reports")
    registry: str | None = Field(None, description="model registry folder (default: OUT/registry)")
    backend: Literal["tensorflow", "jax", "torch"] | None = Field(
        None, description="Keras backend to compute on (default: KERAS_BACKEND, else keras.json's, else tensorflow); "
                          "one per process")

    @property
    def registry_path(self) -> str:
        return self.registry or str(Path(self.out) / "registry")

    @property
    def reports(self) -> str:
        return str(Path(self.out) / "reports")

    @property
    def runs(self) -> Path:
        return Path(self.out) / "runs"


class ScaleOut(Settings):
    """Extraction over several processes, machines or GPUs (Dask shards)."""

    shards: int = Field(1, ge=1, description="split the dataset into N shards extracted side by side by Dask "
                                             "workers, each into its own store file; the store is then an index "
                                             "that reads as one store")
    workers: int | None = Field(None, ge=1, description="processes of the local Dask cluster (default: one per "
                                                        "shard, or one per GPU)")
    dask_address: str | None = Field(None, description="use this Dask scheduler (tcp://host:8786) instead of a "
                                                       "local cluster")
    gpus: int = Field(0, ge=0, description="one shard per GPU of this machine, each worker pinned to its GPU")


class ExportOptions(Settings):
    """How a registered model is exported for serving (`cnncodes export`): the file format and its checks."""

    format: Literal["keras", "savedmodel", "tflite"] = Field(
        "keras", description="keras: one .keras file (keras.saving.load_model); savedmodel: a TensorFlow "
                             "SavedModel folder (TensorFlow Serving); tflite: a TensorFlow Lite file (phones)")
    int8: bool = Field(False, description="tflite: also write a dynamic-range int8 model (weights in int8, about "
                                          "4x smaller) and measure its accuracy change on the model's test split")
    force: bool = Field(False, description="replace an earlier export at the output folder")
