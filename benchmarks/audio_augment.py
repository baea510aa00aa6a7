"""Speaker augmentation for spoken digits: do augmented copies of the training voices close the held-out-speaker gap?

An experiment for issue 17, outside the flow (nothing in the product changes). On ``../shared/data/fsdd``
(2,000 recordings, 10 digits, 4 speakers, 8 kHz) each speaker is held out in turn, as in
``benchmarks/audio_shared.py``, with the product's spectrogram recipe (``--sample-rate 8000 --n-mels 32
--trim-db 30 --duration none --top-db 60 --colormap viridis``, 224 px) and the product's backbone and extractor
(``BackboneSpec(name="mobilenet", weights="imagenet", backbone_args={"alpha": 0.25})``, ``build_backbone``,
``Extractor``; ImageNet weights offline from ``../shared/keras``). Images come from ``tasks.data.audio``
(``load_audio``, ``spectrogram_image``, which trims and stretches each recording to the image width).

Codes: the flow's candidate layers for this backbone, the ReLU outputs ``conv_pw_5_relu``, ``conv_pw_11_relu``,
``conv_pw_13_relu``, each pooled ``avg`` (over the whole map) and ``time-avg`` (over the width, the time axis,
keeping frequency rows): 6 candidate cuts.

The probe and its selection, the same for every row (all of it sees the training speakers only):
``StandardScaler`` + ``LogisticRegression`` (the flow's ``softmax`` probe); folds leave one training speaker
out (validation: that speaker's original recordings; training: the other training speakers' recordings plus,
when augmenting, their own augmented copies, never the validation speaker's). As the flow does, the cut is
chosen first, at C = 0.1 (the flow's sweep probe), by mean balanced accuracy over the folds; then C among
``C_GRID`` on that cut (ties: the smaller C). The final model fits all training speakers (plus their
augmented copies when augmenting) and is scored on the held-out speaker's original recordings, never
augmented.

Augmentations (training speakers only):

* ``speed:A,B,..``: each recording played at speed factor ``a``: ``scipy.signal.resample_poly`` by ``1/a``,
  kept at the original rate, so every frequency is scaled by ``a`` (a vocal-tract-length change and a pitch
  change together); the recipe stretches the trimmed recording to the image width, so the duration change
  is normalised away;
* ``warp:A,B,..``: the power spectrum's frequency axis scaled by ``a`` (linear interpolation between FFT
  bins) before the mel filterbank: the same frequency scaling without touching time;
* ``+centre``: not an augmentation of its own: each speaker's codes (and each augmented copy's codes, per
  speed factor) have their mean subtracted before the probe, the held-out speaker's included (its unlabelled
  recordings: transductive, it needs the speaker of every test recording).

Protocol, in one run:

1. **Development** (skipped with ``--no-develop``; nicolas never loaded): a three-speaker world of george, jackson, lucas;
   each held out in turn, the probe trained on the two others (two folds). The main augmentation and every
   variant of ``--variants`` are scored there (no augmentation too, for reference, not a candidate), and the
   one with the best mean held-out accuracy is chosen.
2. **Final**, all four speakers (nicolas loaded only now): without augmentation, with the main augmentation
   (``--augment``, fixed before any result was seen: ``speed:0.85,0.92,1.08,1.15``), and with the variant
   chosen in step 1 (when it differs from the main one). Rows without augmentation and with the main
   augmentation are free of choices for every speaker; the chosen variant's row is free of choices for
   nicolas only.

Ablations (``--ablations``, default ``none+centre``: speaker centring without augmentation) are scored in
both worlds beside the rest, to tell the parts of a variant apart; they are reported, never chosen. (The
centring-only ablation was added after the development scores were seen, to explain them.)

Codes are cached per (speaker, version) in ``--cache`` (a reused cache skips extraction).

Usage:
    PYTHONPATH=. python benchmarks/audio_augment.py --json benchmarks/results/audio-augment.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from audio_shared import DEV_WORLD, RECIPE, SPEAKERS, recordings as all_recordings, shared_inputs  # noqa: E402  the same dataset's listing
from report import emit  # noqa: E402  benchmarks/ is the script's folder

SIZE = 224
LAYERS = ("conv_pw_5_relu", "conv_pw_11_relu", "conv_pw_13_relu")  # the flow's candidates for this backbone
POOLINGS = ("avg", "time-avg")
CUTS = [(layer, pooling) for layer in LAYERS for pooling in POOLINGS]
SWEEP_C = 0.1
C_GRID = (0.01, 0.1, 1.0)
MAIN = "speed:0.85,0.92,1.08,1.15"
ABLATIONS = ("none+centre",)
VARIANTS = ("warp:0.85,0.92,1.08,1.15", "speed:0.85,0.92,1.08,1.15+centre")


# --------------------------------------------------------------------------- augmentation settings
def parse(setting: str) -> tuple[str, list[float], bool]:
    """``"speed:0.85,1.15+centre"`` -> ("speed", [0.85, 1.15], True); ``"none"`` -> ("none", [], False)."""
    centre = setting.endswith("+centre")
    body = setting[: -len("+centre")] if centre else setting
    if body == "none":
        return "none", [], centre
    kind, _, factors = body.partition(":")
    if kind not in ("speed", "warp"):
        raise SystemExit(f"unknown augmentation {setting!r}: speed:A,B,.. or warp:A,B,.. (optionally +centre)")
    return kind, [float(a) for a in factors.split(",")], centre


def label(setting: str) -> str:
    """A short key for results paths: 'speed4', 'warp4', 'speed4_centre', 'none', 'none_centre'."""
    kind, factors, centre = parse(setting)
    return (kind if kind == "none" else f"{kind}{len(factors)}") + ("_centre" if centre else "")


def versions(setting: str) -> list[str]:
    kind, factors, _ = parse(setting)
    return [f"{kind}{a:g}" for a in factors]


# --------------------------------------------------------------------------- images and codes
def recordings(data: Path, speaker: str) -> list[tuple[Path, int]]:
    """(file, digit) of one speaker's recordings (the speaker is the 2nd field of the file name)."""
    return [(data / rel, int(digit)) for rel, digit, who in all_recordings(data) if who == speaker]


