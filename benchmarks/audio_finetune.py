"""Fine-tuning on spoken digits: can a network fine-tuned on three voices recognise a fourth?

An experiment for issue 17, outside the flow. On ``../shared/data/fsdd`` (2,000 recordings, 10 digits, 4
speakers, 8 kHz), with the product's spectrogram recipe (``tasks.data.audio``: ``--sample-rate 8000 --n-mels 32
--trim-db 30 --duration none --top-db 60 --colormap viridis``) drawn at ``--size`` pixels, MobileNet alpha 0.25
with ImageNet weights (offline from ``../shared/keras``) is fine-tuned whole, BatchNormalization included, with
a new head (global average pooling, dropout, softmax), for a fixed number of epochs (no early stopping, no
checkpoint choice: the last epoch's model is the one scored).

Variants (``--variants``), all on the same images and schedule (Adam, cosine decay, ``--epochs``):

* ``base``: SpecAugment's masks (one time band, one frequency band per image) and a time shift;
* ``warp``: ``base`` plus a random frequency warp per image: the rows scaled by a factor in [1 - w, 1 + w]
  about the bottom row (0 Hz), what a different vocal tract length does to formants (VTLP);
* ``mixup``: ``base`` plus mixup (pairs of images and their labels mixed, Beta(0.2, 0.2));
* ``warp+mixup``: both;
* ``lpft``: ``base``, but the new head first trains alone for ``--head-epochs`` epochs (backbone frozen,
  BatchNormalization on its moving statistics, Adam at 1e-3), the linear probe before the fine-tuning of
  LP-FT (Kumar et al., 2022: fine-tuning from a trained head distorts the pretrained features less, and
  generalises better off the training distribution); the flow's ``--head-epochs``.

Protocol, in one run:

1. **Development** (nicolas's images are drawn into the cache with the others, never used here): george,
   jackson and lucas each held out in turn, the network
   fine-tuned on the two others. The held-out speaker's accuracy is logged after every epoch (curves, for
   reading); the variant with the best mean accuracy at the last epoch is chosen.
2. **Final**: every speaker held out in turn, fine-tuned on the other three, with ``base`` and with the chosen
   variant. nicolas's row is the one no choice saw.

``--normalise speaker`` draws every image after per-speaker mean normalisation: each mel band's mean decibel level
over all of a speaker's (trimmed) recordings is subtracted from that speaker's spectrograms before they are
rendered, the per-speaker cepstral/spectral mean normalisation of speech recognisers. It uses the speaker of every
recording (test speakers' too) but no label.

``--adapt-bn`` also scores every network after AdaBN (the flow's ``--adapt-batchnorm``): each BatchNormalization
layer's moving statistics replaced by those of the held-out speaker's images in one batch (no label), and the
ensembles of the adapted networks; the unadapted scores stay beside.

``--speeds A,B`` adds every training voice's recordings played at speed A and B (resampled: pitch and formants
scaled, the speed perturbation of speech recognisers) to the training set; the held-out voice is never copied.

``--tta-warps F1,F2,...`` (with ``--adapt-bn``) also warps the held-out voice's images by each factor (rows scaled
about 0 Hz, a vocal-tract-length warp), adapts and predicts each, and picks per network and per ensemble the
factor whose predictions have the least mean entropy: VTLN chosen by the network's confidence, no label used.

``--seeds N`` trains N networks per run (seeds ``--seed`` onwards) and also scores their averaged
probabilities (an ensemble). ``--no-final`` stops after step 1 (to compare settings, ``--size`` say, in the development world only).

Usage:
    PYTHONPATH=. python benchmarks/audio_finetune.py --json benchmarks/results/audio-finetune.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from audio_shared import DEV_WORLD, RECIPE, SPEAKERS, recordings, shared_inputs  # noqa: E402  the same dataset's listing
from report import emit  # noqa: E402  benchmarks/ is the script's folder

VARIANTS = ("base", "warp", "mixup", "warp+mixup", "lpft")


def images(data: Path, size: int, cache: Path, normalise: str = "none") -> dict[str, dict[str, np.ndarray]]:
    """Per speaker: ``x`` (n, size, size, 3) uint8 spectrogram images, ``y`` digits; cached in ``cache``."""
    from tasks.data.audio import Spectrogram, load_audio, spectrogram, to_image

    path = cache / (f"fsdd-{size}.npz" if normalise == "none" else f"fsdd-{size}-{normalise}.npz")
    if path.exists():
        with np.load(path) as z:
            return {s: {"x": z[f"{s}/x"], "y": z[f"{s}/y"]} for s in SPEAKERS}
    recipe = Spectrogram(**RECIPE)
    out: dict[str, dict[str, list]] = {s: {"x": [], "y": []} for s in SPEAKERS}
    t = time.perf_counter()
    listing = recordings(data)
    bands = [spectrogram(load_audio(data / rel, recipe.sample_rate, recipe.max_seconds), recipe)
             for rel, _, _ in listing]
    shift = {s: 0.0 for s in SPEAKERS}
    if normalise == "speaker":  # each band's mean level in dB over all the speaker's frames
        for s in SPEAKERS:
            db = np.concatenate([10 * np.log10(np.maximum(b, 1e-10)) for b, (_, _, sp) in zip(bands, listing)
                                 if sp == s], axis=1)
            shift[s] = db.mean(axis=1, keepdims=True)
    for b, (rel, digit, speaker) in zip(bands, listing):
        out[speaker]["x"].append(to_image(b / 10.0 ** (shift[speaker] / 10.0), recipe, size))
        out[speaker]["y"].append(int(digit))
    arrays = {s: {"x": np.stack(v["x"]), "y": np.array(v["y"], np.int32)} for s, v in out.items()}
    print(f"  drew 2000 spectrograms in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{s}/{k}": v for s, d in arrays.items() for k, v in d.items()})
    return arrays


def speed_copies(data: Path, size: int, cache: Path, speeds: list[float]) -> dict[str, dict[float, np.ndarray]]:
    """Per speaker and speed factor ``a``: every recording played at speed ``a`` (``scipy.signal.resample_poly``
    by 1/a, kept at 8 kHz: pitch and formants scaled by ``a``, the speed perturbation of speech recognisers),
    drawn as ``images`` draws the originals, in the same order (so ``y`` is the originals'); cached."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    from tasks.data.audio import Spectrogram, load_audio, spectrogram_image

    recipe = Spectrogram(**RECIPE)
    out: dict[str, dict[float, np.ndarray]] = {s: {} for s in SPEAKERS}
    listing = recordings(data)
    for a in speeds:
        path = cache / f"fsdd-{size}-speed{a:g}.npz"
        if path.exists():
            with np.load(path) as z:
                for s in SPEAKERS:
                    out[s][a] = z[s]
            continue
        ratio = Fraction(1.0 / a).limit_denominator(100)
        drawn: dict[str, list] = {s: [] for s in SPEAKERS}
        for rel, _, speaker in listing:
            wave = load_audio(data / rel, recipe.sample_rate, recipe.max_seconds)
            drawn[speaker].append(spectrogram_image(resample_poly(wave, ratio.numerator, ratio.denominator)
                                                    .astype(np.float32), recipe, size))
        for s in SPEAKERS:
            out[s][a] = np.stack(drawn[s])
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{s: out[s][a] for s in SPEAKERS})
    return out


