"""Spoken digits through an image CNN, judged on speakers it never heard, beside the classic MFCC baseline.

For each held-out speaker of ``../shared/data/fsdd`` (2,000 recordings, 10 digits, 4 speakers), writes a
CSV ``path,label,split,group`` whose ``split`` puts that speaker's 500 recordings in test and the other
three speakers' 1,500 in train (``group`` is the speaker), then:

* runs ``cnncodes transfer CSV --backbone mobilenet --backbone-arg alpha=0.25 --weights imagenet`` plus the
  spectrogram options given after ``--`` (ImageNet weights offline from ``../shared/keras``), and keeps the
  case, the layer and pooling the flow chose, its layer/pooling scores and the champion's test accuracy.
  Every selection step of the flow (layer sweep, C search) sees the training speakers only;
* measures the baseline on the same split: 20 MFCCs (``tf.signal.mfccs_from_log_mel_spectrograms`` of a
  40-band log-mel spectrogram, 25 ms windows, 10 ms hop), their mean and standard deviation over time
  (40 values per recording), ``StandardScaler`` + ``LogisticRegression`` (C = 1, not tuned).

When the fine-tuned model is an ensemble (``--ensemble N``), each of its networks is also scored on its own
(``network_accuracies``: ``each``, and ``first_k``, the ensembles of the first k networks), on the same
spectrograms.

With ``--without SPEAKER`` that speaker's recordings are never loaded (a development world for choosing
settings). With ``--finetune VAL:TEST``: one run with fine-tuning forced (``--case 3``), speaker VAL as the val split
(early stopping, checkpoint choice) and TEST held out, added to the results file as ``fine_tuned``.

Usage:
    PYTHONPATH=. python benchmarks/audio_shared.py --json benchmarks/results/audio-fsdd.json -- --sample-rate 8000
    PYTHONPATH=. python benchmarks/audio_shared.py --json benchmarks/results/audio-fsdd.json --finetune lucas:nicolas \
        -- --sample-rate 8000
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from report import emit, save  # noqa: E402  benchmarks/ is the script's folder

SHARED = ROOT.parent / "shared"
SPEAKERS = ("george", "jackson", "lucas", "nicolas")
DEV_WORLD = ("george", "jackson", "lucas")  # the experiments' development world: nicolas stays free of choices
# the spectrogram recipe of the commands' options, for the experiments that draw images themselves
RECIPE = {"sample_rate": 8000, "n_mels": 32, "trim_db": 30, "duration": None, "top_db": 60, "colormap": "viridis"}
TRANSFER = ["transfer", "--backbone", "mobilenet", "--backbone-arg", "alpha=0.25", "--weights", "imagenet"]


def shared_inputs(dataset: str) -> tuple[Path, Path] | None:
    """``../shared/data/DATASET`` and ``../shared/keras`` (made this process's ``KERAS_HOME`` unless one is
    set, so that ImageNet weights load offline), or None (said on stderr) when either is missing."""
    data, keras_home = SHARED / "data" / dataset, SHARED / "keras"
    if not data.is_dir() or not (keras_home / "models").is_dir():
        print(f"needs {data} and {keras_home}/models (../shared)", file=sys.stderr)
        return None
    os.environ.setdefault("KERAS_HOME", str(keras_home))
    return data, keras_home


def recordings(data: Path) -> list[tuple[str, str, str]]:
    """(path relative to data, digit, speaker) of every recording."""
    out = []
    for f in sorted(data.glob("*/*.wav")):
        out.append((f.relative_to(data).as_posix(), f.parent.name, f.name.split("_")[1]))
    return out


def write_csv(data: Path, rows: list[tuple[str, str, str]], held_out: str, dest: Path, val: str | None = None
              ) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "group"])
        for rel, digit, speaker in rows:
            split = "test" if speaker == held_out else "val" if speaker == val else "train"
            w.writerow([str(data / rel), digit, split, speaker])
    return dest


def finetune_run(data: Path, keras_home: Path, val: str, test: str, extra: list[str], path: str | None) -> int:
    """Fine-tuning forced (case 3) with ``val`` as the val speaker (early stopping, checkpoint) and ``test`` held
    out; the probe and the fine-tuned model then train on the two other speakers. Merged into ``path``."""
    rows = recordings(data)
    with tempfile.TemporaryDirectory(prefix="cnncodes-audio-ft-") as tmp:
        csv_path = write_csv(data, rows, test, Path(tmp) / f"fsdd-val-{val}-test-{test}.csv", val=val)
        r, seconds = run_transfer(csv_path, str(Path(tmp) / "out"), keras_home, [*extra, "--case", "3"])
    g = r["gate"]
    out = {"val_speaker": val, "test_speaker": test, "seconds": round(seconds, 1), "promoted": g["promoted"],
           "accuracies": g["accuracies"], "gate_split": g["split"], "probe_layer": r["decision"]["probe_layer"],
           "probe_pooling": r["decision"].get("probe_pooling"),
           "command": " ".join(["cnncodes", TRANSFER[0], f"fsdd-val-{val}-test-{test}.csv", *TRANSFER[1:], *extra,
                                "--case", "3"])}
    results = json.loads(Path(path).read_text()) if path and Path(path).exists() else {}
    results["fine_tuned"] = out
    emit(results, path)
    return 0


def run_transfer(csv_path: Path, out: str, keras_home: Path, extra: list[str]) -> tuple[dict, float]:
    env = dict(os.environ, KERAS_HOME=str(keras_home), CNNCODES_PROGRESS="0", PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cnncodes.cli", *TRANSFER[:1], str(csv_path), *TRANSFER[1:],
                           "--out", out, "--json", *extra], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def network_accuracies(r: dict, data: Path, rows: list[tuple[str, str, str]], held: str) -> dict | None:
    """Each network's own accuracy on the held-out speaker when the fine-tuned model of transfer's result ``r``
    is an ensemble (``--ensemble N``): the registered model's nested ``network_K`` outputs, on the same
    spectrograms (``each``), and the accuracy of the ensemble of the first k of them (``first_k``); None
    without one."""
    if not r.get("finetuned"):
        return None
    from storage import ModelRegistry
    from tasks.backbones import BackboneSpec
    from tasks.data.inputs import input_loader
    from tasks.finetune import load_finetuned

    path, record = ModelRegistry(r["registry"]).load(r["finetuned"]["name"], r["finetuned"]["version"])
    model = load_finetuned(path)
    nets = [layer for layer in model.layers if layer.name.startswith("network_")]
    if not nets:
        return None
    meta = record.metadata
    load = input_loader("audio", int(meta["input_size"]), meta.get("resize") or "stretch",
                        spectrogram=BackboneSpec.model_validate(meta["spec"]).spectrogram)
    test = [(rel, digit) for rel, digit, speaker in rows if speaker == held]
    x = np.stack([load(str(data / rel)) for rel, _ in test]).astype(np.float32)
    y = np.array([list(meta["class_names"]).index(digit) for _, digit in test])
    x = np.asarray(model.get_layer("preprocess")(x))  # the networks share the model's preprocessing layer
    probs = [n.predict(x, batch_size=100, verbose=0) for n in nets]
    out = {"each": [round(float(np.mean(np.argmax(p, 1) == y)), 4) for p in probs],
           # the ensemble of the first k networks, k = 1 .. N (the last is the registered model)
           "first_k": [round(float(np.mean(np.argmax(np.mean(probs[:k], axis=0), 1) == y)), 4)
                       for k in range(1, len(probs) + 1)]}
    if meta["config"].get("adapt_batchnorm"):  # the same, each network adapted to the held-out speaker (AdaBN)
        from tasks.finetune.adapt import predict_adapted

        probs = [predict_adapted(n, x, [held] * len(x), batch_size=100)[0] for n in nets]
        out["each_adapted"] = [round(float(np.mean(np.argmax(p, 1) == y)), 4) for p in probs]
        out["first_k_adapted"] = [round(float(np.mean(np.argmax(np.mean(probs[:k], axis=0), 1) == y)), 4)
                                  for k in range(1, len(probs) + 1)]
    return out


def mfcc_features(paths: list[str], sample_rate: int = 8000) -> np.ndarray:
    """20 MFCCs per 25 ms window (10 ms hop) of a 40-band log-mel spectrogram; mean and std over time."""
    import tensorflow as tf

    from tasks.data.audio import load_audio

    frame, hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
    fft = 1 << (frame - 1).bit_length()
    mel = tf.signal.linear_to_mel_weight_matrix(40, fft // 2 + 1, sample_rate, 20.0, sample_rate / 2)
    feats = []
    for p in paths:
        wave = load_audio(p, sample_rate)
        if len(wave) < frame:
            wave = np.pad(wave, (0, frame - len(wave)))
        power = tf.abs(tf.signal.stft(wave, frame, hop, fft)) ** 2
        log_mel = tf.math.log(tf.matmul(power, mel) + 1e-6)
        mfcc = tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[:, :20].numpy()
        feats.append(np.concatenate([mfcc.mean(axis=0), mfcc.std(axis=0)]))
    return np.stack(feats)


def mfcc_baseline(data: Path, rows: list[tuple[str, str, str]]) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = mfcc_features([str(data / r) for r, _, _ in rows])
    y = np.array([int(d) for _, d, _ in rows])
    spk = np.array([s for _, _, s in rows])
    out = {}
    for held in sorted(set(spk), key=SPEAKERS.index):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        clf.fit(X[spk != held], y[spk != held])
        out[held] = float(clf.score(X[spk == held], y[spk == held]))
    return out


def summary(runs: dict, baseline: dict, extra: list[str], without: str) -> dict:
    tests = [v["accuracy"]["test"] for v in runs.values()]
    return {
        "dataset": "fsdd", "command": " ".join(["cnncodes", TRANSFER[0], "fsdd-test-SPEAKER.csv", *TRANSFER[1:],
                                                  *extra]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU",
        "runs": runs, "mfcc": baseline, "without": without or None,
        "mean_test": float(np.mean(tests)), "min_test": float(np.min(tests)),
        "mean_mfcc": float(np.mean([baseline[s] for s in runs])),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--speakers", default=",".join(SPEAKERS), help="held-out speakers, one run each")
    ap.add_argument("--finetune", default=None, metavar="VAL:TEST",
                    help="instead: one run with fine-tuning forced (case 3), speaker VAL as val and TEST held out; "
                         "added to the --json file as 'fine_tuned'")
    ap.add_argument("--without", default="", metavar="SPEAKER",
                    help="leave this speaker's recordings out entirely (a development world: choose settings "
                         "without ever loading the speaker whose row must stay free of choices)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more cnncodes transfer options")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    found = shared_inputs("fsdd")
    if found is None:
        return 1
    data, keras_home = found
    if args.finetune:
        val, test = args.finetune.split(":")
        return finetune_run(data, keras_home, val, test, extra, args.json)
    rows = [r for r in recordings(data) if r[2] != args.without]
    baseline = mfcc_baseline(data, rows)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="cnncodes-audio-") as tmp:
        for held in [s for s in args.speakers.split(",") if s]:
            csv_path = write_csv(data, rows, held, Path(tmp) / f"fsdd-test-{held}.csv")
            r, seconds = run_transfer(csv_path, str(Path(tmp) / "out"), keras_home, extra)
            d = r["decision"]
            runs[held] = {
                "case": r["case"], "probe_layer": d["probe_layer"], "probe_pooling": d.get("probe_pooling"),
                "scores": {f"{row['layer']}/{row['pooling']}": row["mean"] for row in d["similarity"]["scores"]},
                "champion": r["champion"]["name"],
                "accuracy": {split: m["accuracy"] for split, m in r["champion"]["metrics"].items()},
                "images": {split: m["images"] for split, m in r["champion"]["metrics"].items()},
                "mfcc_accuracy": baseline[held], "seconds": round(seconds, 1),
                # both models' accuracies per split and which one the gate promoted (cases 3 and 4)
                "promoted": r["gate"]["promoted"], "accuracies": r["gate"]["accuracies"],
                # an ensemble's networks, each on its own (on the same test spectrograms)
                "network_accuracies": network_accuracies(r, data, rows, held),
                # --adapt-batchnorm: the fine-tuned model's test accuracy with the trained statistics beside
                "adaptation": ((r.get("finetuned") or {}).get("metrics") or {}).get("test", {}).get("adaptation")}
            print(f"held out {held}: transfer {runs[held]['accuracy'].get('test')}, mfcc {baseline[held]:.3f}",
                  file=sys.stderr)
            save(summary(runs, baseline, extra, args.without), args.json)  # the speakers so far, if stopped
    results = summary(runs, baseline, extra, args.without)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
