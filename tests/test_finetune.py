"""Fine-tuning: freezing modes, frozen BN, differential learning rates, early stopping, resume, registry."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY
from tests.interrupt import Interrupted, interrupt_after
from storage import ModelRegistry, ParameterError
from tasks.backbones import BackboneSpec
from tasks.data.datasets import scan_dataset
from tasks.finetune import FineTuneConfig, apply_freezing, build_network, fine_tune, make_optimizer
from tasks.settings import Output

pytestmark = pytest.mark.slow
SMALL = dict(dense=[16], dropout=0.0, batch_size=8, augment=[], epochs=2, patience=5)


def _spec(small_cnn):
    return BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01")


def _net(small_cnn, cfg=None, n=3):
    return build_network(_spec(small_cnn), n, cfg or FineTuneConfig(**SMALL))


def _backed_up(folder: Path) -> int:
    """The finished epochs a phase's backup (Keras' BackupAndRestore folder) holds."""
    return json.loads((folder / "training_metadata.json").read_text())["epoch"]


def test_freezing_modes_set_trainable_and_frozen_layer_counts():
    net = build_network(BackboneSpec(**TINY), 3, FineTuneConfig(**SMALL))
    with_weights = [layer for layer in net.body.layers if layer.weights]
    bn = [layer for layer in with_weights if type(layer).__name__ == "BatchNormalization"]
    non_bn = len(with_weights) - len(bn)
    apply_freezing(net, "all", True)
    assert net.counts()["body_trainable_layers"] == 0 and net.counts()["body_frozen_layers"] == len(with_weights)
    apply_freezing(net, "none", True)
    assert net.counts()["body_trainable_layers"] == non_bn  # every BN stays frozen
    apply_freezing(net, "none", False)
    assert net.counts()["body_trainable_layers"] == len(with_weights)
    apply_freezing(net, "first:20", False)
    expected = sum(1 for layer in net.body.layers[20:] if layer.weights)
    assert net.counts()["body_trainable_layers"] == expected
    apply_freezing(net, "until:block_3_project_BN", False)
    idx = [layer.name for layer in net.body.layers].index("block_3_project_BN")
    assert all(not layer.trainable for layer in net.body.layers[:idx + 1])
    assert all(layer.trainable for layer in net.body.layers[idx + 1:])
    assert net.counts()["frozen_params"] > 0 and net.counts()["trainable_params"] > 0
    with pytest.raises(ParameterError, match="did you mean"):
        apply_freezing(net, "until:block_3_project_B", False)
    with pytest.raises(ParameterError, match="freeze must be"):
        FineTuneConfig(freeze="some")


def test_head_learns_at_multiplier_times_the_body_rate_under_sgd_and_adam(small_cnn):
    import tensorflow as tf

    for optimizer in ("sgd", "adam"):
        cfg = FineTuneConfig(**dict(SMALL, optimizer=optimizer, learning_rate=1e-3, momentum=0.0,
                                    head_lr_multiplier=10.0))
        net = _net(small_cnn, cfg)
        apply_freezing(net, "none", True)
        opt = make_optimizer(cfg, steps_per_epoch=1, phase="finetune")
        opt.set_head_variables(net.head_variables())
        x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype("float32")
        y = np.array([0, 1, 2, 0])
        variables = net.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, net.model(x, training=True)))
        grads = tape.gradient(loss, variables)
        before = [v.numpy().copy() for v in variables]
        opt.apply(grads, variables)
        head = {id(v) for v in net.head_variables()}
        ratio_head, ratio_body = [], []
        for v, g, b in zip(variables, grads, before):
            g = np.asarray(g)
            delta = v.numpy() - b
            mask = np.abs(g) > 1e-12
            if not mask.any():
                continue
            if optimizer == "sgd":  # plain SGD: delta = -lr * (multiplier for the head) * grad, exactly
                want = -1e-3 * (10.0 if id(v) in head else 1.0) * g
                np.testing.assert_allclose(delta, want, rtol=1e-2, atol=1e-3 * np.abs(want).max())
            (ratio_head if id(v) in head else ratio_body).append(np.abs(delta[mask]).mean())
        assert ratio_head and ratio_body
        if optimizer == "sgd":
            continue
        # Adam normalises gradients away: only a real per-variable rate makes the head move 10x further.
        assert 8.0 < np.mean(ratio_head) / np.mean(ratio_body) < 12.5, (optimizer, np.mean(ratio_head),
                                                                         np.mean(ratio_body))


def test_frozen_weights_and_bn_statistics_are_bit_identical_after_training(tmp_path, texture_data, small_cnn):
    m = scan_dataset(texture_data)
    cfg = FineTuneConfig(**dict(SMALL, freeze="first:4", epochs=2, learning_rate=0.05))
    spec = _spec(small_cnn)
    net = build_network(spec, 3, cfg)
    frozen_names = {layer.name for layer in net.body.layers[:4]}
    # the input layer (its name numbered by Keras across a process) and the first three layers
    assert {"conv0", "bn0", "relu0"} < frozen_names and len(frozen_names) == 4
    assert any(name.startswith("input") for name in frozen_names - {"conv0", "bn0", "relu0"}), frozen_names
    res = fine_tune(m, spec, cfg, tmp_path / "run")
    from tasks.finetune import load_finetuned

    trained = load_finetuned(res.model_path)
    body = next(layer for layer in trained.layers if hasattr(layer, "layers"))
    fresh = build_network(spec, 3, cfg).body  # the same seeded initial weights
    changed = 0
    for before, after in zip(fresh.layers, body.layers):
        for wb, wa in zip(before.weights, after.weights):
            same = np.array_equal(np.asarray(wb), np.asarray(wa))
            if before.name in frozen_names or type(before).__name__ == "BatchNormalization":
                assert same, f"{before.name}/{wb.name} changed although frozen"
            elif not same:
                changed += 1
    assert changed >= 4  # kernels and biases of the two unfrozen convolutions did train
    assert res.counts["body_frozen_layers"] > 0 and len(res.history) == 2


def test_fine_tuning_learns_oriented_stripes(tmp_path, oriented_data, small_cnn):
    """Training must actually learn: on images whose class is the orientation of their stripes (colours,
    period and phase random), the training loss falls at least threefold from the first epoch to the last,
    and the saved model classifies held-out test images (never seen in training nor used for checkpoints)
    far above chance. Setup: BatchNormalization frozen (the default), Adam at 3e-3 (head at 10x), batches of
    8, 20 epochs (about 5 s on a CPU). Seen with training seeds 0-3: the loss falls 6-15x, test accuracy
    0.91-1.0 (chance: 0.33)."""
    import pandas as pd
    from PIL import Image

    from tasks.finetune import load_finetuned

    m = scan_dataset(oriented_data)
    assert {s.split for s in m.samples} == {"train", "val", "test"}
    cfg = FineTuneConfig(**dict(SMALL, optimizer="adam", learning_rate=3e-3, epochs=20, patience=20))
    res = fine_tune(m, _spec(small_cnn), cfg, tmp_path / "run")
    losses = pd.read_csv(tmp_path / "run" / "history.csv")["loss"].tolist()
    assert len(losses) == 20 and losses[-1] <= losses[0] / 3, losses
    model = load_finetuned(res.model_path)
    test = [s for s in m.samples if s.split == "test"]
    images = np.stack([np.asarray(Image.open(m.abspath(s)).convert("RGB"), np.float32) for s in test])
    predicted = np.argmax(model.predict(images, verbose=0), axis=1)
    accuracy = float(np.mean(predicted == np.array([s.label for s in test])))
    chance = 1 / len(m.class_names)
    assert len(test) == 45 and accuracy >= chance + 0.4, (accuracy, losses)


def test_early_stopping_stops(tmp_path, texture_data, small_cnn):
    m = scan_dataset(texture_data)
    cfg = FineTuneConfig(**dict(SMALL, epochs=12, patience=1, learning_rate=1e-12, monitor="val_loss",
                                min_delta=1.0))
    res = fine_tune(m, _spec(small_cnn), cfg, tmp_path / "run")
    assert res.stopped_early and len(res.history) == 2  # no improvement of at least 1.0: stop after patience


def test_monitor_none_trains_every_epoch_without_a_val_split_and_keeps_the_last(tmp_path, texture_data, small_cnn):
    from storage import DatasetError

    m = scan_dataset(texture_data, val_fraction=0.0, test_fraction=0.25)
    assert not [s for s in m.samples if s.split == "val"]
    with pytest.raises(DatasetError, match="--monitor none"):
        fine_tune(m, _spec(small_cnn), FineTuneConfig(**SMALL), tmp_path / "refused")
    cfg = FineTuneConfig(**dict(SMALL, epochs=3, monitor="none", head_epochs=1, learning_rate=0.05))
    res = fine_tune(m, _spec(small_cnn), cfg, tmp_path / "run")
    assert [(h["phase"], h["epoch"]) for h in res.history] == [("head", 1), ("finetune", 1), ("finetune", 2),
                                                                ("finetune", 3)]
    assert not res.stopped_early and Path(res.model_path).exists()
    assert not (tmp_path / "run" / "best.weights.h5").exists()  # no checkpoint choice was made
    assert "val_loss" not in res.history[-1]
    with pytest.raises(ParameterError, match="plateau"):
        FineTuneConfig(monitor="none", schedule="plateau")


def test_mixup_mixes_each_image_and_its_label_by_the_same_weight_and_partner():
    import tensorflow as tf

    from tasks.finetune.data import mixup_batch

    n = 16  # image i is all i, label i is class i: a mixed image's value must be its label's mean class
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 3, 3, 3), np.float32)
    y = np.eye(n, dtype=np.float32)
    mx, my = (t.numpy() for t in mixup_batch(x, y, tf.constant([3, 4], tf.int64), 0.4))
    assert np.allclose(my.sum(1), 1.0) and (my >= 0).all() and (np.count_nonzero(my > 1e-6, axis=1) <= 2).all()
    assert np.allclose(mx[:, 0, 0, 0], my @ np.arange(n), atol=1e-4)
    assert np.allclose(mx, mx[:, :1, :1, :1])  # each image mixed as a whole
    assert 0 < np.mean(my.max(1) < 0.99) < 1  # some mixed, some nearly not: Beta(0.4, 0.4) is U-shaped
    again = mixup_batch(x, y, tf.constant([3, 4], tf.int64), 0.4)[1].numpy()
    other = mixup_batch(x, y, tf.constant([5, 4], tf.int64), 0.4)[1].numpy()
    assert np.array_equal(again, my) and not np.allclose(other, my)  # the seed decides the mixing
    with pytest.raises(ParameterError, match="mixup"):
        FineTuneConfig(mixup=-0.1)


def test_fine_tuning_with_mixup_trains_on_mixed_labels_and_still_validates_and_predicts(tmp_path, texture_data,
                                                                                        small_cnn, monkeypatch):
    from tasks.finetune import load_finetuned

    from tasks.finetune import data as finetune_data

    mixed = []  # the training batches go through mixup_batch, with the alpha asked for
    real = finetune_data.mixup_batch
    monkeypatch.setattr(finetune_data, "mixup_batch", lambda x, y, seed, alpha: mixed.append(alpha) or
                        real(x, y, seed, alpha))
    m = scan_dataset(texture_data)
    cfg = FineTuneConfig(**dict(SMALL, epochs=2, head_epochs=1, mixup=0.2, augment=["flip"], learning_rate=0.05))
    res = fine_tune(m, _spec(small_cnn), cfg, tmp_path / "run")
    assert mixed and set(mixed) == {0.2}
    assert [h["phase"] for h in res.history] == ["head", "finetune", "finetune"]
    assert all(np.isfinite(h["loss"]) for h in res.history)
    model = load_finetuned(res.model_path)
    probs = model.predict(np.zeros((2, res.input_size, res.input_size, 3), np.float32), verbose=0)
    assert probs.shape == (2, len(m.class_names)) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_an_ensemble_trains_each_network_with_its_seed_resumes_and_averages_their_probabilities(
        tmp_path, texture_data, small_cnn):
    from tasks.finetune import load_finetuned

    m = scan_dataset(texture_data, val_fraction=0.0, test_fraction=0.25)
    cfg = FineTuneConfig(**dict(SMALL, epochs=2, monitor="none", learning_rate=0.05, ensemble=2, seed=7,
                                pool_dropout=0.2))
    spec, run = _spec(small_cnn), tmp_path / "run"
    seen: list[tuple[int, int]] = []
    with pytest.raises(Interrupted), interrupt_after(3):  # network 1's two epochs, then one of network 2's
        fine_tune(m, spec, cfg, run, progress=lambda i, n: seen.append((i, n)))
    assert not (run / "model.keras").exists() and (run / "network-1" / "model.keras").exists()
    assert _backed_up(run / "network-2" / "backup-finetune") == 1
    assert seen == [(1, 4), (2, 4), (3, 4)]  # one bar over both networks
    second = fine_tune(m, spec, cfg, run)
    assert second.resumed_from_epoch == {"network-2:finetune": 1}
    assert [(h["network"], h["epoch"]) for h in second.history] == [(1, 1), (1, 2), (2, 2)]
    assert [p["network"] for p in second.phases] == [1, 2]
    model = load_finetuned(second.model_path)
    assert [layer.name for layer in model.layers][-3:] == ["network_1", "network_2", "ensemble_average"]
    assert model.get_layer("network_1").get_layer("head_pool_dropout").rate == 0.2
    members = [load_finetuned(run / f"network-{k}" / "model.keras") for k in (1, 2)]
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    each = [member.predict(x, verbose=0) for member in members]
    assert np.max(np.abs(each[0] - each[1])) > 1e-3  # different seeds, different networks
    np.testing.assert_allclose(model.predict(x, verbose=0), (each[0] + each[1]) / 2, atol=1e-6)
    with pytest.raises(ParameterError, match="ensemble"):
        FineTuneConfig(ensemble=0)
    with pytest.raises(ParameterError, match="pool_dropout"):
        FineTuneConfig(pool_dropout=1.0)


def test_resume_continues_from_the_checkpointed_epoch(tmp_path, texture_data, small_cnn, monkeypatch):
    """A run interrupted after 2 of its 4 epochs resumes at the third, with the optimizer's state of the end of
    the second (its iteration count read as each epoch begins)."""
    from tasks import runtime
    from tasks.finetune import training

    keras = runtime.keras()
    iterations: list[tuple[int, int]] = []
    made = training.phase_callbacks

    class Iterations(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            iterations.append((epoch, int(np.asarray(self.model.optimizer.iterations))))

    monkeypatch.setattr(training, "phase_callbacks", lambda *a, **k: [*made(*a, **k), Iterations()])
    m = scan_dataset(texture_data)
    cfg = FineTuneConfig(**dict(SMALL, epochs=4))
    spec, run = _spec(small_cnn), tmp_path / "run"
    with pytest.raises(Interrupted), interrupt_after(2):
        fine_tune(m, spec, cfg, run)
    assert not (run / "model.keras").exists() and _backed_up(run / "backup-finetune") == 2
    second = fine_tune(m, spec, cfg, run)
    (_, zero), (_, per_epoch), (resumed_at, resumed_with), _ = iterations
    assert zero == 0 and per_epoch > 0 and (resumed_at, resumed_with) == (2, 2 * per_epoch), iterations
    assert second.resumed_from_epoch == {"finetune": 2}
    assert [h["epoch"] for h in second.history] == [3, 4] and Path(second.model_path).exists()
    assert [p["epochs_run"] for p in second.phases] == [4] and not (run / "backup-finetune").exists()


def test_a_run_stopped_in_its_head_phase_resumes_it_then_trains_every_fine_tuning_epoch(tmp_path, texture_data,
                                                                                       small_cnn):
    """Keras' BackupAndRestore tells the model it restores into at which epoch to start, and nothing resets that:
    the fine-tuning phase after a resumed head phase must still start at its first epoch."""
    m = scan_dataset(texture_data)
    cfg = FineTuneConfig(**dict(SMALL, head_epochs=3, epochs=2))
    spec, run = _spec(small_cnn), tmp_path / "run"
    with pytest.raises(Interrupted), interrupt_after(2):
        fine_tune(m, spec, cfg, run)
    assert _backed_up(run / "backup-head") == 2 and not (run / "phase-head.done.json").exists()
    second = fine_tune(m, spec, cfg, run)
    assert second.resumed_from_epoch == {"head": 2}
    assert [(h["phase"], h["epoch"]) for h in second.history] == [("head", 3), ("finetune", 1), ("finetune", 2)]
    assert [(p["phase"], p["epochs_run"]) for p in second.phases] == [("head", 3), ("finetune", 2)]


def test_a_backup_it_cannot_resume_from_is_removed_said_and_the_phase_trains_from_its_start(tmp_path, texture_data,
                                                                                           small_cnn, caplog):
    """The backup of earlier versions (cnncodes' own .npz, named by a training_metadata.json of its own), a first
    backup killed before its metadata was written, and metadata killed while it was written: each is removed with
    a line in the log, and its phase trains from its first epoch (Keras' BackupAndRestore would have taken the
    old metadata's epoch count without any weights)."""
    from tasks.finetune.resume import backup_epoch

    def folder(name: str, metadata: str | None, *files: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for f in files:
            (path / f).write_bytes(b"\x89HDF\r\n")
        if metadata is not None:
            (path / "training_metadata.json").write_text(metadata)
        return path

    assert backup_epoch(tmp_path / "none") == 0
    kept = folder("kept", json.dumps({"epoch": 2, "batch": 0}), "latest.weights.h5")
    assert backup_epoch(kept) == 2 and kept.exists()
    with caplog.at_level(logging.WARNING, logger="tasks.finetune.resume"):
        for name, metadata, why in (("first", None, "not complete"), ("torn", '{"epo', "does not read")):
            assert backup_epoch(folder(name, metadata, "latest.weights.h5")) == 0
            assert not (tmp_path / name).exists() and why in caplog.text
        run = tmp_path / "run"
        run.mkdir()
        folder("run/backup-finetune", json.dumps({"epoch": 1, "state": "state-0001.npz", "variables": 12}),
               "state-0001.npz")
        res = fine_tune(scan_dataset(texture_data), _spec(small_cnn), FineTuneConfig(**SMALL), run)
    assert "format of an earlier cnncodes version" in caplog.text and "backup-finetune" in caplog.text
    assert res.resumed_from_epoch == {} and [h["epoch"] for h in res.history] == [1, 2]


KILL = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, fine_tune
    fine_tune(scan_dataset({data!r}), BackboneSpec(name={model!r}, weights="file", preprocessing="scale01"),
              FineTuneConfig(**{cfg!r}), {run!r})
""")


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, texture_data, small_cnn):
    cfg = dict(SMALL, epochs=200, patience=200)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL.format(root=str(ROOT), data=str(texture_data), model=small_cnn,
                                                               cfg=cfg, run=str(run))])
    meta = run / "backup-finetune" / "training_metadata.json"
    deadline = time.monotonic() + 240
    epoch = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if meta.exists():
                try:
                    epoch = json.loads(meta.read_text())["epoch"]
                except (ValueError, KeyError):
                    epoch = 0
            if epoch >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    at_kill = json.loads(meta.read_text())["epoch"]
    assert at_kill >= 2
    res = fine_tune(scan_dataset(texture_data), _spec(small_cnn), FineTuneConfig(**dict(cfg, epochs=at_kill + 1)),
                    run)
    assert res.resumed_from_epoch == {"finetune": at_kill}
    assert [h["epoch"] for h in res.history] == [at_kill + 1]


def test_flow_reports_registers_and_predict_serves_the_model(tmp_path, texture_data, small_cnn):
    from prefect.testing.utilities import prefect_test_harness

    from flows.fine_tune import fine_tune as flow
    from tasks.predict import predict_images

    import pandas as pd

    with prefect_test_harness(server_startup_timeout=90):
        r = flow(str(texture_data), _spec(small_cnn),
                 FineTuneConfig(dense=[16], dropout=0.0, batch_size=8, augment=["flip"], epochs=2, head_epochs=1),
                 model_name="tex-ft", output=Output(out=str(tmp_path / "out"), registry=str(tmp_path / "reg")))
    assert r.model == "tex-ft" and r.version == 1
    report = Path(r.report).read_text()
    assert "## Phases" in report and "| head | all |" in report and "| finetune | none |" in report
    assert "## Per class (val)" in report and Path(r.learning_curves).read_bytes()[:4] == b"\x89PNG"
    rec = ModelRegistry(tmp_path / "reg").record("tex-ft")
    assert rec.metadata["kind"] == "fine-tuned" and rec.model_path.suffix == ".keras"
    val_acc = rec.metadata["metrics"]["val"]["accuracy"]
    m = scan_dataset(texture_data)
    val = [s for s in m.samples if s.split == "val"]
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join(m.abspath(s) for s in val))
    out = predict_images(listing, tmp_path / "reg", "tex-ft", None, tmp_path / "p.csv")
    df = pd.read_csv(tmp_path / "p.csv")
    assert out["images"] == len(val) == len(df)
    truth = {m.abspath(s): m.class_names[s.label] for s in val}
    acc = float(np.mean([truth[p] == c for p, c in zip(df["path"], df["predicted"])]))
    assert abs(acc - val_acc) < 1e-9  # predict reproduces the evaluation
    assert np.allclose(df[[f"p_{c}" for c in m.class_names]].sum(1), 1.0, atol=1e-5)


def test_a_resumed_phase_remembers_its_best_epoch_before_the_kill(tmp_path):
    """The best-weights checkpoint and early stopping carry the epochs logged before a resume: a worse
    first resumed epoch neither overwrites best.weights.h5 nor becomes the weights restored at the end,
    and patience counts the epochs without improvement from before the kill."""
    from tasks import runtime
    from tasks.finetune.resume import best_prior, prior_values, resumable_early_stopping

    keras = runtime.keras()
    log = tmp_path / "history-finetune.csv"
    # epochs 0-2 finished before the kill; epoch 3 was logged but its backup never committed: it runs again
    log.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,1.0,0.50,0.9\n1,0.8,0.5,0.90,0.3\n"
                   "2,0.9,0.4,0.60,0.6\n3,0.95,0.3,0.99,0.1\n")
    prior = prior_values(log, 3, "val_accuracy")
    assert prior == [(0, 0.5), (1, 0.9), (2, 0.6)] and best_prior(prior, "val_accuracy") == 0.9
    assert best_prior(prior_values(log, 3, "val_loss"), "val_loss") == 0.3
    assert prior_values(log, 0, "val_accuracy") == []

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    best = tmp_path / "best.weights.h5"
    model.set_weights([np.full((2, 1), 7.0, "f4"), np.zeros(1, "f4")])
    model.save_weights(best)  # what the checkpoint wrote at epoch 1
    model.set_weights([np.zeros((2, 1), "f4"), np.zeros(1, "f4")])  # the backup's (later) weights

    checkpoint = keras.callbacks.ModelCheckpoint(str(best), monitor="val_accuracy", mode="max", save_best_only=True,
                                                 save_weights_only=True,
                                                 initial_value_threshold=best_prior(prior, "val_accuracy"))
    stop = resumable_early_stopping(keras, prior, best, monitor="val_accuracy", mode="max", patience=3,
                                    restore_best_weights=True)
    for cb in (checkpoint, stop):
        cb.set_model(model)
        cb.on_train_begin()
    assert stop.best == 0.9 and stop.best_epoch == 1 and stop.wait == 1
    before = best.read_bytes()
    for epoch, acc in ((3, 0.7), (4, 0.8)):  # worse than 0.9: no save; patience 3 runs out at epoch 4
        for cb in (checkpoint, stop):
            cb.on_epoch_end(epoch, {"val_accuracy": acc, "loss": 1.0})
    assert best.read_bytes() == before
    assert model.stop_training and stop.stopped_epoch == 4
    stop.on_train_end()
    np.testing.assert_array_equal(model.get_weights()[0], np.full((2, 1), 7.0, "f4"))  # epoch 1's weights
