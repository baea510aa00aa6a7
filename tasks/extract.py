"""Extract CNN codes of a dataset into a feature store, incrementally and crash-safely.

:func:`extract_to_store` is the unit of work behind the ``extract-features``
flow. It runs the backbone only on images the store does not hold yet (by
path and content hash), decodes the next batches (in threads, or processes beside a GPU) while the model
computes the current one, commits each batch to every group before moving on,
and returns a small summary (counts, skips with reasons, timings, paths).
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from storage.errors import ParameterError, StoreError, StoreMismatchError
from storage.manifest import Manifest, Skip
from storage.store import COMPRESSIONS, DTYPES, GroupSpec, StoreWriter, group_name, store_is_current

from . import runtime
from .backbones import POOLINGS, BackboneSpec, Extractor, build_backbone
from .data.images import DEFAULT_MAX_PIXELS, RESIZE_MODES
from .data.audio import Spectrogram
from .data.decode_pool import DECODE_IN, DecodePool, choose as choose_decoding
from .data.inputs import input_identity
from .data.media import AUDIO
from .settings import Settings

EXTRACTOR_VERSION = "1"
Progress = Callable[[int, int], None]


def spec_dict(spec: BackboneSpec) -> dict[str, Any]:
    """The arguments that rebuild ``spec`` (stored with the codes, so `predict` can recompute them)."""
    return spec.as_dict()


def options_dict(o: "ExtractOptions") -> dict[str, Any]:
    """How codes are computed (a task's input): the options without the cut points and the store."""
    return o.model_dump(mode="json", exclude={"layers", "pooling", "store"})


def normalise_cuts(layers: Sequence[str], poolings: Sequence[str] | str) -> list[tuple[str, str]]:
    """Pair layers with poolings: one pooling for all layers, or one per layer.

    A layer may also carry its pooling as ``layer:pooling``."""
    if not layers:
        raise ParameterError("give at least one layer to cut at (--layer NAME); `cnncodes layers BACKBONE` lists them.")
    if isinstance(poolings, str):
        poolings = [poolings]
    poolings = list(poolings) or ["avg"]
    if len(poolings) not in (1, len(layers)):
        raise ParameterError(f"give one pooling for all layers or one per layer; got {len(poolings)} poolings "
                             f"for {len(layers)} layers.")
    cuts = []
    for i, layer in enumerate(layers):
        pooling = poolings[0] if len(poolings) == 1 else poolings[i]
        if ":" in layer:
            layer, pooling = layer.rsplit(":", 1)
        if pooling not in POOLINGS:
            raise ParameterError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r} for layer {layer!r}.")
        if (layer, pooling) not in cuts:
            cuts.append((layer, pooling))
    return cuts


Pooling = Literal[POOLINGS]