def augmenter(size: int, variant: str, warp: float, seed: int, strength: float = 0.1):
    """``(x float32 batch, y one-hot) -> (x, y)`` training augmentation of ``variant``; ``strength`` as the flow's
    ``--augment-strength``: masks up to 2 x strength of the image, time shifts up to strength."""
    import tensorflow as tf

    gen = tf.random.Generator.from_seed(seed)

    def band(x, axis, widest):
        n = tf.shape(x)[0]
        width = gen.uniform([n], 0, widest + 1, dtype=tf.int32)
        start = tf.cast(gen.uniform([n]) * tf.cast(size - width + 1, tf.float32), tf.int32)
        pos = tf.range(size)[None, :]
        keep = tf.cast(~((pos >= start[:, None]) & (pos < (start + width)[:, None])), x.dtype)
        return x * tf.reshape(keep, [n, size, 1, 1] if axis == 1 else [n, 1, size, 1])

    def apply(x, y):
        n = tf.shape(x)[0]
        if "warp" in variant:
            a = gen.uniform([n], 1.0 - warp, 1.0 + warp)  # output row r shows input row (r - b) / a + b, b = bottom
            bottom = float(size - 1)
            shift = gen.uniform([n], -strength, strength) * size  # time shift, in the same transform
            zeros, ones = tf.zeros([n]), tf.ones([n])
            transform = tf.stack([ones, zeros, shift, zeros, 1.0 / a, bottom * (1.0 - 1.0 / a), zeros, zeros], axis=1)
            x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transform, output_shape=[size, size],
                                                      interpolation="BILINEAR", fill_mode="NEAREST", fill_value=0.0)
        else:
            shift = gen.uniform([n], -strength, strength) * size
            zeros, ones = tf.zeros([n]), tf.ones([n])
            transform = tf.stack([ones, zeros, shift, zeros, ones, zeros, zeros, zeros], axis=1)
            x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transform, output_shape=[size, size],
                                                      interpolation="BILINEAR", fill_mode="CONSTANT", fill_value=0.0)
        x = band(x, 2, int(size * 2 * strength))
        x = band(x, 1, int(size * 2 * strength))
        if "mixup" in variant:
            u = tf.random.stateless_gamma([n], seed=gen.uniform_full_int([2], tf.int32), alpha=0.2)
            v = tf.random.stateless_gamma([n], seed=gen.uniform_full_int([2], tf.int32), alpha=0.2)
            lam = u / (u + v + 1e-12)
            perm = tf.random.shuffle(tf.range(n))
            x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * tf.gather(x, perm)
            y = lam[:, None] * y + (1 - lam[:, None]) * tf.gather(y, perm)
        return x, y

    return apply


