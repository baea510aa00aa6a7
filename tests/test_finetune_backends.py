"""Fine-tuning (tasks/finetune) on the JAX and PyTorch Keras backends.

Keras fixes its backend when it is imported, once per process, and this process computes on TensorFlow: each
test runs a small script in a new process with ``KERAS_BACKEND`` set, which prints one ``RESULT`` line of JSON
that the test judges. The data and the small CNN (a ``.keras`` file, any backend loads it) are made here."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED
from tests.backends import BLOCK_TENSORFLOW

pytestmark = pytest.mark.slow
OTHER_BACKENDS = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]

HEADER = textwrap.dedent('''
    import json, logging, sys
    ARGS = json.loads(sys.argv[1])
    sys.path.insert(0, ARGS["root"])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    import numpy as np
    from tasks import runtime
    assert runtime.backend() == ARGS["backend"], runtime.backend()
    from tasks.backbones import BackboneSpec
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import FineTuneConfig, fine_tune, load_finetuned
    SPEC = BackboneSpec(name=ARGS["model"], weights="file", preprocessing="scale01")

    def done(**out):
        out.update(backend=runtime.backend(), tensorflow_imported="tensorflow" in sys.modules)
        print("RESULT " + json.dumps(out), flush=True)
''')



def _run(backend: str, body: str, tmp_path: Path, *, block_tensorflow: bool = False, timeout: int = 300,
         **args) -> tuple[dict, str]:
    """Run ``HEADER + body`` on ``backend`` in a new process with ``args`` (JSON): (its RESULT, its stderr)."""
    script = tmp_path / f"script-{backend}.py"
    script.write_text(HEADER + textwrap.dedent(body))
    env = dict(os.environ, KERAS_BACKEND=backend, CNNCODES_PROGRESS="0")
    env.setdefault("KERAS_HOME", str(SHARED / "keras") if (SHARED / "keras").is_dir() else str(tmp_path / "keras"))
    if block_tensorflow:
        site = tmp_path / "no-tensorflow"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(script), json.dumps(dict(args, root=str(ROOT), backend=backend))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        pytest.fail(f"the {backend} script failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return json.loads(results[-1][len("RESULT "):]), proc.stderr


def test_mixup_arrays_mixes_each_image_and_its_label_by_the_same_weight_and_partner():
    """The NumPy mixup of the JAX and PyTorch pipeline (tests/test_finetune.py checks TensorFlow's alike)."""
    from tasks.finetune.data import mixup_arrays

    n = 16  # image i is all i, label i is class i: a mixed image's value must be its label's mean class
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 3, 3, 3), np.float32)
    y = np.eye(n, dtype=np.float32)
    mx, my = mixup_arrays(x, y, np.random.default_rng([3, 4]), 0.4)
    assert mx.dtype == my.dtype == np.float32
    assert np.allclose(my.sum(1), 1.0) and (my >= 0).all() and (np.count_nonzero(my > 1e-6, axis=1) <= 2).all()
    assert np.allclose(mx[:, 0, 0, 0], my @ np.arange(n), atol=1e-4)
    assert np.allclose(mx, mx[:, :1, :1, :1])  # each image mixed as a whole
    assert 0 < np.mean(my.max(1) < 0.99) < 1  # some mixed, some nearly not: Beta(0.4, 0.4) is U-shaped
    again = mixup_arrays(x, y, np.random.default_rng([3, 4]), 0.4)[1]
    other = mixup_arrays(x, y, np.random.default_rng([5, 4]), 0.4)[1]
    assert np.array_equal(again, my) and not np.allclose(other, my)  # the seed decides the mixing


