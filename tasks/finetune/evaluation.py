"""A fine-tuned model after training: load it, predict images decoded as in training, metrics per
split, learning curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from storage.manifest import Manifest, Skip

from .. import runtime
from ..data.audio import Spectrogram
from ..data.inputs import InputError, input_loader
from .adapt import MIN_IMAGES, PASS_BATCH, SelfTraining, by_group
from .config import FineTuneConfig
from .data import augmentation, augmentations_for, split_arrays
from .network import keras_pieces


def plot_learning_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    from ..reports.evaluate import new_figure, save_png

    fig, axes = new_figure(1, 2, figsize=(10, 4))
    x = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            ys = [h.get(key) for h in history]
            if any(v is not None for v in ys):
                ax.plot(x, [np.nan if v is None else v for v in ys], style, marker="o", label=key)
        # a new phase, or the next network of an ensemble
        boundaries = [i + 0.5 for i in range(1, len(history))
                      if (history[i]["phase"], history[i].get("network")) !=
                      (history[i - 1]["phase"], history[i - 1].get("network"))]
        for b in boundaries:
            ax.axvline(b, color="grey", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def load_finetuned(path: str | Path):
    keras = runtime.keras()
    keras_pieces()
    return keras.models.load_model(path, compile=False)


def predict_images_array(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.asarray(model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0))


def predict_paths(model, paths: Sequence[str], size: int, resize: str, batch_size: int = 32,
                  media: str = "image", spectrogram: Spectrogram | None = None
                  ) -> tuple[np.ndarray, list[int], list[Skip]]:
    """Class probabilities of images (or sound recordings, drawn with ``spectrogram``) on disk, decoded as in
    training; returns (probs, ok indices, skips)."""
    load = input_loader(media, size, resize, spectrogram=spectrogram)
    probs, ok, skips = [], [], []
    for start in range(0, len(paths), batch_size):
        batch, idx = [], []
        for i in range(start, min(len(paths), start + batch_size)):
            try:
                batch.append(load(paths[i]))
                idx.append(i)
            except InputError as exc:
                skips.append(Skip(paths[i], str(exc)))
        if batch:
            probs.append(predict_images_array(model, np.stack(batch), batch_size))
            ok += idx
    out = np.concatenate(probs) if probs else np.zeros((0, model.output_shape[-1]))
    return out, ok, skips


def self_training_for(config: FineTuneConfig | dict[str, Any] | None, media: str,
                      progress: Callable[[int, int], None] | None = None) -> SelfTraining | None:
    """The test-time self-training a model was trained to use (its config's ``self_train``), with its training
    augmentation for ``media`` and ``progress`` told after every epoch; None when off (or for a config from before
    the option)."""
    if config is None:
        return None
    cfg = config if isinstance(config, FineTuneConfig) else FineTuneConfig.from_dict(config)
    if not cfg.self_train:
        return None
    return SelfTraining(rounds=cfg.self_train, epochs=cfg.self_train_epochs, fractions=tuple(cfg.self_train_fraction),
                        learning_rate=cfg.self_train_learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                        augment=(lambda seed: augmentation(cfg.model_copy(update={"seed": seed}), media))
                        if augmentations_for(cfg, media) else None, progress=progress)


def predict_paths_by_group(model, paths: Sequence[str], groups: Sequence[str], size: int, resize: str,
                           batch_size: int = 32, media: str = "image", spectrogram: Spectrogram | None = None,
                           min_images: int | None = None, self_training: SelfTraining | None = None
                           ) -> tuple[np.ndarray, list[int], list[Skip], dict[str, Any]]:
    """:func:`predict_paths`, each group (``groups[i]`` names file i's) after AdaBN on that group's own files
    (:mod:`.adapt`; files are decoded twice, so memory holds one batch, not a group; with ``self_training``, the
    group's images are held for it and the network self-trains on them). Groups of fewer than ``min_images``
    readable files (default :data:`.adapt.MIN_IMAGES`) keep the trained statistics, which are back in the model on
    return, as are its weights. Returns (probs, ok indices, skips, a summary of the adaptation)."""
    load = input_loader(media, size, resize, spectrogram=spectrogram)
    rows: dict[int, np.ndarray] = {}
    skips: list[Skip] = []

    def readable(idx: list[int]):
        for start in range(0, len(idx), PASS_BATCH):
            batch = []
            for i in idx[start:start + PASS_BATCH]:
                try:
                    batch.append(load(paths[i]))
                except InputError:
                    pass  # predict_paths reports it
            yield np.stack(batch) if batch else np.zeros((0, size, size, 3), np.uint8)

    def predict(idx: list[int]) -> None:
        probs, ok, bad = predict_paths(model, [paths[i] for i in idx], size, resize, batch_size, media, spectrogram)
        skips.extend(bad)
        rows.update({idx[j]: p for j, p in zip(ok, probs)})

    summary = by_group(model, groups, readable, predict, MIN_IMAGES if min_images is None else min_images,
                       self_training)
    ok_all = sorted(rows)
    out = np.stack([rows[i] for i in ok_all]) if ok_all else np.zeros((0, model.output_shape[-1]))
    return out, ok_all, skips, summary


# --------------------------------------------------------------------------- evaluate + register
def evaluate_finetuned(model_path: str | Path, manifest: Manifest, size: int, resize: str, batch_size: int,
                       splits: Sequence[str] = ("train", "val", "test"), outcomes_prefix: str | Path | None = None,
                       spectrogram: Spectrogram | None = None, adapt: bool = False,
                       self_training: SelfTraining | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Metrics per split of a saved fine-tuned model (images decoded as in training, no augmentation).
    With ``outcomes_prefix``, each val/test split's per-image outcomes go to
    ``<prefix>.outcomes-<split>.csv`` and ``metrics[split]["outcomes"]`` names the file. With ``adapt``, val
    and test are predicted group by group after AdaBN (the manifest's groups; files of no group form one group
    per split), and with ``self_training`` after self-training on each group too; their metrics then say so
    (``adaptation``, with the trained statistics' accuracy as ``unadapted_accuracy`` and, with self-training,
    AdaBN's alone as ``adabn_accuracy``). Train keeps the trained statistics: they are its own."""
    from ..reports.evaluate import evaluate_scores, predicted, write_outcomes

    model = load_finetuned(model_path)
    metrics, skipped = {}, []
    for split in splits:
        paths, labels, rel = split_arrays(manifest, split)
        if not paths:
            continue
        probs, ok, skips = predict_paths(model, paths, size, resize, batch_size, manifest.media, spectrogram)
        skipped += [{"path": s.path, "reason": s.reason} for s in skips]
        adaptation = None
        if adapt and split != "train" and ok:
            unadapted = float(np.mean(np.argmax(probs, axis=1) == labels[ok]))
            groups = [manifest.groups.get(r, f"({split})") for r in rel]
            how = (size, resize, batch_size, manifest.media, spectrogram)
            if self_training is not None:  # AdaBN alone first, for the record
                alone, ok_alone, _, _ = predict_paths_by_group(model, paths, groups, *how)
                adabn = float(np.mean(np.argmax(alone, axis=1) == labels[ok_alone]))
            probs, ok, _, adaptation = predict_paths_by_group(model, paths, groups, *how, self_training=self_training)
            adaptation["unadapted_accuracy"] = unadapted
            if self_training is not None:
                adaptation["adabn_accuracy"] = adabn
        if ok:
            metrics[split] = evaluate_scores(probs, labels[ok], manifest.class_names)
            if adaptation is not None:
                metrics[split]["adaptation"] = adaptation
            if outcomes_prefix is not None and split != "train":
                sha = {s.path: s.sha256 for s in manifest.samples if s.split == split}
                out = write_outcomes(f"{outcomes_prefix}.outcomes-{split}.csv", [rel[i] for i in ok],
                                     [sha[rel[i]] for i in ok], labels[ok], predicted(probs))
                metrics[split]["outcomes"] = str(Path(out).resolve())
    return metrics, skipped