def image(wave: np.ndarray, recipe, version: str) -> np.ndarray:
    """The (224, 224, 3) uint8 image of ``wave`` under ``version``: 'orig', 'speedA' or 'warpA'."""
    from scipy.signal import resample_poly

    from tasks.data.audio import fit_duration, mel_matrix, power_spectrogram, spectrogram_image, to_image

    if version == "orig":
        return spectrogram_image(wave, recipe, SIZE)
    if version.startswith("speed"):
        ratio = Fraction(1.0 / float(version[5:])).limit_denominator(100)  # n samples -> n / a samples
        return spectrogram_image(resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32),
                                 recipe, SIZE)
    a = float(version[4:])  # warp: what was at f Hz moves to a * f Hz
    power = power_spectrogram(fit_duration(np.asarray(wave, np.float32), recipe), recipe)
    k = np.arange(power.shape[1], dtype=np.float64)
    warped = np.stack([np.interp(k / a, k, row, right=0.0) for row in power]).astype(np.float32)
    bands = warped @ mel_matrix(recipe.n_mels, power.shape[1], recipe.sample_rate, float(recipe.fmin),
                                float(recipe.top_hz))
    return to_image(bands.T, recipe, SIZE)


class Codes:
    """CNN codes per (speaker, version), extracted once and cached on disk."""

    def __init__(self, data: Path, cache: Path):
        self.data, self.cache = data, cache
        self.memory: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.extractor = None
        self.timings: dict[str, float] = {}
        self.loaded_speakers: list[str] = []

    def _extractor(self):
        if self.extractor is None:
            from tasks.backbones import BackboneSpec, Extractor, build_backbone

            t = time.perf_counter()
            spec = BackboneSpec(name="mobilenet", weights="imagenet", backbone_args={"alpha": 0.25},
                                precision="float32")
            self.extractor = Extractor(build_backbone(spec), CUTS)
            self.timings["build_backbone_s"] = round(time.perf_counter() - t, 1)
        return self.extractor

    def get(self, speaker: str, version: str) -> dict[str, np.ndarray]:
        key = (speaker, version)
        if key in self.memory:
            return self.memory[key]
        path = self.cache / f"{speaker}-{version}.npz"
        if path.exists():
            with np.load(path) as z:
                out = {k: z[k] for k in z.files}
        else:
            out = self._extract(speaker, version)
            self.cache.mkdir(parents=True, exist_ok=True)
            np.savez(path, **out)
        if speaker not in self.loaded_speakers:
            self.loaded_speakers.append(speaker)
        self.memory[key] = out
        return out

    def _extract(self, speaker: str, version: str) -> dict[str, np.ndarray]:
        from tasks.data.audio import Spectrogram, load_audio

        recipe = Spectrogram(**RECIPE)
        rows = recordings(self.data, speaker)
        ex = self._extractor()
        t = time.perf_counter()
        imgs = np.stack([image(load_audio(f, recipe.sample_rate), recipe, version) for f, _ in rows])
        t_img = time.perf_counter() - t
        t = time.perf_counter()
        parts = [ex(imgs[i:i + 100]) for i in range(0, len(imgs), 100)]
        t_cnn = time.perf_counter() - t
        self.timings["images_s"] = round(self.timings.get("images_s", 0.0) + t_img, 1)
        self.timings["cnn_s"] = round(self.timings.get("cnn_s", 0.0) + t_cnn, 1)
        self.timings["images_extracted"] = self.timings.get("images_extracted", 0) + len(imgs)
        print(f"  codes {speaker}/{version}: {len(imgs)} images, render {t_img:.1f} s, cnn {t_cnn:.1f} s",
              file=sys.stderr)
        out = {f"{layer}/{pooling}": np.concatenate([p[j] for p in parts]).astype(np.float32)
               for j, (layer, pooling) in enumerate(CUTS)}
        out["y"] = np.array([d for _, d in rows])
        return out