LEARNS = '''
    from PIL import Image

    m = scan_dataset(ARGS["data"])
    cfg = FineTuneConfig(dense=[16], dropout=0.0, batch_size=8, augment=[], optimizer="adam", learning_rate=3e-3,
                         epochs=20, patience=20, seed=ARGS["seed"])
    res = fine_tune(m, SPEC, cfg, ARGS["run"])
    model = load_finetuned(res.model_path)
    test = [s for s in m.samples if s.split == "test"]
    images = np.stack([np.asarray(Image.open(m.abspath(s)).convert("RGB"), np.float32) for s in test])
    predicted = np.argmax(model.predict(images, verbose=0), axis=1)
    done(losses=[h["loss"] for h in res.history], classes=len(m.class_names), test=len(test),
         accuracy=float(np.mean(predicted == np.array([s.label for s in test]))))
'''


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_fine_tuning_learns_oriented_stripes(backend, tmp_path, oriented_data, small_cnn):
    """tests/test_finetune.py's check that training learns, on JAX and PyTorch: the same stripes, network and
    settings (Adam at 3e-3, head at 10x, batches of 8, 20 epochs); the training loss falls at least threefold and
    held-out test images are classified far above chance. Seed 3 (TensorFlow's test uses 0): each backend draws
    the head's initial weights its own way, and with seeds 0-5, one or two per backend leave the head's 16 ReLUs
    dead under the 10x rate (the loss stays at ln 3), TensorFlow's seed 5 as well as JAX's seed 0 and PyTorch's
    seeds 2 and 4; seed 3 learns on both (loss 10-18x lower, test accuracy 0.98-1.0)."""
    out, _ = _run(backend, LEARNS, tmp_path, data=str(oriented_data), model=small_cnn, run=str(tmp_path / "run"),
                  seed=3)
    losses = out["losses"]
    assert out["backend"] == backend and len(losses) == 20 and losses[-1] <= losses[0] / 3, losses
    assert out["test"] == 45 and out["accuracy"] >= 1 / out["classes"] + 0.4, out
    if importlib.util.find_spec("tensorflow") is not None:  # TensorBoard's writer is TensorFlow's, here too
        assert out["tensorflow_imported"] and list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


MULTIPLIER = '''
    from tasks.finetune import apply_freezing, build_network, make_optimizer
    from tasks.finetune.data import set_seed

    x = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    out = {}
    for optimizer in ("sgd", "adam"):
        moved = {}
        for multiplier in (1.0, 10.0):
            cfg = FineTuneConfig(dense=[16], dropout=0.0, batch_size=8, augment=[], optimizer=optimizer,
                                 learning_rate=1e-3, momentum=0.0, head_lr_multiplier=multiplier)
            set_seed(0)  # the same initial weights for both multipliers
            net = build_network(SPEC, 3, cfg)
            apply_freezing(net, "none", True)
            opt = make_optimizer(cfg, steps_per_epoch=1, phase="finetune")
            opt.set_head_variables(net.head_variables())
            net.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
            head = {id(v) for v in net.head_variables()}
            before = [np.array(v) for v in net.model.trainable_variables]
            net.model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # one step, compiled
            moved[multiplier] = [(id(v) in head, float(np.abs(np.array(v) - b).mean()))
                                 for v, b in zip(net.model.trainable_variables, before)]
        out[optimizer] = {part: [a[1] / b[1] for a, b in zip(moved[10.0], moved[1.0]) if a[0] == is_head and b[1] > 0]
                          for part, is_head in (("head", True), ("body", False))}
    done(**out)
'''


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_head_learns_at_the_multiplier_times_the_body_rate(backend, tmp_path, small_cnn):
    """The head's learning-rate multiplier is a true per-variable rate inside the compiled training step on JAX and
    PyTorch: from the same weights and batch, one step with multiplier 10 moves every head variable 10 times as far
    as with multiplier 1 and every body variable exactly as far, under plain SGD and under Adam (which normalises
    gradients away, so only the rate itself can make the head move 10x)."""
    out, _ = _run(backend, MULTIPLIER, tmp_path, model=small_cnn)
    for optimizer in ("sgd", "adam"):
        head, body = out[optimizer]["head"], out[optimizer]["body"]
        assert len(head) == 4 and len(body) >= 4, out  # two Dense layers' kernels and biases; the convolutions
        np.testing.assert_allclose(head, 10.0, rtol=5e-3, err_msg=f"{backend} {optimizer} head")
        np.testing.assert_allclose(body, 1.0, rtol=5e-3, err_msg=f"{backend} {optimizer} body")


