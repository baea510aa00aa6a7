"""Fine-tuning (cases 3 and 4 of transfer learning): the backbone itself is trained.

A backbone (optionally cut at a layer) gets a new head: global average pooling
or Flatten, optional Dense+ReLU+Dropout blocks, a softmax over the classes.
The known traps are handled here rather than left to the user:

* BatchNormalization layers of a frozen part stay in inference mode (Keras 3
  runs a BN layer with ``trainable=False`` on its moving statistics), and by
  default every BN layer stays frozen while the rest fine-tunes.
* The new head learns at the base rate times ``head_lr_multiplier`` (default
  10): a true per-variable learning rate inside the optimizer's update step,
  so it holds for SGD with momentum and for Adam alike.
* Preprocessing is a layer of the saved model: the ``.keras`` file takes RGB
  pixels in [0, 255] and nothing about it can be forgotten at prediction time.

Data comes from the same manifest as extraction, through ``tf.data`` on the
TensorFlow backend and a ``keras.utils.PyDataset`` on JAX and PyTorch (:mod:`.data`):
decoded once with the same decoder (bad files skipped and reported), cached,
shuffled, augmented with Keras preprocessing layers (training only).
A killed run resumes from its last epoch (weights, optimizer state, epoch)
through Keras' ``BackupAndRestore``, written after every epoch (:mod:`.resume`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage.errors import DatasetError, ParameterError
from storage.files import atomic_path, atomic_write
from storage.manifest import Manifest

from .. import runtime
from ..backbones import BackboneSpec
from .resume import backup_epoch, best_prior, maximised, prior_values, resumable_early_stopping
from .config import FineTuneConfig
from ..data.inputs import input_loader
from .data import SkipLog, at_epoch, augmentation, batch_count, make_dataset, set_seed, split_arrays
from .network import apply_freezing, build_network, make_optimizer, preprocess_positions

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training
@dataclass
class FineTuneResult:
    model_path: str
    history: list[dict[str, Any]]
    phases: list[dict[str, Any]]
    counts: dict[str, int]
    skipped: list[dict[str, str]]
    seconds: float
    resumed_from_epoch: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False
    input_size: int | None = None
    precision: str | None = None      # what the network computed in ('auto' resolved)
    devices: int = 1                   # replicas of the distribution strategy


class EpochClock:
    """Seconds per epoch from one epoch's start to the next one's (the last: to the end of training), so
    that every callback's work at an epoch's end (checkpoints, backups, logs, early stopping) is inside
    the epoch it belongs to. As the first callback it also reports progress. Used by the benchmarks for
    the plain ``model.fit`` side too, so both sides are timed the same way.

    ``closing()``, placed as the last callback, moves the end of the last epoch after every other
    callback's work at the end of training.
    ``cpu_seconds()``: the process's CPU time (all its threads) over the same spans, a measure of the
    work done that other processes competing for the cores disturb far less than the elapsed time."""

    def __init__(self, progress: Callable[[int, int], None] | None = None, total: int = 0, offset: int = 0):
        self.progress, self.total, self.offset = progress, total, offset
        self.starts: list[tuple[float, float]] = []   # (elapsed, CPU) at each epoch's start
        self.end: tuple[float, float] | None = None
        self._closing = False

    def _spans(self, which: int) -> list[float]:
        marks = [m[which] for m in self.starts + ([self.end] if self.end is not None else [])]
        return [b - a for a, b in zip(marks, marks[1:])]

    def seconds(self) -> list[float]:
        return self._spans(0)

    def cpu_seconds(self) -> list[float]:
        return self._spans(1)

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def callback(self):
        keras = runtime.keras()
        outer = self

        class CB(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.starts.append(outer._now())

            def on_epoch_end(self, epoch, logs=None):
                if outer.progress:
                    outer.progress(outer.offset + epoch + 1, outer.total)

            def on_train_end(self, logs=None):
                if not outer._closing:
                    outer.end = outer._now()

        return CB()

    def closing(self):
        keras = runtime.keras()
        outer = self
        outer._closing = True

        class Closing(keras.callbacks.Callback):
            def on_train_end(self, logs=None):
                outer.end = outer._now()

        return Closing()


def default_strategy():
    """On TensorFlow: MirroredStrategy (one replica per GPU) where TensorFlow sees several GPUs; else None.

    On the other backends None: one process trains on one device. Keras' own data parallelism on JAX
    (``keras.distribution.DataParallel``) is not switched on: it has not run on a machine with several GPUs yet,
    and it needs every batch, an epoch's short last one too, to divide evenly among the GPUs. Several GPUs serve
    JAX and PyTorch through one worker per GPU (extraction's ``--gpus``)."""
    if runtime.backend() == "tensorflow":
        tf = runtime.tensorflow()
        return tf.distribute.MirroredStrategy() if len(runtime.gpus()) > 1 else None
    gpus = runtime.gpus()
    if len(gpus) > 1:
        log.info("the %s backend fine-tunes on one device per process: %d GPUs seen, one used", runtime.backend(),
                 len(gpus))
    return None


def _replicas(strategy) -> int:
    """Devices that share each batch: the strategy's replicas (TensorFlow), Keras' distribution's devices (JAX)."""
    if strategy is not None:
        return strategy.num_replicas_in_sync
    if runtime.backend() == "jax":
        distribution = runtime.keras().distribution.distribution()
        if distribution is not None:
            return int(np.prod(distribution.device_mesh.shape))
    return 1


def _jit_compile(cfg: FineTuneConfig):
    """``compile``'s ``jit_compile``: on TensorFlow XLA as ``cfg.xla`` says; JAX always compiles with XLA
    ("auto"); PyTorch runs eagerly ("auto": ``torch.compile`` is not used)."""
    if runtime.backend() == "tensorflow":
        return bool(cfg.xla)
    if cfg.xla and runtime.backend() == "torch":
        log.info("--xla has no effect on the torch backend (the training step runs eagerly)")
    return "auto"


_NO_TENSORBOARD_SAID: list[bool] = []


def tensorboard_callback(keras, log_dir: Path):
    """Keras' TensorBoard callback, which writes with TensorFlow's summary writer (also on JAX and PyTorch, where
    TensorFlow is imported for it and kept off the GPUs, whose memory it would take); None where TensorFlow
    cannot be imported (a JAX or PyTorch install without it), said once per process in the log."""
    if runtime.backend() != "tensorflow":
        try:
            tf = runtime.tensorflow("TensorBoard logs")
            with contextlib.suppress(RuntimeError):  # too late once TensorFlow has set up its devices
                tf.config.set_visible_devices([], "GPU")
        except (ImportError, ParameterError) as exc:
            if not _NO_TENSORBOARD_SAID:
                _NO_TENSORBOARD_SAID.append(True)
                log.info("no TensorBoard logs: Keras' TensorBoard callback writes with TensorFlow, which cannot be "
                         "imported here (%s); history.csv has every epoch's metrics", str(exc).splitlines()[0][:160])
            return None
    return keras.callbacks.TensorBoard(str(log_dir), histogram_freq=0, write_graph=False)


def fine_tune(manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig, workdir: str | Path,
              resize: str = "stretch", progress: Callable[[int, int], None] | None = None,
              strategy=None) -> FineTuneResult:
    """Fine-tune on ``manifest``'s train split, validating on val (or test). Writes into ``workdir``:
    ``model.keras`` (the best weights, no optimizer), ``history.csv``, ``tensorboard/``, per-phase
    backups for resuming, ``best.weights.h5``. A second call with the same ``workdir`` after a
    killed run resumes each unfinished phase from its last finished epoch.

    ``spec.precision`` applies to the whole network ('auto': mixed float16 on a GPU, float32 on a
    CPU), with dynamic loss scaling under float16. ``strategy`` (a ``tf.distribute`` strategy, TensorFlow
    only) defaults to MirroredStrategy over every GPU when there are several (:func:`default_strategy`:
    on JAX, Keras' DataParallel instead; on PyTorch, one device).

    ``cfg.ensemble`` > 1: that many networks, trained one after the other in ``workdir/network-K``
    (seeds ``cfg.seed + K - 1``; each resumes on its own), and ``model.keras`` averages their class
    probabilities; ``history`` and ``phases`` rows name their ``network``."""
    if cfg.ensemble == 1:
        return _fine_tune_one(manifest, spec, cfg, workdir, resize, progress, strategy)
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n, per = cfg.ensemble, cfg.head_epochs + cfg.epochs
    done: list[FineTuneResult] = []
    history: list[dict[str, Any]] = []
    for k in range(1, n + 1):
        member = cfg.model_copy(update={"seed": cfg.seed + k - 1, "ensemble": 1})
        step = (lambda i, total, k=k: progress((k - 1) * per + i, n * per)) if progress else None
        r = _fine_tune_one(manifest, spec, member, workdir / f"network-{k}", resize, step, strategy)
        for row in r.history + r.phases:
            row["network"] = k
        history += r.history
        done.append(r)
    model_path = workdir / "model.keras"
    with atomic_path(model_path, suffix=".keras") as tmp:
        ensemble_model([d.model_path for d in done]).save(tmp)
    _write_history(workdir, history)
    last = done[-1]
    return FineTuneResult(str(model_path), history, [p for d in done for p in d.phases], last.counts,
                          last.skipped, time.perf_counter() - t0,
                          {f"network-{k}:{p}": e for k, d in enumerate(done, 1)
                           for p, e in d.resumed_from_epoch.items()},
                          any(d.stopped_early for d in done), last.input_size, last.precision, last.devices)


def ensemble_model(paths: list[str]):
    """One Keras model from fine-tuned networks saved by :func:`fine_tune` (same input, classes and
    preprocessing): the first network's preprocessing layer, then each network's body and head as a nested
    model ``network_K``, then the mean of their class probabilities (layer ``ensemble_average``)."""
    from .evaluation import load_finetuned

    keras = runtime.keras()
    members = [load_finetuned(p) for p in paths]
    cut = [preprocess_positions(m)[0] for m in members]
    inp = keras.Input(members[0].input_shape[1:], name="image")
    x = members[0].layers[cut[0]](inp)
    outputs = []
    for k, (m, i) in enumerate(zip(members, cut), 1):
        sub_in = keras.Input(x.shape[1:], name=f"network_{k}_input")
        h = sub_in
        for layer in m.layers[i + 1:]:  # the body and the head: one chain after the preprocessing
            h = layer(h)
        outputs.append(keras.Model(sub_in, h, name=f"network_{k}")(x))
    out = keras.layers.Average(name="ensemble_average", dtype="float32")(outputs)
    return keras.Model(inp, out, name="cnncodes_ensemble")


@dataclass
class _Data:
    """What every phase of one network trains and validates on."""

    train: Any
    val: Any
    steps: int          # training batches per epoch
    known: bool         # whether ``steps`` is the dataset's own count (else an estimate: each epoch runs to the end)
    skips: SkipLog
    one_hot: int        # classes of one-hot (mixed) labels; 0: integer labels


def _fine_tune_one(manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig, workdir: str | Path,
                   resize: str, progress: Callable[[int, int], None] | None, strategy) -> FineTuneResult:
    """One network: its data, then each phase (the head alone, then fine-tuning) trained or, when a
    previous call finished it, loaded; then the model saved."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    splits = _splits(manifest, cfg)
    spec = spec.resolved()
    runtime.check_precision(spec.precision)
    if strategy is None:
        strategy = default_strategy()
    scope = strategy.scope if strategy else contextlib.nullcontext
    with scope():
        net = build_network(spec, len(manifest.class_names), cfg)
    data = _datasets(manifest, spec, cfg, net.size, resize, splits)
    net.model(np.zeros((1, net.size, net.size, 3), np.float32))  # built, for a backup to be restored
    phases = ([("head", "all", cfg.head_epochs)] if cfg.head_epochs else []) + [("finetune", cfg.freeze, cfg.epochs)]
    total_epochs = sum(p[2] for p in phases)
    history: list[dict[str, Any]] = []
    phase_info, resumed, offset, stopped_early = [], {}, 0, False
    for phase, freeze, epochs in phases:
        info = _finished_phase(net, workdir, phase)
        if info is None:
            clock = EpochClock(progress, total_epochs, offset)
            info, start_epoch = _train_phase(net, spec, cfg, data, workdir, (phase, freeze, epochs), scope, clock)
            if start_epoch:
                resumed[phase] = start_epoch
            if phase == "finetune":
                stopped_early = info["epochs_run"] < epochs
        phase_info.append(info)
        history += info.get("history", [])
        offset += epochs
    keras = runtime.keras()
    plain = keras.Model(net.model.inputs, net.model.outputs, name="cnncodes_finetuned")
    model_path = workdir / "model.keras"
    with atomic_path(model_path, suffix=".keras") as tmp:
        plain.save(tmp)
    _write_history(workdir, history)
    return FineTuneResult(str(model_path), history, phase_info, net.counts(), data.skips.as_list(),
                          time.perf_counter() - t0, resumed, stopped_early, net.size, spec.precision,
                          _replicas(strategy))


def _splits(manifest: Manifest, cfg: FineTuneConfig) -> dict[str, tuple]:
    """The train and val splits' (paths, labels, relative paths); DatasetError where they cannot serve."""
    tr = split_arrays(manifest, "train")
    # early stopping and the best checkpoint watch val; test is never shown to a selection step
    va = split_arrays(manifest, "val")
    if len(np.unique(tr[1])) < 2:
        raise DatasetError(f"the train split has images of {len(np.unique(tr[1]))} class(es); fine-tuning "
                           "needs at least two.")
    if not va[0] and cfg.monitor.startswith("val_"):
        raise DatasetError(f"fine-tuning with monitor {cfg.monitor} needs a val split for early stopping and the best "
                           "checkpoint (the test split is kept for the final, unbiased accuracy); use --val-fraction "
                           "> 0 or a dataset with val/, or --monitor none to train exactly --epochs epochs and keep "
                           "the last.")
    return {"train": tr, "val": va}


def _datasets(manifest: Manifest, spec: BackboneSpec, cfg: FineTuneConfig, size: int, resize: str,
              splits: dict[str, tuple]) -> _Data:
    """The training and validation datasets (decoded now, into their caches); DatasetError where nothing of
    a split decodes."""
    skips = SkipLog()
    load = input_loader(manifest.media, size, resize, spectrogram=spec.spectrogram)
    n_classes = len(manifest.class_names)
    one_hot = n_classes if cfg.mixup else 0  # mixed labels are rows of class weights: a categorical loss
    (tr_paths, tr_labels, tr_rel), (va_paths, va_labels, va_rel) = splits["train"], splits["val"]
    train_ds = make_dataset(tr_paths, tr_labels, tr_rel, size, resize, cfg.batch_size, skips, training=True,
                            augment=augmentation(cfg, manifest.media), seed=cfg.seed, load=load, mixup=cfg.mixup,
                            n_classes=one_hot)
    val_ds = make_dataset(va_paths, va_labels, va_rel, size, resize, cfg.batch_size, skips, training=False,
                          load=load, n_classes=one_hot) if va_paths else None
    # batches of the images that decoded (make_dataset decodes them now, into its cache)
    n_batches = batch_count(train_ds)
    known = n_batches is not None
    steps = n_batches if known else max(1, int(np.ceil(len(tr_paths) / cfg.batch_size)))
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if ds is not None and batch_count(ds) == 0:
            raise DatasetError(f"no image of the {split} split could be decoded (see the skipped files: "
                               f"{skips.as_list()[:3]}...).")
    return _Data(train_ds, val_ds, steps, known, skips, one_hot)


def _finished_phase(net, workdir: Path, phase: str) -> dict[str, Any] | None:
    """A phase that a previous call finished: its weights loaded into ``net``, its record returned; else None."""
    done_marker = workdir / f"phase-{phase}.done.json"
    weights_after = workdir / f"phase-{phase}.weights.h5"
    if not (done_marker.exists() and weights_after.exists()):
        return None
    net.model.load_weights(weights_after)
    return json.loads(done_marker.read_text())


def _compiled_model(net, spec: BackboneSpec, cfg: FineTuneConfig, data: _Data, phase: str, scope):
    """A Keras model over ``net``'s layers, compiled with this phase's optimizer and loss.

    Each phase fits a model of its own (the layers, hence the weights, are ``net.model``'s): Keras'
    ``BackupAndRestore`` sets the epoch a restored ``fit`` starts from on the model it restores into, and
    nothing resets it, so a later phase fitting the same model would start at that epoch too."""
    keras = runtime.keras()
    with scope():  # made inside the scope: a TensorFlow model trains with the strategy it was made under
        model = keras.Model(net.model.inputs, net.model.outputs, name=net.model.name)
        opt = make_optimizer(cfg, data.steps, phase)
        if hasattr(opt, "set_head_variables"):
            opt.set_head_variables(net.head_variables())
        if spec.precision == "float16":  # float16 gradients underflow without dynamic loss scaling
            opt = keras.optimizers.LossScaleOptimizer(opt)
        loss = "categorical_crossentropy" if data.one_hot else "sparse_categorical_crossentropy"
        model.compile(optimizer=opt, loss=loss, metrics=["accuracy"], jit_compile=_jit_compile(cfg))
    return model


def phase_callbacks(cfg: FineTuneConfig, workdir: Path, phase: str, prior: list[tuple[int, float]],
                    clock: EpochClock) -> list:
    """The callbacks of one phase's ``fit``, in order: the clock (and progress), the CSV history, TensorBoard,
    the best-weights checkpoint and early stopping (both aware of ``prior``, the epochs before a resume), the
    plateau schedule, the backup, the clock's closing."""
    keras = runtime.keras()
    # monitor 'none': no checkpoint choice and no early stopping; the last epoch's weights are the model
    monitor = None if cfg.monitor == "none" else cfg.monitor
    mode = "max" if monitor and maximised(monitor) else "min"
    board = tensorboard_callback(keras, workdir / "tensorboard" / phase)
    callbacks = [
        clock.callback(),
        keras.callbacks.CSVLogger(str(workdir / f"history-{phase}.csv"), append=True),
        *([board] if board is not None else []),
    ]
    if monitor:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(workdir / "best.weights.h5"), monitor=monitor, mode=mode, save_best_only=True,
            save_weights_only=True, initial_value_threshold=best_prior(prior, monitor)))
    if phase == "finetune" and monitor:
        callbacks.append(resumable_early_stopping(keras, prior, workdir / "best.weights.h5", monitor=monitor,
                                                  mode=mode, min_delta=cfg.min_delta, patience=cfg.patience,
                                                  restore_best_weights=True))
        if cfg.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=cfg.step_gamma,
                                                               patience=max(1, cfg.patience // 2)))
    # After the others: at training's start it restores after early stopping has read the best weights (whose
    # file holds an optimizer state too); at an epoch's end it backs up once the epoch's row and checkpoint are
    # written (and the learning rate the plateau schedule set). Kept until the phase is recorded as done (not
    # deleted at the end of fit), so no moment exists without a checkpoint; the previous epoch's backup is kept
    # too, for a kill while the weights are written.
    callbacks.append(keras.callbacks.BackupAndRestore(str(workdir / f"backup-{phase}"), double_checkpoint=True,
                                                      delete_checkpoint=False))
    callbacks.append(clock.closing())  # last: the last epoch ends after the last backup is written
    return callbacks


def _train_phase(net, spec: BackboneSpec, cfg: FineTuneConfig, data: _Data, workdir: Path,
                 phase_spec: tuple[str, str, int], scope, clock: EpochClock) -> tuple[dict[str, Any], int]:
    """Train one phase (name, freezing, epochs) from its backup, or its start, to its end, and record it as
    done: (its record, the epoch it resumed from)."""
    phase, freeze, epochs = phase_spec
    apply_freezing(net, freeze, cfg.freeze_batchnorm)
    model = _compiled_model(net, spec, cfg, data, phase, scope)
    backup = workdir / f"backup-{phase}"
    start_epoch = backup_epoch(backup)  # the backup's weights and optimizer state are loaded as fit begins
    # the epochs before a resume still count for the best checkpoint and for early stopping
    prior = prior_values(workdir / f"history-{phase}.csv", start_epoch, cfg.monitor) if cfg.monitor != "none" else []
    callbacks = phase_callbacks(cfg, workdir, phase, prior, clock)
    before = net.counts()
    at_epoch(data.train, clock.offset + start_epoch)  # a resumed phase draws as the uninterrupted run would have
    # steps_per_epoch given: Keras keeps the iterator it makes at an epoch's end (prefetching
    # while validation runs) for the next epoch instead of making another one
    h = model.fit(data.train, validation_data=data.val, epochs=epochs, initial_epoch=start_epoch,
                  steps_per_epoch=data.steps if data.known else None, callbacks=callbacks, verbose=0,
                  shuffle=False)  # the dataset shuffles itself
    ran = len(h.history.get("loss", []))
    seconds, cpu = clock.seconds(), clock.cpu_seconds()
    rows = [{"phase": phase, "epoch": start_epoch + i + 1, **{k: float(v[i]) for k, v in h.history.items()},
             "epoch_seconds": seconds[i] if i < len(seconds) else None,
             "epoch_cpu_seconds": cpu[i] if i < len(cpu) else None} for i in range(ran)]
    info = {"phase": phase, "freeze": freeze, "epochs_run": start_epoch + ran, "epochs": epochs,
            "counts": before, "history": rows}
    net.model.save_weights(workdir / f"phase-{phase}.weights.h5")
    atomic_write(workdir / f"phase-{phase}.done.json", json.dumps(info, default=float))
    shutil.rmtree(backup, ignore_errors=True)
    return info, start_epoch


def _write_history(workdir: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    if not history:
        return
    df = pd.DataFrame(history)
    atomic_write(workdir / "history.csv", df.to_csv(index=False))