# --------------------------------------------------------------------------- probe and selection
def fit_score(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, C: float) -> tuple[float, float]:
    """Balanced accuracy and accuracy on (Xte, yte) of StandardScaler + LogisticRegression(C) fit on (Xtr, ytr)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, random_state=0))
    clf.fit(Xtr, ytr)
    pred = clf.predict(Xte)
    return float(balanced_accuracy_score(yte, pred)), float(np.mean(pred == yte))


def block(codes: Codes, speaker: str, version: str, cut: str, centre: bool) -> tuple[np.ndarray, np.ndarray]:
    c = codes.get(speaker, version)
    X = c[cut]
    if centre:
        X = X - X.mean(axis=0, keepdims=True)
    return X, c["y"]


def stack(codes: Codes, speakers: list[str], augmented: list[str], cut: str, centre: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """Original recordings of ``speakers`` plus their copies of every augmented version."""
    parts = [block(codes, s, v, cut, centre) for s in speakers for v in ["orig", *augmented]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def run_one(codes: Codes, held: str, train: list[str], setting: str) -> dict:
    """Selection by leave-one-training-speaker-out CV, final fit, score on ``held``'s original recordings."""
    t = time.perf_counter()
    _, _, centre = parse(setting)
    aug = versions(setting)

    def cv(cut: str, C: float) -> float:
        scores = []
        for val in train:
            rest = [s for s in train if s != val]
            Xtr, ytr = stack(codes, rest, aug, cut, centre)
            Xva, yva = block(codes, val, "orig", cut, centre)
            scores.append(fit_score(Xtr, ytr, Xva, yva, C)[0])
        return float(np.mean(scores))

    sweep = {f"{layer}/{pooling}": cv(f"{layer}/{pooling}", SWEEP_C) for layer, pooling in CUTS}
    best = max(sweep, key=lambda k: sweep[k])  # first of equals: the order of CUTS
    c_scores = {SWEEP_C: sweep[best]}
    for C in C_GRID:
        if C not in c_scores:
            c_scores[C] = cv(best, C)
    best_c = max(sorted(c_scores), key=lambda c: round(c_scores[c], 6))  # ties: the smaller C
    Xtr, ytr = stack(codes, train, aug, best, centre)
    Xte, yte = block(codes, held, "orig", best, centre)
    _, acc = fit_score(Xtr, ytr, Xte, yte, best_c)
    layer, pooling = best.split("/")
    out = {"test_accuracy": acc, "layer": layer, "pooling": pooling, "C": best_c,
           "cv_sweep": {k: round(v, 4) for k, v in sweep.items()},
           "cv_C": {f"{c:g}": round(v, 4) for c, v in sorted(c_scores.items())},
           "train_rows": int(len(ytr)), "test_rows": int(len(yte)), "seconds": round(time.perf_counter() - t, 1)}
    print(f"  held out {held} [{setting}]: {best} C={best_c:g} -> test {acc:.3f} ({out['seconds']} s)",
          file=sys.stderr)
    return out