EVERYTHING = '''
    import keras

    from tasks.finetune import evaluate_finetuned, evaluation, self_training_for
    from tasks.finetune.data import SkipLog, augmentation, make_dataset, split_arrays

    try:
        import tensorflow  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    evaluation.MIN_IMAGES = 4  # a split of these data has 6 images
    m = scan_dataset(ARGS["data"])
    cfg = FineTuneConfig(dense=[16], dropout=0.0, pool_dropout=0.2, batch_size=8, head_epochs=1, epochs=2,
                         freeze="first:4", augment=["flip", "rotation", "zoom", "translation", "contrast", "time-mask"],
                         mixup=0.2, ensemble=2, freeze_batchnorm=False, adapt_batchnorm=True, self_train=1,
                         self_train_epochs=1, learning_rate=0.05)
    # the training batches themselves: augmented, mixed, a function of (seed, epoch, batch)
    paths, labels, rel = split_arrays(m, "train")
    ds = make_dataset(paths, labels, rel, 32, "stretch", 8, SkipLog(), training=True, augment=augmentation(cfg),
                      seed=0, mixup=0.2, n_classes=3)
    shuffled = make_dataset(paths, labels, rel, 32, "stretch", 8, SkipLog(), training=True, seed=0)
    augmented = make_dataset(paths, labels, rel, 32, "stretch", 8, SkipLog(), training=True, seed=0,
                             augment=augmentation(cfg))
    x0, y0 = ds[0]
    again = ds[0]
    ds.on_epoch_end()
    x1, y1 = ds[0]
    ds.set_epoch(0)
    (xs, ys), (xa, ya) = shuffled[0], augmented[0]
    batches = {"count": len(ds), "images": len(paths), "dtype": str(x0.dtype), "shape": list(x0.shape),
               "rows_sum_to_one": bool(np.allclose(y0.sum(1), 1.0)), "mixed_rows": int(np.sum(y0.max(1) < 0.99)),
               "same_again": bool(np.array_equal(x0, again[0]) and np.array_equal(y0, again[1])),
               "same_after_set_epoch": bool(np.array_equal(ds[0][0], x0)),
               "next_epoch_differs": not np.array_equal(x1, x0),
               "same_order": bool(np.array_equal(ys, ya)), "plain_dtype": str(xs.dtype),
               "augmented_images": int(sum(not np.array_equal(a, s.astype(np.float32)) for a, s in zip(xa, xs)))}
    res = fine_tune(m, SPEC, cfg, ARGS["run"])
    model = load_finetuned(res.model_path)
    members = [load_finetuned(f"{ARGS['run']}/network-{k}/model.keras") for k in (1, 2)]
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    each = [member.predict(x, verbose=0) for member in members]
    initial = keras.models.load_model(ARGS["model"])
    unchanged = {}
    for k in (1, 2):
        body = next(la for la in model.get_layer(f"network_{k}").layers if hasattr(la, "layers"))
        for name in ("conv0", "conv1", "bn1"):
            unchanged[f"{k}/{name}"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                           zip(body.get_layer(name).weights, initial.get_layer(name).weights))
    metrics, _ = evaluate_finetuned(res.model_path, m, res.input_size, "stretch", cfg.batch_size, adapt=True,
                                    self_training=self_training_for(cfg, m.media))
    done(blocked=blocked, batches=batches, unchanged=unchanged,
         phases=[[p["network"], p["phase"], p["epochs_run"], p["counts"]["body_trainable_layers"]]
                 for p in res.phases],
         history=[[h["network"], h["phase"], h["epoch"], h["loss"]] for h in res.history],
         layers=[la.name for la in model.layers][-3:],
         ensemble_is_mean=bool(np.allclose(model.predict(x, verbose=0), (each[0] + each[1]) / 2, atol=1e-5)),
         members_differ=float(np.abs(each[0] - each[1]).max()),
         adaptation={s: metrics[s].get("adaptation") for s in ("val", "test")})
'''


