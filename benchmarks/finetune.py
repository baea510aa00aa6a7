"""Fine-tuning throughput: the cnncodes flow's training loop next to a plain ``model.fit``, one run.

Same network (``tasks.finetune.build_network``: MobileNetV2 at 224 px, new head), same images
(generated JPEGs, photo-sized), same optimizer, batch size and epochs. Images/s are counted over
the training images of epochs 2..N (epoch 1 holds graph compilation), median epoch time over the
repeats (each side run ``--repeats`` times, alternating); the overhead of each repeat is kept too, so
its spread shows, and so is the number of slow epochs of each side (epochs 2..N over 1.5 times their
run's median). Both sides are timed by the same clock (``tasks.finetune.training.EpochClock``): from
one epoch's start to the next one's, so every callback's work at an epoch's end counts (the flow's
backup, Keras' ``BackupAndRestore``, best-weights checkpoint, CSV and TensorBoard logs, early stopping;
the plain side has none), and the flow's last epoch ends after its last backup is written. The same
clock also takes the process's CPU time over each epoch (median kept): the work done, which other jobs
on the machine disturb much less than the elapsed time.

  * plain     images decoded into a NumPy array first, ``model.fit(x, y, validation_data=...)``;
  * cnncodes  ``tasks.finetune.fine_tune``: tf.data decoding (before the first epoch) and caching,
              a backup every epoch for resuming (weights and optimizer state), best-weights
              checkpoint, CSV history, TensorBoard, early stopping, progress.

Twice: without augmentation, and with flip+rotation+zoom (the same Keras layers, in ``tf.data``, on
both sides: the plain run maps them over batches of its own ``tf.data`` pipeline of the arrays).

Usage:
    .venv/bin/python benchmarks/finetune.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/finetune.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CNNCODES_PROGRESS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tasks import runtime  # noqa: E402
from tasks.data.synthetic import CLASSES, make_dataset  # noqa: E402
from report import emit  # noqa: E402  benchmarks/ is the script's folder


def plain_fit(spec, cfg, manifest, epochs: int) -> tuple[list[float], list[float]]:
    """Seconds and CPU seconds per epoch of a plain model.fit on pre-decoded arrays (augmentation in
    tf.data if asked)."""
    tf = runtime.tensorflow()
    keras = runtime.keras()
    from tasks.finetune import apply_freezing, augmentation, build_network, make_optimizer, split_arrays
    from tasks.finetune.training import EpochClock
    from tasks.data.images import load_image

    keras.utils.set_random_seed(cfg.seed)
    net = build_network(spec, len(manifest.class_names), cfg)
    apply_freezing(net, cfg.freeze, cfg.freeze_batchnorm)
    tr_p, tr_y, _ = split_arrays(manifest, "train")
    va_p, va_y, _ = split_arrays(manifest, "val")
    xtr = np.stack([load_image(p, net.size) for p in tr_p])
    xva = np.stack([load_image(p, net.size) for p in va_p])
    steps = int(np.ceil(len(xtr) / cfg.batch_size))
    opt = make_optimizer(cfg, steps, "finetune")
    opt.set_head_variables(net.head_variables())
    net.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    aug = augmentation(cfg)
    clock = EpochClock()  # the flow's own clock: from one epoch's start to the next, callbacks included

    if aug is None:
        net.model.fit(xtr, tr_y, batch_size=cfg.batch_size, epochs=epochs, validation_data=(xva, va_y),
                      callbacks=[clock.callback()], verbose=0)
    else:
        def augmented(x, y):
            return aug(tf.cast(x, tf.float32), training=True), y

        ds = tf.data.Dataset.from_tensor_slices((xtr, tr_y)).shuffle(len(xtr), seed=cfg.seed).batch(cfg.batch_size)
        ds = ds.map(augmented, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        net.model.fit(ds, epochs=epochs, validation_data=(xva, va_y), callbacks=[clock.callback()], verbose=0)
    return clock.seconds(), clock.cpu_seconds()


def flow_fit(spec, cfg, manifest, work: Path) -> tuple[list[float], list[float]]:
    from tasks.finetune import fine_tune

    res = fine_tune(manifest, spec, cfg, work)
    return [h["epoch_seconds"] for h in res.history], [h["epoch_cpu_seconds"] for h in res.history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (default: 3)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig

    per_class, epochs = (24, 3) if args.quick else (48, 6)
    results = {"device": runtime.device_name(), "cores": os.cpu_count(), "epochs": epochs,
               "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cnncodes-ft-") as tmp:
        data = make_dataset(Path(tmp) / "data", CLASSES[:4], per_class=per_class, size=(375, 500), seed=3)
        manifest = scan_dataset(data, val_fraction=0.25)
        n_train = sum(1 for s in manifest.samples if s.split == "train")
        spec = BackboneSpec(name="mobilenet_v2", weights="none", input_size=224, precision="float32")
        for augment in ([], ["flip", "rotation", "zoom"]):
            cfg = FineTuneConfig(freeze="none", epochs=epochs, patience=epochs, batch_size=32, augment=augment,
                                 dense=[256], dropout=0.5, learning_rate=1e-3)
            plain, flow, plain_cpu, flow_cpu = [], [], [], []
            for k in range(args.repeats):  # alternate the order, so that a slow spell hits both sides
                sides = [("plain", plain, plain_cpu), ("flow", flow, flow_cpu)][:: 1 if k % 2 == 0 else -1]
                for side, out, out_cpu in sides:
                    wall, cpu = (plain_fit(spec, cfg, manifest, epochs) if side == "plain" else
                                 flow_fit(spec, cfg, manifest, Path(tmp) / f"run-{len(augment)}-{k}"))
                    out.append(wall)
                    out_cpu.append(cpu)
            # epochs 2..N (1 holds compilation and the first decode); the median resists a stray slow epoch
            p_s = float(np.median([t for run in plain for t in run[1:]]))
            f_s = float(np.median([t for run in flow for t in run[1:]]))
            per_repeat = [1.0 - float(np.median(p[1:])) / float(np.median(f[1:])) for p, f in zip(plain, flow)]

            def slow(runs):  # epochs 2..N over 1.5 times their run's median
                return sum(int(t > 1.5 * np.median(run[1:])) for run in runs for t in run[1:])
            row = {"augment": augment or "none", "train_images": n_train,
                   "plain_images_per_s": n_train / p_s, "cnncodes_images_per_s": n_train / f_s,
                   "plain_epoch_s": plain, "cnncodes_epoch_s": flow,
                   "overhead": 1.0 - p_s / f_s, "overhead_per_repeat": per_repeat,
                   "overhead_min": min(per_repeat), "overhead_max": max(per_repeat),
                   "plain_slow_epochs": slow(plain), "cnncodes_slow_epochs": slow(flow),
                   "measured_epochs": sum(len(run) - 1 for run in flow),
                   # CPU seconds of the process per epoch (median of epochs 2..N): the work done
                   "plain_epoch_cpu_s": plain_cpu, "cnncodes_epoch_cpu_s": flow_cpu,
                   "plain_cpu_s": float(np.median([t for run in plain_cpu for t in run[1:]])),
                   "cnncodes_cpu_s": float(np.median([t for run in flow_cpu for t in run[1:]]))}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