def world(codes: Codes, speakers: list[str], setting: str) -> dict:
    runs = {h: run_one(codes, h, [s for s in speakers if s != h], setting) for h in speakers}
    accs = [r["test_accuracy"] for r in runs.values()]
    return {"setting": setting, "runs": runs, "mean": float(np.mean(accs)), "min": float(np.min(accs))}


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--augment", default=MAIN, help="the main augmentation, fixed in advance (default %(default)s)")
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help="';'-separated variants scored in the development world (default %(default)s)")
    ap.add_argument("--no-develop", action="store_true", help="skip the development step (no variant)")
    ap.add_argument("--cache", default="/tmp/cnncodes-augment-cache", help="codes cache folder")
    ap.add_argument("--ablations", default=";".join(ABLATIONS),
                    help="';'-separated settings scored in both worlds for comparison only, never chosen "
                         "(default %(default)s)")
    args = ap.parse_args()
    found = shared_inputs("fsdd")
    if found is None:
        return 1
    data, _ = found
    t0 = time.perf_counter()
    codes = Codes(data, Path(args.cache))
    timings: dict[str, float] = {}
    main_kind, main_factors, _ = parse(args.augment)
    results = {
        "dataset": "fsdd",
        "command": "PYTHONPATH=. python benchmarks/audio_augment.py --json benchmarks/results/audio-augment.json",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU",
        "backbone": "mobilenet alpha=0.25, ImageNet weights, float32, input 224",
        "recipe": "--sample-rate 8000 --n-mels 32 --trim-db 30 --duration none --top-db 60 --colormap viridis",
        "cuts": [f"{layer}/{pooling}" for layer, pooling in CUTS], "sweep_C": SWEEP_C, "c_grid": list(C_GRID),
        "probe": "StandardScaler + LogisticRegression; cut at C=0.1 then C, by leave-one-training-speaker-out "
                 "balanced accuracy",
        "augmentation": {"main": args.augment, "main_label": label(args.augment), "main_kind": main_kind,
                         "main_factors": main_factors,
                         "copies_per_recording": len(main_factors)},
        "complete": False,
    }

    def save() -> None:  # after every stage: a stopped run leaves what it measured
        timings.update(codes.timings)
        results["timings"] = {**timings, "total_s": round(time.perf_counter() - t0, 1)}
        emit(results, args.json) if results["complete"] else (
            Path(args.json).write_text(json.dumps(results, indent=1, default=float)) if args.json else None)

    chosen = args.augment
    if not args.no_develop:
        t = time.perf_counter()
        candidates = [args.augment, *[v for v in args.variants.split(";") if v and v != args.augment]]
        print(f"development world {DEV_WORLD} (nicolas not loaded): {candidates}", file=sys.stderr)
        ablations = [v for v in args.ablations.split(";") if v]
        scored = {v: world(codes, list(DEV_WORLD), v) for v in dict.fromkeys(["none", *candidates, *ablations])}
        assert "nicolas" not in codes.loaded_speakers
        chosen = max(candidates, key=lambda v: round(scored[v]["mean"], 6))  # first of equals: the main one
        results["development"] = {
            "world": list(DEV_WORLD), "speakers_loaded": list(codes.loaded_speakers),
            "rule": "highest mean held-out accuracy in the three-speaker world (two training speakers, two folds) "
                    "among the main augmentation and the variants; ties: the main augmentation",
            "candidates": {label(v): v for v in candidates}, "references": ["none", *map(label, ablations)],
            "variants": {label(v): {"setting": v, "mean": s["mean"], "min": s["min"],
                             "test_accuracy": {h: r["test_accuracy"] for h, r in s["runs"].items()},
                             "runs": s["runs"]} for v, s in scored.items()},
            "chosen": label(chosen), "chosen_setting": chosen}
        timings["development_s"] = round(time.perf_counter() - t, 1)
        save()
    results["augmentation"].update({"variant": chosen, "variant_label": label(chosen),
                                    "variant_is_main": chosen == args.augment})

    print("final: all four speakers", file=sys.stderr)
    stages = [("none", "none"), ("main", args.augment)] + ([("variant", chosen)] if chosen != args.augment else [])
    final: dict[str, dict] = {}
    for name, setting in stages:
        t = time.perf_counter()
        final[name] = world(codes, list(SPEAKERS), setting)
        timings[f"final_{name}_s"] = round(time.perf_counter() - t, 1)
        variant = final.get("variant", final["main"]) if "main" in final else None
        runs = {}
        for s in SPEAKERS:
            row = {"without_augmentation": final["none"]["runs"][s]["test_accuracy"],
                   "without": final["none"]["runs"][s]}
            if "main" in final:
                row.update({"with_augmentation": final["main"]["runs"][s]["test_accuracy"],
                            "gain": final["main"]["runs"][s]["test_accuracy"] - row["without_augmentation"],
                            "with": final["main"]["runs"][s]})
            if variant is not None and name != "main" or chosen == args.augment and variant is not None:
                row.update({"with_variant": variant["runs"][s]["test_accuracy"], "variant": variant["runs"][s]})
            runs[s] = row
        results["runs"] = runs
        results.update({"mean_without": final["none"]["mean"], "min_without": final["none"]["min"]})
        if "main" in final:
            results.update({"mean_with": final["main"]["mean"], "min_with": final["main"]["min"],
                            "mean_gain": final["main"]["mean"] - final["none"]["mean"],
                            "target": 0.85, "reaches_target_with": bool(final["main"]["min"] >= 0.85)})
        if variant is not None and (name == "variant" or chosen == args.augment):
            results.update({"mean_variant": variant["mean"], "min_variant": variant["min"],
                            "reaches_target_variant": bool(variant["min"] >= 0.85)})
        results["free_of_choices"] = {"without_augmentation": list(SPEAKERS), "with_augmentation": list(SPEAKERS),
                                      "with_variant": ["nicolas"] if "development" in results and
                                      chosen != args.augment else list(SPEAKERS)}
        results["complete"] = name == stages[-1][0] and not args.ablations
        save()
    results["ablations"] = {}
    for setting in [v for v in args.ablations.split(";") if v]:
        t = time.perf_counter()
        w = world(codes, list(SPEAKERS), setting)
        dev = results.get("development", {}).get("variants", {}).get(label(setting))
        results["ablations"][label(setting)] = {
            "setting": setting, "test_accuracy": {h: r["test_accuracy"] for h, r in w["runs"].items()},
            "mean": w["mean"], "min": w["min"], "runs": w["runs"],
            "development": None if dev is None else {k: dev[k] for k in ("mean", "min", "test_accuracy")}}
        timings[f"ablation_{label(setting)}_s"] = round(time.perf_counter() - t, 1)
        save()
    results["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