def fine_tune(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], variant: str, args,
              curve: bool, seed: int, tag: str) -> dict:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    size = args.size
    base = keras.applications.MobileNet(input_shape=(size, size, 3), alpha=0.25, include_top=False,
                                        weights="imagenet")
    inp = keras.Input((size, size, 3))
    h = keras.layers.Rescaling(1 / 127.5, -1.0)(inp)
    h = base(h, training=True)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(args.dropout)(h)
    out = keras.layers.Dense(10, activation="softmax")(h)
    model = keras.Model(inp, out)
    steps = int(np.ceil(len(train[0]) / args.batch)) * args.epochs
    lr = keras.optimizers.schedules.CosineDecay(args.lr, steps)

    x, y = train
    ds = tf.data.Dataset.from_tensor_slices((x, tf.one_hot(y, 10)))
    ds = ds.shuffle(len(x), seed=seed).batch(args.batch)
    ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), b))
    ds = ds.map(augmenter(size, variant, args.warp, seed, args.strength))
    ds = ds.prefetch(2)
    xt, yt = test
    accs: list[float] = []
    last: dict[str, np.ndarray] = {}

    class Curve(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if curve or epoch == args.epochs - 1:
                p = last["probs"] = self.model.predict(xt, batch_size=100, verbose=0)
                accs.append(round(float(np.mean(p.argmax(1) == yt)), 4))

    t = time.perf_counter()
    saved = trained_path(args, variant, seed, tag)
    if saved.exists():  # the same network was trained before: its weights, not a second training
        model.load_weights(saved)
        p = last["probs"] = model.predict(xt, batch_size=100, verbose=0)
        accs.append(round(float(np.mean(p.argmax(1) == yt)), 4))
        curve = False
    elif variant == "lpft":  # the head alone first (the flow's --head-epochs: Adam at the head rate, constant)
        base.trainable = False
        model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
        model.fit(ds, epochs=args.head_epochs, verbose=0)
        base.trainable = True
    if not saved.exists():
        model.compile(keras.optimizers.Adam(lr), "categorical_crossentropy", metrics=["accuracy"])
        model.fit(ds, epochs=args.epochs, verbose=0, callbacks=[Curve()])
        saved.parent.mkdir(parents=True, exist_ok=True)
        model.save_weights(saved)
    out = {"accuracy": accs[-1], "curve": accs if curve else None, "seconds": round(time.perf_counter() - t, 1),
           "train_images": int(len(x)), "probs": last["probs"]}
    if args.adapt_bn:  # AdaBN: every BatchNormalization's statistics re-estimated on the held-out voice, no label
        bns = [la for la in base.layers if isinstance(la, keras.layers.BatchNormalization)]
        for la in bns:
            la.momentum = 0.0  # the moving statistics become this one batch's: the whole held-out speaker
        model(tf.cast(xt, tf.float32), training=True)
        p = out["adapted_probs"] = model.predict(xt, batch_size=100, verbose=0)
        out["adapted_accuracy"] = round(float(np.mean(p.argmax(1) == yt)), 4)
        out["warp_probs"] = {}
        for f in args.tta_warps:  # the held-out voice's images warped by f, then AdaBN on them, then predicted
            xw = warped(xt, f)
            model(xw, training=True)
            out["warp_probs"][f] = model.predict(xw, batch_size=100, verbose=0)
        if args.self_train:
            out["model"] = model
    return out


def trained_path(args, variant: str, seed: int, tag: str) -> Path:
    """Where a trained network's weights are kept: the world (``tag``) and every setting that shapes the training
    are in the name."""
    key = (f"{tag}-{variant}-seed{seed}-size{args.size}-e{args.epochs}-b{args.batch}-lr{args.lr:g}"
           f"-d{args.dropout:g}-w{args.warp:g}-st{args.strength:g}-sp{'_'.join(f'{a:g}' for a in args.speeds)}"
           f"-{args.normalise}")
    return Path(args.cache) / "networks" / f"{key}.weights.h5"


def pseudo_labels(probs: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The most confident ``fraction`` of the images predicted as each class (at least one per class predicted):
    their indices and predicted classes. Class by class, so that no digit is drowned by the easy ones."""
    pred, conf = probs.argmax(1), probs.max(1)
    keep = []
    for c in np.unique(pred):
        idx = np.flatnonzero(pred == c)
        keep.extend(idx[np.argsort(-conf[idx])][:max(1, int(round(fraction * len(idx))))])
    keep = np.sort(np.array(keep))
    return keep, pred[keep]


def self_training(runs: list[dict], train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  mode: str, args, seed: int) -> dict:
    """Two-pass unsupervised adaptation to the held-out voice: the adapted ensemble's most confident predictions
    (``--self-fraction`` per predicted class) become labels; every network trains on them for ``--self-epochs``
    epochs (``group``: those images only; ``group+train``: with the training voices' recordings too, for
    ``--self-epochs`` / 3 epochs) with the masks and time shift (no mixup), Adam at ``--self-lr``; then AdaBN on the
    voice again and a new prediction. ``--self-rounds`` repeats it from the new ensemble's predictions, each round
    from the trained networks. No label of the held-out voice is used. The networks are put back afterwards."""
    import keras
    import tensorflow as tf

    xt, yt = test
    acc = lambda p: round(float(np.mean(p.argmax(1) == yt)), 4)  # noqa: E731
    start = [r["model"].get_weights() for r in runs]  # as trained, with the voice's AdaBN statistics
    probs = np.mean([r["adapted_probs"] for r in runs], axis=0)
    out: dict = {"rounds": []}
    t = time.perf_counter()
    for k in range(args.self_rounds):
        idx, labels = pseudo_labels(probs, args.self_fraction[min(k, len(args.self_fraction) - 1)])
        x, y = xt[idx], labels
        epochs = args.self_epochs
        if mode == "group+train":
            x, y = np.concatenate([x, train[0]]), np.concatenate([y, train[1]])
            epochs = max(1, args.self_epochs // 3)
        each = []
        for j, (r, w) in enumerate(zip(runs, start)):
            model = r["model"]
            model.set_weights(w)
            keras.utils.set_random_seed(seed + 1000 * (k + 1) + j)
            ds = tf.data.Dataset.from_tensor_slices((x, tf.one_hot(y, 10))).shuffle(len(x), seed=seed + j)
            ds = ds.batch(args.batch).map(lambda a, b: (tf.cast(a, tf.float32), b))
            ds = ds.map(augmenter(args.size, "base", args.warp, seed + 7919 * (k + 1) + j, args.strength))
            model.compile(keras.optimizers.Adam(args.self_lr), "categorical_crossentropy")
            model.fit(ds.prefetch(2), epochs=epochs, verbose=0)
            model(tf.cast(xt, tf.float32), training=True)  # AdaBN on the voice again (momentum 0)
            each.append(model.predict(xt, batch_size=100, verbose=0))
        probs = np.mean(each, axis=0)
        out["rounds"].append({"pseudo_labels": int(len(idx)), "pseudo_label_accuracy": round(float(np.mean(
            labels == yt[idx])), 4), "seed_accuracies": [acc(p) for p in each], "ensemble_accuracy": acc(probs)})
    for r, w in zip(runs, start):
        r["model"].set_weights(w)
    out["ensemble_accuracy"] = out["rounds"][-1]["ensemble_accuracy"]
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def warped(x: np.ndarray, factor: float):
    """Images with their rows scaled by ``factor`` about the bottom row (0 Hz): a vocal-tract-length warp."""
    import tensorflow as tf

    n, size = len(x), x.shape[1]
    bottom = float(size - 1)
    t = tf.constant([[1.0, 0.0, 0.0, 0.0, 1.0 / factor, bottom * (1.0 - 1.0 / factor), 0.0, 0.0]] * n, tf.float32)
    return tf.raw_ops.ImageProjectiveTransformV3(images=tf.cast(x, tf.float32), transforms=t, output_shape=[size, size],
                                                 interpolation="BILINEAR", fill_mode="NEAREST", fill_value=0.0)


def entropy(p: np.ndarray) -> float:
    return float(np.mean(-np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=1)))


def warp_choices(runs: list[dict], y: np.ndarray) -> dict:
    """From each network's probabilities at every warp factor (adapted): the factor of least mean entropy on
    the held-out voice (no label: a per-speaker VTLN by confidence), per network and for the ensemble, the
    accuracies there, and the average over all factors (test-time augmentation)."""
    factors = list(runs[0]["warp_probs"])
    acc = lambda p: round(float(np.mean(p.argmax(1) == y)), 4)  # noqa: E731
    each = []
    for run in runs:
        f = min(factors, key=lambda f: entropy(run["warp_probs"][f]))
        each.append({"factor": f, "accuracy": acc(run["warp_probs"][f])})
    ens = {f: np.mean([run["warp_probs"][f] for run in runs], axis=0) for f in factors}
    f = min(factors, key=lambda f: entropy(ens[f]))
    return {"vtln_seed_accuracies": [e["accuracy"] for e in each], "vtln_seed_factors": [e["factor"] for e in each],
            "vtln_ensemble_factor": f, "vtln_ensemble_accuracy": acc(ens[f]),
            "warp_ensemble_accuracies": {str(k): acc(v) for k, v in ens.items()},  # for reading, never for choosing
            "warp_ensemble_entropies": {str(k): round(entropy(v), 4) for k, v in ens.items()},
            "tta_ensemble_accuracy": acc(np.mean(list(ens.values()), axis=0))}


def world(arrays, speakers, variants, args, curve: bool, held_out=None) -> dict:
    """Each of ``held_out`` (default: every one of ``speakers``) held out in turn, the rest of ``speakers`` train."""
    out: dict = {}
    held_out = list(held_out or speakers)
    for held in held_out:
        train = [s for s in speakers if s != held]
        tx = np.concatenate([arrays[s]["x"] for s in train] + [arrays[s]["speed"][a] for s in train
                                                               for a in args.speeds])
        ty = np.concatenate([arrays[s]["y"] for s in train] * (1 + len(args.speeds)))
        for v in variants:
            runs = []
            for seed in range(args.seed, args.seed + args.seeds):
                r = fine_tune((tx, ty), (arrays[held]["x"], arrays[held]["y"]), v, args, curve, seed,
                              f"{held}-from-{'+'.join(train)}")
                adapted = f" adapted {r['adapted_accuracy']:.3f}" if args.adapt_bn else ""
                print(f"  {held:8s} {v:11s} seed {seed} {r['accuracy']:.3f}{adapted}  ({r['seconds']} s) "
                      f"{r['curve'] or ''}", file=sys.stderr)
                runs.append(r)
            r = {k: val for k, val in runs[0].items() if not k.endswith("probs") and k != "model"}
            for mode in args.self_train:
                st = r.setdefault("self_training", {})[mode] = self_training(
                    runs, (tx, ty), (arrays[held]["x"], arrays[held]["y"]), mode, args, args.seed)
                print(f"  {held:8s} {v:11s} self-training ({mode}): " + "; ".join(
                    f"round {i + 1}: {rd['pseudo_labels']} pseudo-labels ({rd['pseudo_label_accuracy']:.3f} right), "
                    f"networks {rd['seed_accuracies']}, ensemble {rd['ensemble_accuracy']:.3f}"
                    for i, rd in enumerate(st["rounds"])) + f"  ({st['seconds']} s)", file=sys.stderr)
            if args.tta_warps:
                r.update(warp_choices(runs, arrays[held]["y"]))
                print(f"  {held:8s} {v:11s} warp by least entropy: networks {r['vtln_seed_accuracies']} at "
                      f"{r['vtln_seed_factors']}, ensemble {r['vtln_ensemble_accuracy']:.3f} at "
                      f"{r['vtln_ensemble_factor']}; all factors averaged {r['tta_ensemble_accuracy']:.3f}",
                      file=sys.stderr)
            for pre in ("", "adapted_") if args.adapt_bn else ("",):
                if args.seeds > 1:  # the networks' probabilities averaged: an ensemble of the seeds
                    mean = np.mean([run[pre + "probs"] for run in runs], axis=0)
                    r[pre + "seed_accuracies"] = [run[pre + "accuracy"] for run in runs]
                    r[pre + "ensemble_accuracy"] = round(float(np.mean(mean.argmax(1) == arrays[held]["y"])), 4)
                    print(f"  {held:8s} {v:11s} {pre}ensemble of {args.seeds}: {r[pre + 'ensemble_accuracy']:.3f}",
                          file=sys.stderr)
            out.setdefault(v, {})[held] = r
    for v in variants:
        for pre in ("", "adapted_") if args.adapt_bn else ("",):
            out[v][pre + "mean"] = round(float(np.mean([out[v][h][pre + "accuracy"] for h in held_out])), 4)
            if args.seeds > 1 and not pre and args.tta_warps:
                for k in ("vtln_ensemble_accuracy", "tta_ensemble_accuracy"):
                    out[v]["mean_" + k] = round(float(np.mean([out[v][h][k] for h in held_out])), 4)
                out[v]["mean_vtln_of_seeds"] = round(float(np.mean([out[v][h]["vtln_seed_accuracies"]
                                                                    for h in held_out])), 4)
            if args.seeds > 1 and pre and args.self_train:
                for mode in args.self_train:
                    out[v]["mean_self_training_" + mode] = [round(float(np.mean(
                        [out[v][h]["self_training"][mode]["rounds"][k]["ensemble_accuracy"] for h in held_out])), 4)
                        for k in range(args.self_rounds)]
            if args.seeds > 1:
                out[v][pre + "mean_ensemble"] = round(float(np.mean([out[v][h][pre + "ensemble_accuracy"]
                                                                     for h in held_out])), 4)
                out[v][pre + "mean_of_seeds"] = round(float(np.mean([out[v][h][pre + "seed_accuracies"]
                                                                     for h in held_out])), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--warp", type=float, default=0.15)
    ap.add_argument("--head-epochs", type=int, default=5, help="variant lpft: epochs of the head alone first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="networks per run, seeds --seed, --seed + 1, ...; with "
                                                         "more than one, their averaged probabilities are scored too")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--normalise", choices=("none", "speaker"), default="none",
                    help="speaker: per-speaker mean normalisation of every mel band before drawing")
    ap.add_argument("--adapt-bn", action="store_true",
                    help="also score each network after AdaBN: BatchNormalization statistics re-estimated on the "
                         "held-out speaker's images (no label)")
    ap.add_argument("--strength", type=float, default=0.1,
                    help="the masks' and time shift's strength, as the flow's --augment-strength (default 0.1)")
    ap.add_argument("--speeds", type=lambda t: [float(f) for f in t.split(",")] if t else [], default=[],
                    help="speed factors (e.g. 0.9,1.1): the training voices' recordings also played at each, as more "
                         "training images (give --epochs over the larger set: 10 with two factors keeps the steps)")
    ap.add_argument("--tta-warps", type=lambda t: [float(f) for f in t.split(",")] if t else [], default=[],
                    help="with --adapt-bn: factors (e.g. 0.88,0.94,1,1.06,1.12) the held-out voice's images are also "
                         "warped by (rows about 0 Hz), each adapted and predicted; the factor of least entropy is "
                         "chosen per network and per ensemble (no label), and all are averaged")
    ap.add_argument("--self-train", type=lambda t: t.split(",") if t else [], default=[],
                    help="with --adapt-bn and --seeds > 1: self-training on the held-out voice's pseudo-labels, modes "
                         "group (its images only) and/or group+train (with the training voices')")
    ap.add_argument("--self-fraction", type=lambda t: [float(f) for f in t.split(",")], default=[0.5],
                    help="the most confident fraction of each predicted class kept as pseudo-labels, per round")
    ap.add_argument("--self-epochs", type=int, default=10)
    ap.add_argument("--self-lr", type=float, default=1e-4)
    ap.add_argument("--self-rounds", type=int, default=1)
    ap.add_argument("--final-speakers", default=",".join(SPEAKERS), help="held-out speakers of the final world")
    ap.add_argument("--no-develop", action="store_true")
    ap.add_argument("--final", default="", help="variant for the final world (default: the development's choice)")
    ap.add_argument("--no-final", action="store_true", help="the development world only")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "audio-finetune"))
    args = ap.parse_args()
    if args.tta_warps and not args.adapt_bn:
        ap.error("--tta-warps needs --adapt-bn")
    if args.self_train and (not args.adapt_bn or args.seeds < 2 or set(args.self_train) - {"group", "group+train"}):
        ap.error("--self-train takes group and/or group+train, with --adapt-bn and --seeds 2 or more")
    found = shared_inputs("fsdd")
    if found is None:
        return 0
    data, _ = found
    t0 = time.perf_counter()
    arrays = images(data, args.size, Path(args.cache), args.normalise)
    if args.speeds:
        if args.normalise != "none":
            ap.error("--speeds draws the copies without normalisation; leave --normalise out")
        copies = speed_copies(data, args.size, Path(args.cache), args.speeds)
        for sp in SPEAKERS:
            arrays[sp]["speed"] = copies[sp]
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "cache")},
                     "recipe": RECIPE, "machine": {"platform": platform.machine(), "cpus": os.cpu_count()}}
    variants = args.variants.split(",")
    chosen = args.final or None
    if not args.no_develop:
        dev = world(arrays, DEV_WORLD, variants, args, curve=True)
        results["development"] = dev
        chosen = chosen or max(variants, key=lambda v: dev[v]["mean"])
        print(f"development chose {chosen}", file=sys.stderr)
    results["chosen"] = chosen
    finals = ["base"] + ([chosen] if chosen and chosen != "base" else [])
    if not args.no_final:
        results["final"] = world(arrays, SPEAKERS, finals, args, curve=False, held_out=args.final_speakers.split(","))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
