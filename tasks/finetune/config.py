"""How a network is fine-tuned: the settings, validated (see :mod:`tasks.settings`)."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from storage.errors import ParameterError

from ..data.images import RESIZE_MODES
from ..settings import Settings


OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("flip", "rotation", "zoom", "translation", "contrast", "time-mask", "freq-mask", "time-shift")
SCHEDULES = ("constant", "step", "cosine", "plateau")


class FineTuneConfig(Settings):
    """How the network is fine-tuned (the backbone and its precision are a :class:`BackboneSpec`)."""

    freeze: str = Field("none", description="'all' (head only), 'none', 'first:N' (the first N backbone layers) "
                                            "or 'until:LAYER' (up to and including it)")
    freeze_batchnorm: bool = Field(True, description="keep every BatchNormalization layer frozen (inference mode)")
    cut_layer: str | None = Field(None, description="use the backbone only up to this layer")
    head_pooling: Literal["avg", "flatten", "time-avg", "time-max"] = Field(
        "avg", description="pooling of the new head (time-avg, time-max: over the width only, for spectrograms)")
    dense: tuple[int, ...] = Field((1024,), description="hidden Dense+ReLU widths of the head (empty for none)")
    dropout: float = Field(0.5, description="dropout after each hidden Dense, in [0, 1)")
    pool_dropout: float = Field(0.0, description="dropout right after the pooling (before the first hidden Dense, "
                                                 "or the softmax when there is none), in [0, 1)")
    optimizer: Literal[OPTIMIZERS] = Field("sgd", description="optimizer of the fine-tuning phase")
    learning_rate: float = Field(1e-4, description="base rate of the backbone")
    momentum: float = Field(0.9, description="SGD momentum, in [0, 1)")
    head_lr_multiplier: float = Field(10.0, description="the new head learns at base rate x this")
    schedule: Literal[SCHEDULES] = Field("constant", description="learning-rate schedule: step (x step_gamma every "
                                                                 "step_epochs), cosine, plateau (reduce on plateau)")
    step_epochs: int = Field(5, description="schedule step: epochs between steps")
    step_gamma: float = Field(0.1, description="schedule step/plateau: rate factor")
    epochs: int = Field(10, description="fine-tuning epochs")
    head_epochs: int = Field(0, description="two-phase: first train the head alone this many epochs (Adam), "
                                            "backbone frozen")
    head_learning_rate: float = Field(1e-3, description="phase one's rate")
    batch_size: int = Field(32, description="images per step")
    augment: tuple[Literal[AUGMENTATIONS], ...] = Field(("flip", "rotation", "zoom"),
                                                       description="Keras preprocessing layers, training only")
    augment_strength: float = Field(0.1, description="strength of rotation, zoom, translation and contrast")
    mixup: float = Field(0.0, description="mixup: each training image and its label mixed with another of the "
                                          "batch, by a weight drawn from Beta(mixup, mixup) (0.2 is usual); 0: off")
    monitor: Literal["val_accuracy", "val_loss", "accuracy", "loss", "none"] = Field(
        "val_accuracy", description="metric for checkpoints and early stopping; 'none': train exactly `epochs` "
                                    "epochs and keep the last (no selection step, no val split needed)")
    patience: int = Field(3, description="early-stopping patience in epochs")
    min_delta: float = Field(0.0, description="smallest change of the monitored metric that counts")
    resize: Literal[RESIZE_MODES] = Field("stretch", description="how images are fitted to the square input")
    xla: bool = Field(False, description="compile the training step with XLA")
    seed: int = Field(0, description="seed of initialisation, shuffling, dropout and augmentation")
    ensemble: int = Field(1, description="networks trained alike but for their seeds (seed, seed + 1, ...); the "
                                         "saved model averages their class probabilities")
    adapt_batchnorm: bool = Field(False, description="AdaBN when evaluating and predicting: every "
                                                     "BatchNormalization layer's statistics re-estimated on each "
                                                     "group's own images (a speaker's, the CSV's group column or "
                                                     "--group-by; else each split or predict call is one group), "
                                                     "no label used")
    self_train: int = Field(0, description="rounds of test-time self-training on each group, after AdaBN (needs "
                                           "adapt_batchnorm): the model's most confident predictions on the group "
                                           "become labels, every network trains on them, and the group is adapted "
                                           "and predicted again; no label used, the trained weights come back "
                                           "afterwards; 0: off")
    self_train_fraction: tuple[float, ...] = Field((0.5,), description="self-training: the most confident share of "
                                                                      "the images predicted as each class that becomes "
                                                                      "labels, in (0, 1]; one per round (the last "
                                                                      "serves any further round)")
    self_train_epochs: int = Field(10, description="self-training: epochs over the pseudo-labelled images per round")
    self_train_learning_rate: float = Field(1e-4, description="self-training: Adam's rate")

    @model_validator(mode="before")
    @classmethod
    def _older_keys(cls, data: Any) -> Any:
        # Registered before precision moved to the backbone spec: see precision_of.
        if isinstance(data, dict) and "mixed_precision" in data:
            data = {k: v for k, v in data.items() if k != "mixed_precision"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "FineTuneConfig":
        def bad(name, allowed):
            raise ParameterError(f"{name} must be {allowed}; got {getattr(self, name)!r}.")

        if not (self.freeze in ("all", "none") or re.fullmatch(r"first:\d+", self.freeze)
                or re.fullmatch(r"until:.+", self.freeze)):
            bad("freeze", "'all', 'none', 'first:N' or 'until:LAYER'")
        if any(d < 1 for d in self.dense):
            bad("dense", "a list of positive layer widths (or empty)")
        for name in ("dropout", "pool_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "in [0, 1)")
        for name in ("learning_rate", "head_learning_rate", "head_lr_multiplier"):
            if not getattr(self, name) > 0:
                bad(name, "a positive number")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "in [0, 1)")
        for name in ("epochs", "batch_size", "step_epochs", "ensemble"):
            if getattr(self, name) < 1:
                bad(name, "a positive integer")
        if self.head_epochs < 0:
            bad("head_epochs", "an integer >= 0")
        if not self.mixup >= 0:
            bad("mixup", "a number >= 0 (0: off)")
        if self.adapt_batchnorm and self.freeze_batchnorm:
            raise ParameterError("adapt_batchnorm re-estimates, for each group, the BatchNormalization statistics the "
                                 "network learnt on its training data; with freeze_batchnorm (the default) they stay "
                                 "ImageNet's and there is nothing to adapt. Add --train-batchnorm, or leave "
                                 "--adapt-batchnorm out.")
        if self.self_train < 0:
            bad("self_train", "an integer >= 0 (0: off)")
        if self.self_train_epochs < 1:
            bad("self_train_epochs", "a positive integer")
        if not self.self_train_fraction or not all(0.0 < f <= 1.0 for f in self.self_train_fraction):
            bad("self_train_fraction", "one or more shares in (0, 1]")
        if not self.self_train_learning_rate > 0:
            bad("self_train_learning_rate", "a positive number")
        if self.self_train and not self.adapt_batchnorm:
            raise ParameterError("self_train trains the model on each group's own images after AdaBN has adapted it "
                                 "to the group; add --adapt-batchnorm (with --train-batchnorm), or leave --self-train "
                                 "out.")
        if self.schedule == "plateau" and self.monitor == "none":
            raise ParameterError("schedule 'plateau' lowers the rate when the monitored metric stops improving; "
                                 "with monitor 'none' there is none: choose a monitor, or schedule cosine or step.")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FineTuneConfig":
        """From :meth:`as_dict` output, also of models registered before precision moved to the
        backbone spec (their ``mixed_precision`` key is dropped: see :func:`precision_of`)."""
        return cls.model_validate(d)


def precision_of(spec: dict[str, Any], config: dict[str, Any]) -> str:
    """The precision a registered fine-tuned model asked for: its spec's, or, for models registered
    before one precision option existed, their ``mixed_precision`` (off -> float32)."""
    old = config.get("mixed_precision")
    if old is not None:
        return {"off": "float32"}.get(old, old)
    return spec.get("precision") or "auto"


# The transfer flow's defaults for fine-tuning (cases 3 and 4): the head trains alone first.
TRANSFER_FINETUNE = FineTuneConfig(head_epochs=3)