@pytest.mark.skipif("jax" not in OTHER_BACKENDS, reason="JAX is not installed")
def test_two_phases_freezing_augmentation_mixup_ensemble_adabn_and_self_training_on_jax(tmp_path, texture_data,
                                                                                        small_cnn):
    """On JAX, end to end, in a process where TensorFlow cannot be imported (as where it is not installed): the
    training batches (the PyDataset) are augmented and mixed, and each is a function of the seed, its epoch and its
    index; an ensemble of two networks trains in two phases (the head alone with the body frozen, then with the
    body's first 4 layers frozen: their weights stay bit-identical, the next ones and the trained
    BatchNormalization layers change); the saved model averages its networks; evaluation with AdaBN and a round of
    self-training adapts and self-trains each split's group. TensorBoard's logs are left out, said once in the log;
    TensorFlow was never imported."""
    out, stderr = _run("jax", EVERYTHING, tmp_path, block_tensorflow=True, data=str(texture_data), model=small_cnn,
                       run=str(tmp_path / "run"))
    assert out["blocked"] and not out["tensorflow_imported"]
    assert stderr.count("no TensorBoard logs") == 1 and not list((tmp_path / "run").rglob("events.out.tfevents.*"))
    b = out["batches"]
    assert b["count"] == -(-b["images"] // 8) and b["dtype"] == "float32" and b["shape"][1:] == [32, 32, 3]
    assert b["rows_sum_to_one"] and b["mixed_rows"] >= 1, b
    assert b["same_order"] and b["plain_dtype"] == "uint8" and b["augmented_images"] == 8, b
    assert b["same_again"] and b["same_after_set_epoch"] and b["next_epoch_differs"], b
    assert [p[:3] for p in out["phases"]] == [[1, "head", 1], [1, "finetune", 2], [2, "head", 1], [2, "finetune", 2]]
    assert [p[3] for p in out["phases"]][::2] == [0, 0] and all(p[3] > 0 for p in out["phases"][1::2])
    assert [h[:3] for h in out["history"]] == [[1, "head", 1], [1, "finetune", 1], [1, "finetune", 2],
                                               [2, "head", 1], [2, "finetune", 1], [2, "finetune", 2]]
    assert all(np.isfinite(h[3]) for h in out["history"])
    u = out["unchanged"]
    assert u["1/conv0"] and u["2/conv0"] and not u["1/conv1"] and not u["2/conv1"] and not u["1/bn1"], u
    assert out["layers"] == ["network_1", "network_2", "ensemble_average"]
    assert out["ensemble_is_mean"] and out["members_differ"] > 1e-4
    for split in ("val", "test"):
        a = out["adaptation"][split]
        assert a["batchnorm_layers"] == 4 and a["adapted_groups"] == {f"({split})": 6}, a  # bn1, bn2 of each network
        rounds = a["self_training"]["groups"][f"({split})"]["rounds"]
        assert len(rounds) == 1 and 1 <= rounds[0]["pseudo_labels"] < 6
        assert 0 <= a["unadapted_accuracy"] <= 1 and 0 <= a["adabn_accuracy"] <= 1


RESUME = '''
    from pathlib import Path
    from tests.interrupt import Interrupted, interrupt_after

    m = scan_dataset(ARGS["data"])
    cfg = FineTuneConfig(dense=[16], dropout=0.0, batch_size=8, head_epochs=1, epochs=3, augment=["flip", "rotation"],
                         mixup=0.2, monitor="none", learning_rate=0.05)
    whole = fine_tune(m, SPEC, cfg, ARGS["run"] + "-whole")
    try:
        with interrupt_after(2):  # the head phase's epoch, then one of fine-tuning's
            fine_tune(m, SPEC, cfg, ARGS["run"])
        interrupted = False
    except Interrupted:
        interrupted = True
    run = Path(ARGS["run"])
    meta = json.loads((run / "backup-finetune" / "training_metadata.json").read_text())
    first = {"interrupted": interrupted, "model": (run / "model.keras").exists(),
             "head_done": (run / "phase-head.done.json").exists(), "backup_epoch": meta["epoch"]}
    second = fine_tune(m, SPEC, cfg, ARGS["run"])
    a, b = load_finetuned(whole.model_path), load_finetuned(second.model_path)
    done(first=first, resumed=second.resumed_from_epoch,
         second=[[h["phase"], h["epoch"]] for h in second.history],
         whole_losses=[h["loss"] for h in whole.history], resumed_losses=[h["loss"] for h in second.history],
         weights_differ=max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights())))
'''


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_a_stopped_run_resumes_and_ends_as_the_uninterrupted_run(backend, tmp_path, texture_data, small_cnn):
    """On JAX and PyTorch, a run interrupted after its head phase and one fine-tuning epoch leaves the head phase
    done, the fine-tuning phase's backup (epoch 1) and no model; the next call resumes from it and finishes the
    model. With no dropout, the resumed epochs train on the batches the uninterrupted run drew (order,
    augmentation, mixup) from the weights and optimizer state Keras' BackupAndRestore restored: the same losses and
    the same final weights. (Dropout's random state is not in the backup, on TensorFlow neither: with dropout a
    resumed run draws other masks.)"""
    out, _ = _run(backend, RESUME, tmp_path, data=str(texture_data), model=small_cnn, run=str(tmp_path / "run"))
    assert out["first"] == {"interrupted": True, "model": False, "head_done": True, "backup_epoch": 1}
    assert out["resumed"] == {"finetune": 1}
    assert out["second"] == [["head", 1], ["finetune", 2], ["finetune", 3]]
    assert (tmp_path / "run" / "model.keras").exists() and not (tmp_path / "run" / "backup-finetune").exists()
    np.testing.assert_allclose(out["resumed_losses"][1:], out["whole_losses"][2:], rtol=1e-5)
    assert out["weights_differ"] < 1e-5, out


NO_TF = '''
    from storage.errors import DatasetError
    from tasks.finetune import evaluate_finetuned, evaluation, self_training_for

    try:
        import tensorflow  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    evaluation.MIN_IMAGES = 4
    m = scan_dataset(ARGS["data"])
    broken = next(s for s in m.samples if s.split == "train")
    open(m.abspath(broken), "wb").write(b"not an image any more")  # after the scan: the pipeline must skip it
    cfg = FineTuneConfig(dense=[16], dropout=0.0, batch_size=8, head_epochs=1, epochs=1, freeze_batchnorm=False,
                         augment=["flip", "rotation", "contrast", "time-mask"], mixup=0.2, learning_rate=0.05,
                         adapt_batchnorm=True, self_train=1, self_train_epochs=1)
    res = fine_tune(m, SPEC, cfg, ARGS["run"])
    metrics, _ = evaluate_finetuned(res.model_path, m, res.input_size, "stretch", cfg.batch_size, adapt=True,
                                    self_training=self_training_for(cfg, m.media))
    for s in m.samples:
        if s.split == "val":
            open(m.abspath(s), "wb").write(b"nor this")
    try:
        fine_tune(m, SPEC, cfg, ARGS["run"] + "-no-val")
        refused = ""
    except DatasetError as exc:
        refused = str(exc)
    done(blocked=blocked, history=[[h["phase"], h["epoch"]] for h in res.history], skipped=res.skipped,
         broken=broken.path, accuracy={k: v["accuracy"] for k, v in metrics.items()},
         self_trained=sorted(metrics["test"]["adaptation"]["self_training"]["groups"]), refused=refused)
'''


@pytest.mark.skipif("torch" not in OTHER_BACKENDS, reason="PyTorch is not installed")
def test_fine_tuning_on_torch_needs_no_tensorflow_skips_what_no_longer_decodes_and_refuses_an_empty_split(
        tmp_path, texture_data, small_cnn):
    """Where TensorFlow cannot be imported, fine-tuning on PyTorch runs as usual (JAX's is the end-to-end test
    above): two phases with augmentation (Keras layers and the SpecAugment mask) and mixup, a file that no longer
    decodes skipped and reported, evaluation with AdaBN and self-training; TensorBoard's logs are left out, said
    once in the log; a val split of which nothing decodes is refused as on TensorFlow. TensorFlow was never
    imported."""
    out, stderr = _run("torch", NO_TF, tmp_path, block_tensorflow=True, data=str(texture_data), model=small_cnn,
                       run=str(tmp_path / "run"))
    assert out["blocked"] and not out["tensorflow_imported"]
    assert out["history"] == [["head", 1], ["finetune", 1]]
    assert [s["path"] for s in out["skipped"]] == [out["broken"]]
    assert set(out["accuracy"]) == {"train", "val", "test"} and out["self_trained"] == ["(test)"]
    assert stderr.count("no TensorBoard logs") == 1
    assert "no image of the val split could be decoded" in out["refused"]
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))