class ExtractOptions(Settings):
    """What is extracted (cut points, store) and how codes are computed and stored."""

    layers: list[str] = Field(default_factory=list, description="Keras layer names to cut at (one forward pass "
                                                                 "stores them all); LAYER:POOLING sets its pooling")
    pooling: list[Pooling] | Pooling = Field(
        "avg", description="pooling of the layer outputs: one for all layers or one per layer")
    store: str | None = Field(None, description="HDF5 feature store (default: OUT/stores/<dataset>__<backbone>__"
                                                "<weights>.h5)")
    batch_size: int = Field(32, description="images per forward pass")
    dtype: Literal[DTYPES] = Field("float32", description="storage type of the codes")
    compression: Literal[tuple(c for c in COMPRESSIONS if c)] | None = Field(None, description="HDF5 compression of the codes")
    resize: Literal[RESIZE_MODES] = Field("stretch", description="how images are fitted to the square "
                                                                             "input")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, description="larger images are skipped (decompression bombs)")
    # Threads decoding images. None: every core where a GPU computes (decoding is then the likely
    # bottleneck), at most 4 on a CPU (the cores are busy with the network).
    decode_workers: int | None = Field(None, description="threads or processes decoding images (default: every core beside a "
                                                         "GPU, at most 4 on a CPU)")
    # Threads share Python's GIL with Pillow; processes scale with the cores where a GPU waits for
    # the decoder. auto: processes beside a GPU for large jobs (tasks.data.decode_pool.choose).
    decode_in: Literal[DECODE_IN] = Field("auto", description="decode in threads or processes (auto: processes "
                                                                "beside a GPU for 2,048 inputs or more)")
    # Batches decoded ahead while the model computes; None: 2 where spare cores or a GPU can take
    # the decoding, 0 on a small CPU (decoding beside the model there only slows both down).
    prefetch_batches: int | None = Field(None, description="batches decoded ahead while the model computes")
    xla: bool = Field(False, description="compile the forward pass with XLA (the same codes; faster on GPUs)")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("compression") in ("none", ""):
            data = {**data, "compression": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ExtractOptions":
        if not 1 <= self.batch_size <= 4096:
            raise ParameterError(f"batch_size must be an integer in [1, 4096]; got {self.batch_size!r}.")
        if self.max_pixels < 1:
            raise ParameterError(f"max_pixels must be a positive integer; got {self.max_pixels!r}.")
        if self.decode_workers is not None and self.decode_workers < 1:
            raise ParameterError(f"decode_workers must be at least 1; got {self.decode_workers!r}.")
        if self.prefetch_batches is not None and not 0 <= self.prefetch_batches <= 64:
            raise ParameterError(f"prefetch_batches must be in [0, 64]; got {self.prefetch_batches!r}.")
        return self

    def cuts(self) -> list[tuple[str, str]]:
        """The (layer, pooling) pairs to extract."""
        return normalise_cuts(self.layers, self.pooling)


def _versions() -> dict[str, str]:
    """The libraries that computed the codes: the Keras backend by name and version, Keras, h5py, NumPy."""
    import h5py

    return {"cnncodes_extractor": EXTRACTOR_VERSION, **runtime.library_versions(), "h5py": h5py.__version__,
            "numpy": np.__version__}


def _backends(store: Path, backend: str) -> list[str]:
    """Every backend that has computed codes of ``store``, this run's included. Codes of one network, weights and
    precision agree across backends (float32: within 1e-4, ``tests/test_backends.py``), so one store may hold
    rows from several; seeded random weights differ by backend, and their digest keeps such stores apart."""
    seen: list[str] = []
    if store.exists():
        from storage.store import open_store

        try:
            seen = list(open_store(store).provenance.get("backends") or [])
        except (StoreError, OSError):
            seen = []
    return sorted(set(seen) | {backend})


@contextmanager
def _explained_mismatch(store: Path, spec: BackboneSpec, backends: list[str], backend: str) -> Iterator[None]:
    """A store of seeded random weights refused because its weights differ: say why, where the store was made
    on another backend (each backend draws random weights with its own generator, so one seed gives other
    weights on each; the weights digest keeps their codes apart)."""
    try:
        yield
    except StoreMismatchError as exc:
        others = [b for b in backends if b != backend]
        if spec.weights != "none" or not others or "weights_digest" not in str(exc):
            raise
        raise StoreMismatchError(
            f"{exc} The store's codes come from seeded random weights drawn on the {' and '.join(others)} "
            f"backend; each backend draws its own random weights from the same seed, so this {backend} run's "
            f"differ. Extend it with --backend {others[0]}, or save the weights once to a file (--weights FILE) "
            "to share them across backends.") from exc


def decode_workers(options: ExtractOptions) -> int:
    """Decoding threads or processes: as set, else every core beside a GPU, at most 4 on a CPU."""
    if options.decode_workers:
        return options.decode_workers
    cores = os.cpu_count() or 1
    return max(1, cores if runtime.gpus() else min(4, cores))


def decode_mode(options: ExtractOptions, inputs: int) -> str:
    """``threads`` or ``processes`` for ``inputs`` files (see :func:`tasks.data.decode_pool.choose`)."""
    return choose_decoding(options.decode_in, decode_workers(options), inputs, bool(runtime.gpus()))


def decoded_batches(manifest: Manifest, todo: Sequence[int], size: int, options: ExtractOptions,
                    spectrogram: Spectrogram | None = None
                    ) -> Iterator[tuple[list[int], list[np.ndarray], list[int], list[Skip]]]:
    """Yield ``(indices, arrays, decoded indices, skips)`` per batch of ``todo``, decoding in threads or
    processes (:func:`decode_mode`; images, or sound drawn as spectrograms with the recipe
    ``spectrogram``, by ``manifest.media``).

    With ``prefetch_batches`` > 0 the next batches decode while the caller computes; with 0 each
    batch is decoded (still in parallel) only when the caller asks for it."""
    ahead = options.prefetch_batches
    if ahead is None:
        ahead = 2 if runtime.gpus() or (os.cpu_count() or 1) > 4 else 0
    batches = iter([list(todo[i:i + options.batch_size]) for i in range(0, len(todo), options.batch_size)])
    with DecodePool(manifest.media, size, options.resize, options.max_pixels, spectrogram,
                    workers=decode_workers(options), mode=decode_mode(options, len(todo))) as pool:
        pending: deque[tuple[list[int], Callable[[], list]]] = deque()

        def submit_next() -> None:
            idx = next(batches, None)
            if idx is not None:
                pending.append((idx, pool.submit([manifest.abspath(manifest.samples[i]) for i in idx])))

        for _ in range(ahead + 1):
            submit_next()
        while pending:
            idx, wait = pending.popleft()
            arrays, ok, skips = [], [], []
            for i, res in zip(idx, wait()):
                if isinstance(res, np.ndarray):
                    arrays.append(res)
                    ok.append(i)
                else:
                    skips.append(Skip(manifest.samples[i].path, str(res)))
            if ahead:
                submit_next()
            yield idx, arrays, ok, skips
            if not ahead:
                submit_next()


def _store_meta(store: Path, spec: BackboneSpec, manifest: Manifest, backbone, extractor: Extractor) -> dict[str, Any]:
    """The provenance a store records of this extraction (beside its identity)."""
    meta = {"spec": spec_dict(spec), "dataset": manifest.root, "layout": manifest.layout, "split_seed": manifest.split_seed,
            "split_fractions": manifest.split_fractions, "split_group_by": manifest.group_by, "versions": _versions(),
            "backend": extractor.backend, "backends": _backends(store, extractor.backend),
            "backbone_layers": len(backbone.model.layers), "media": manifest.media}
    if manifest.media == AUDIO:
        meta["spectrogram"] = spec.spectrogram.as_dict()
    return meta


def _compute_and_append(writer: StoreWriter, plan, todo: Sequence[int], specs: Sequence[GroupSpec],
                        manifest: Manifest, size: int, extractor: Extractor, spec: BackboneSpec,
                        options: ExtractOptions, progress: Progress | None, timings: dict[str, float]) -> list[Skip]:
    """Decode the images of ``todo``, run them through the network and append each group's new rows; the
    forward pass's and the writes' seconds are added to ``timings``. Returns the files that did not decode."""
    need = {s.name: set(plan.todo[s.name]) for s in specs}
    decode_skips: list[Skip] = []
    if progress:
        progress(0, len(todo))
    done = 0
    for idx, arrays, ok, skips in decoded_batches(manifest, todo, size, options, spec.spectrogram):
        decode_skips.extend(skips)
        if ok:
            t = time.perf_counter()
            outputs = extractor(np.stack(arrays))
            timings["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            for g, feats in zip(specs, outputs):
                rows = [k for k, i in enumerate(ok) if i in need[g.name]]
                if rows:
                    samples = [manifest.samples[ok[k]] for k in rows]
                    writer.append(g.name, [s.path for s in samples], [s.sha256 for s in samples],
                                  [s.label for s in samples], [s.split for s in samples], feats[rows])
            timings["write"] += time.perf_counter() - t
        done += len(idx)
        if progress:
            progress(done, len(todo))
    return decode_skips


def extract_to_store(manifest: Manifest, store: str | os.PathLike, spec: BackboneSpec,
                     cuts: Sequence[tuple[str, str]], options: ExtractOptions | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Bring ``store`` up to date with ``manifest`` for every (layer, pooling) in ``cuts``.

    Returns a summary dict: ``computed`` (images run through the backbone),
    ``reused``, ``removed``, ``skipped`` (list of {path, reason}), ``groups``,
    ``timings`` (seconds) and ``store``. Raises BackboneError, ParameterError,
    StoreMismatchError or StoreLockedError before writing anything.
    """
    t0 = time.perf_counter()
    options = options or ExtractOptions()
    store = Path(store)
    spec = _resolve_for_store(spec, store)
    cuts = list(cuts)
    config = input_identity(dict(spec.identity(), resize=options.resize), manifest.media, spec.spectrogram)
    manifest_fp = manifest.fingerprint()

    if store_is_current(store, config, cuts, manifest_fp, options.dtype):
        from storage.store import FeatureStore

        recorded = FeatureStore(store).provenance.get("skipped") or []
        write_groups(store, manifest)
        return _summary(store, cuts, manifest, computed=0, removed=0, up_to_date=True,
                        skipped=[{"path": p, "reason": r} for p, r in recorded],
                        timings={"total": time.perf_counter() - t0}, config=config)

    t_build = time.perf_counter()
    backbone = build_backbone(spec)
    extractor = Extractor(backbone, cuts, xla=options.xla)
    identity = input_identity(dict(backbone.identity(), resize=options.resize), manifest.media, spec.spectrogram)
    build_s = time.perf_counter() - t_build
    specs = [GroupSpec(layer, pooling, shape, options.dtype, options.compression)
             for (layer, pooling), shape in zip(cuts, extractor.shapes)]
    meta = _store_meta(store, spec, manifest, backbone, extractor)
    timings = {"build": build_s, "forward": 0.0, "write": 0.0}
    with _explained_mismatch(store, spec, meta["backends"], extractor.backend), \
            StoreWriter(store, identity, specs, meta) as writer:
        plan = writer.plan(manifest)
        todo = plan.union()
        writer.start_appending()
        decode_skips = _compute_and_append(writer, plan, todo, specs, manifest, backbone.size, extractor, spec,
                                           options, progress, timings)
        recorded = Manifest(manifest.root, manifest.layout, manifest.class_names, manifest.samples,
                            manifest.split_seed, manifest.split_fractions, list(manifest.skipped) + decode_skips,
                            manifest.media, manifest.groups)
        writer.finish(recorded)
        recovered = writer.recovered
    write_groups(store, manifest)
    timings["total"] = time.perf_counter() - t0
    skipped = [{"path": s.path, "reason": s.reason} for s in recorded.skipped]
    out = _summary(store, cuts, manifest, computed=extractor.images_seen, removed=max(plan.removed.values(), default=0),
                   up_to_date=False, skipped=skipped, timings=timings, config=identity)
    out["recovered_after_crash"] = recovered
    out["relabelled"] = max(plan.relabelled.values(), default=0)
    out["weights_digest"] = identity["weights_digest"]
    out["device"] = runtime.device_name()
    out["backend"] = extractor.backend
    out["precision"] = spec.precision
    out["decode_workers"] = decode_workers(options)
    out["decode_in"] = decode_mode(options, len(todo))
    return out


def groups_path(store: str | os.PathLike) -> Path:
    """The file beside a store that names each row's group (``{path: group}``), for grouped cross-validation."""
    return Path(str(store) + ".groups.json")


def write_groups(store: str | os.PathLike, manifest: Manifest) -> None:
    """Beside ``store``, the group of each of the manifest's files (removed when it has none), so that the
    layer sweep and the C search cross-validate by group: a speaker's recordings never sit on both sides of
    a fold, as they never sit on both sides of the split."""
    import json

    from storage.files import atomic_write

    path = groups_path(store)
    if not manifest.groups:
        path.unlink(missing_ok=True)
        return
    atomic_write(path, json.dumps(manifest.groups))


def _resolve_for_store(spec: BackboneSpec, store: Path) -> BackboneSpec:
    """Precision 'auto' keeps an existing store's precision where this machine runs it fast (a store
    made on a GPU in float16 and brought up to date there, or made in float32 on a CPU and extended on
    a GPU, stays consistent); else float16 on a GPU, float32 on a CPU. The store records what ran."""
    if spec.precision != "auto":
        return spec
    if store.exists():
        from storage.store import open_store

        try:
            recorded = open_store(store).provenance.get("precision")
        except (StoreError, OSError):  # a damaged store is reported by the writer, with its own message
            recorded = None
        if recorded in runtime.CONCRETE_PRECISIONS:
            try:
                runtime.check_precision(recorded)
                return spec.model_copy(update={"precision": recorded})
            except ParameterError:
                pass
    return spec.resolved()


def _summary(store: Path, cuts, manifest: Manifest, *, computed: int, removed: int, up_to_date: bool,
             skipped: list[dict], timings: dict, config: dict) -> dict[str, Any]:
    from storage.store import FeatureStore

    groups = {g["group"]: g for g in FeatureStore(store).groups()}
    rows = {group_name(layer, pooling): int(groups.get(group_name(layer, pooling), {}).get("rows", 0))
            for layer, pooling in cuts}
    forward = timings.get("forward") or 0.0
    return {
        "store": str(store.resolve()),
        "groups": [{"layer": layer, "pooling": pooling, "group": group_name(layer, pooling),
                    "rows": rows[group_name(layer, pooling)],
                    "feature_shape": groups.get(group_name(layer, pooling), {}).get("feature_shape")}
                   for layer, pooling in cuts],
        "images": len(manifest.samples),
        "classes": list(manifest.class_names),
        "counts": manifest.counts(),
        "computed": computed,
        "reused": max(0, min(rows.values(), default=0) - computed) if not up_to_date else min(rows.values(), default=0),
        "removed": removed,
        "up_to_date": up_to_date,
        "skipped": skipped,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "images_per_s": round(computed / timings["total"], 2) if computed and timings.get("total") else None,
        "forward_images_per_s": round(computed / forward, 2) if computed and forward else None,
        "backbone": config.get("backbone"),
        "weights": config.get("weights"),
        "manifest_fingerprint": manifest.fingerprint(),
    }


# --------------------------------------------------------------------------- shards
def shard_of(path: str, shards: int) -> int:
    """A stable shard for an image path: the same image stays in the same shard as the dataset grows."""
    import hashlib

    return int(hashlib.sha256(path.encode("utf-8")).hexdigest()[:8], 16) % shards


def shard_store_paths(store: str | os.PathLike, shards: int) -> list[Path]:
    store = Path(store)
    return [store.parent / f"{store.stem}.shards" / f"shard-{i:03d}-of-{shards:03d}.h5" for i in range(shards)]


def shard_manifest(manifest: Manifest, index: int, shards: int) -> Manifest:
    return Manifest(manifest.root, manifest.layout, list(manifest.class_names),
                    [s for s in manifest.samples if shard_of(s.path, shards) == index],
                    manifest.split_seed, dict(manifest.split_fractions),
                    [k for k in manifest.skipped if shard_of(k.path, shards) == index], manifest.media,
                    manifest.groups)


def require_gpus(n: int) -> None:
    """ParameterError unless the backend sees at least ``n`` GPUs in this process."""
    seen = len(runtime.gpus())
    if seen < n:
        name = runtime.backend()
        raise ParameterError(f"--gpus {n} was given but {runtime.DISPLAY[name]} sees {seen} GPU(s) here. Install "
                             f"{runtime.CUDA_BUILD[name]} and check nvidia-smi, or run without --gpus.")


def gpu_for_shard(index: int, gpus: int) -> int:
    """The GPU a shard runs on: this worker's own (a Dask worker of a local cluster is named 0..n-1,
    and worker k takes GPU k % gpus, so two workers never share one by chance and a worker never has
    to move); the one this process is already pinned to; else shard ``index`` % ``gpus``."""
    if runtime.pinned_gpu() is not None:
        return runtime.pinned_gpu()
    try:
        from distributed import get_worker

        name = get_worker().name
        if isinstance(name, int):
            return name % gpus
    except (ImportError, ValueError):  # not inside a Dask worker
        pass
    return index % gpus


def extract_shard(manifest: Manifest, store: str | os.PathLike, index: int, shards: int, spec: BackboneSpec,
                  cuts: Sequence[tuple[str, str]], options: ExtractOptions | None = None,
                  threads: int | None = None, progress: Progress | None = None,
                  gpu: int | None = None) -> dict[str, Any]:
    """Extract shard ``index`` of ``shards`` into its own store file (run by one worker each).

    ``threads`` caps TensorFlow's compute threads in this process and ``gpu`` pins it to one GPU
    (``CUDA_VISIBLE_DEVICES``); both take effect only where TensorFlow has not started yet in the
    worker process, so give each worker its own GPU when starting it where that matters."""
    if "tensorflow" not in sys.modules and threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    pinned = None
    if gpu is not None:
        runtime.pin_gpu(gpu)                # a clear error where this worker cannot be pinned
        pinned = runtime.check_pinned(gpu)  # and one where TensorFlow then sees not exactly that GPU
    path = shard_store_paths(store, shards)[index]
    out = extract_to_store(shard_manifest(manifest, index, shards), path, spec, cuts, options, progress)
    out["shard"] = index
    out["pinned"] = pinned
    return out


def finish_sharded(store: str | os.PathLike, shards: int, manifest: Manifest, parts: Sequence[dict[str, Any]]
                   ) -> dict[str, Any]:
    """Write the index that presents the shards as one store; return a summary over all shards."""
    from storage.format import write_index
    from storage.store import FeatureStore, open_store

    paths = shard_store_paths(store, shards)
    first = FeatureStore(paths[0]).provenance
    write_index(store, paths, {k: first.get(k) for k in ("backbone", "backbone_args", "weights", "weights_digest",
                                                          "input_size", "preprocessing", "precision", "class_names")
                               if first.get(k) is not None})
    write_groups(store, manifest)  # beside the index: grouped folds for a sharded store too
    timings: dict[str, float] = {}
    for p in parts:
        for k, v in p["timings"].items():
            timings[k] = max(timings.get(k, 0.0), v)  # shards ran side by side: the slowest one is the wall time
    fs = open_store(store)
    groups = {g["group"]: g for g in fs.groups()}
    computed = sum(p["computed"] for p in parts)
    return {
        "store": str(Path(store).resolve()), "shards": [str(p) for p in paths],
        "groups": [{**g, "rows": groups[g["group"]]["rows"]} for g in parts[0]["groups"]],
        "images": len(manifest.samples), "classes": list(manifest.class_names), "counts": manifest.counts(),
        "computed": computed, "reused": sum(p["reused"] for p in parts), "removed": sum(p["removed"] for p in parts),
        "up_to_date": all(p["up_to_date"] for p in parts),
        "skipped": [s for p in parts for s in p["skipped"]], "timings": timings,
        "images_per_s": round(computed / timings["total"], 2) if computed and timings.get("total") else None,
        "forward_images_per_s": None, "backbone": parts[0]["backbone"], "weights": parts[0]["weights"],
        "manifest_fingerprint": manifest.fingerprint(), "per_shard": [
            {"shard": p["shard"], "images": p["images"], "computed": p["computed"], "seconds": p["timings"]["total"]}
            for p in parts]}
