"""A model registry on the local filesystem: trained classifiers with their metadata.

Layout::

    <root>/<name>/v1/model.joblib        a scikit-learn pipeline saved with joblib
                    /metadata.json       what it was trained on, the model file's sha256, ...
    <root>/<name>/v2/model.keras         any other file, copied in under its own name
                    /metadata.json
    <root>/<name>/aliases.json           {"champion": 2, ...}
    <root>/<name>/.v3.incomplete/        a save in progress (or one that crashed): never listed
    <root>/<name>/.v4.deleted/           an empty tombstone: version 4 was deleted, its number is not reused

Versions are integers 1, 2, 3, ... A save reserves its number by creating
``.v<N>.incomplete`` with ``os.mkdir`` (which fails if another save holds it;
the save then tries ``N + 1``), writes the model and ``metadata.json`` there and
renames the directory to ``v<N>``. A crash therefore never leaves a half-written
``v<N>`` behind, and two processes or threads saving at once get distinct versions.

Loading verifies the model file's sha256 against ``metadata.json`` *before*
unpickling it: a joblib file is code, so a file that changed since it was saved
is refused with :class:`TamperedModelError` and never executed. The hash sits
beside the file, so this is an integrity check (corruption, a swapped or edited
model file), not proof of who wrote the registry: someone able to rewrite both
files can defeat it. Load only registries you trust.

This module imports neither TensorFlow, Keras, Prefect nor scikit-learn
(``joblib.load`` of a saved pipeline imports scikit-learn when it runs).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import numbers
import os
import platform
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import joblib
import numpy as np

from .errors import CnncodesError
from .files import FileLock, FileLockBusy, atomic_write_json, fsync_dir, now_iso
from .hashing import file_sha256, fingerprint

REGISTRY_FORMAT = "cnncodes-registry/2"  # /2: metadata.json carries its own checksum (/1 did not)
UNCHECKED_FORMAT = "cnncodes-registry/1"  # never released: refused with how to write it anew
METADATA_SUM = "metadata_sha256"  # metadata.json: sha256 of its other keys (storage.hashing.fingerprint)
ALIASES_SUM = "_sha256"  # aliases.json: the same over the aliases (no alias can start with "_")
SPLITS_SUM = "sha256"  # splits.json (format 2 on) and each line of history.jsonl
SPLITS_FORMAT = 2
METADATA_FILE = "metadata.json"
ALIASES_FILE = "aliases.json"
SPLITS_FILE = "splits.json"
HISTORY_FILE = "history.jsonl"
JOBLIB_FILE = "model.joblib"
NAME_RULE = ("1 to 100 characters: letters, digits, '.', '_' or '-', starting with a letter or a digit")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION_DIR_RE = re.compile(r"^v([1-9][0-9]*)$")
_VERSION_STR_RE = re.compile(r"^[vV]?([0-9]+)$")
_RESERVED_DIR_RE = re.compile(r"^(?:v|\.v)([1-9][0-9]*)(?:\.incomplete|\.deleted)?$")
# Keys the registry writes into metadata.json itself; a caller's metadata may not set them.
RESERVED_KEYS = ("registry_format", "name", "version", "created", "model_file", "model_sha256", "model_kind",
                 "libraries", METADATA_SUM)
# Keys check_compatible compares, in the order its messages list them.
COMPAT_KEYS = ("class_names", "feature_dim", "backbone", "layer", "pooling", "weights_digest", "preprocessing",
               "input_size")
# Libraries whose version is recorded only when the process already imported them (never imported here).
_OPTIONAL_LIBRARIES = (("sklearn", "sklearn"), ("tensorflow", "tensorflow"), ("keras", "keras"), ("jax", "jax"),
                       ("torch", "torch"))


class RegistryError(CnncodesError):
    """A model registry cannot be read or written as asked (unknown name, version or alias, bad name...)."""


class ModelMismatchError(RegistryError):
    """A model was trained on other codes (classes, feature size, backbone, layer...) than the ones given."""


class TamperedModelError(RegistryError):
    """A saved model's file or metadata is missing, unreadable or not what was saved: it is not loaded."""


def _summed(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """``obj`` with ``key`` set to the checksum of its other keys (what is written)."""
    body = {k: v for k, v in obj.items() if k != key}
    return {**body, key: fingerprint(body)}


def _sum_ok(obj: dict[str, Any], key: str) -> bool | None:
    """True when ``obj[key]`` is the checksum of the rest, False when it is not, None when there is none."""
    if key not in obj:
        return None
    return obj[key] == fingerprint({k: v for k, v in obj.items() if k != key})


def _near(name: str, key: str) -> bool:
    """True when ``name`` is ``key`` with one character changed (a checksum key whose name was damaged)."""
    return len(name) == len(key) and name != key and sum(a != b for a, b in zip(name, key)) == 1


def _read_json(path: Path, what: str, advice: str) -> Any:
    """The JSON in ``path`` (FileNotFoundError passes), or RegistryError naming the file and saying what to do."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RegistryError(f"cannot read {what} {path}: {exc}.") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, or not JSON: cut short or overwritten
        raise RegistryError(f"{what} {path} is not valid JSON ({exc}): it is damaged (cut short or "
                            f"overwritten). {advice}") from None


def _check_name(name: Any, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(f"invalid {what} {name!r}: it must be {NAME_RULE}.")
    return name


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _normalise(value: Any) -> Any:
    """The form a value takes after a round trip through metadata.json (tuples become lists, ...)."""
    return json.loads(json.dumps(value, default=_json_default))


def _library_versions() -> dict[str, str]:
    """Versions of python, numpy and joblib, and of sklearn/tensorflow/keras/jax/torch only if already imported;
    with Keras imported, ``keras_backend`` names the backend that computed (tensorflow, jax or torch)."""
    out = {"python": platform.python_version(), "numpy": np.__version__, "joblib": joblib.__version__}
    for key, module in _OPTIONAL_LIBRARIES:
        mod = sys.modules.get(module)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if version is not None:
            out[key] = str(version)
    keras = sys.modules.get("keras")
    backend = getattr(getattr(keras, "backend", None), "backend", None)
    if callable(backend):
        out["keras_backend"] = str(backend())
    return out


@dataclass
class ModelRecord:
    """One saved version of a model: where it is and what ``metadata.json`` says about it."""

    name: str
    version: int
    path: Path
    metadata: dict

    def __repr__(self) -> str:
        return f"ModelRecord({self.name!r}, v{self.version}, {str(self.path)!r})"

    @property
    def model_path(self) -> Path:
        """The model file inside the version directory."""
        return self.path / self.metadata["model_file"]

    @property
    def model_kind(self) -> str:
        return str(self.metadata.get("model_kind", ""))

    def check_compatible(self, *, class_names=None, feature_dim=None, backbone=None, layer=None, pooling=None,
                         weights_digest=None, preprocessing=None, input_size=None) -> None:
        """Raise :class:`ModelMismatchError` unless every given value equals the model's metadata.

        Values left as ``None`` are not checked, nor are keys absent from the
        metadata (a model saved without them). Values are compared in the form
        they have in ``metadata.json`` (a tuple equals a list, a NumPy integer an
        int); the order of ``class_names`` matters, since it maps label indices
        to classes. The message names every differing field with both values.
        """
        given = dict(class_names=class_names, feature_dim=feature_dim, backbone=backbone, layer=layer,
                     pooling=pooling, weights_digest=weights_digest, preprocessing=preprocessing,
                     input_size=input_size)
        problems = []
        for key in COMPAT_KEYS:
            value = given[key]
            if value is None or key not in self.metadata:
                continue
            have = self.metadata[key]
            try:
                value = _normalise(value)
            except (TypeError, ValueError) as exc:
                raise RegistryError(f"cannot compare {key}={value!r} with model {self.name!r} v{self.version}: "
                                    f"{exc}. Pass plain values (str, int, lists).") from None
            if value == have:
                continue
            line = f"{key}: model has {have!r}, given {value!r}"
            if key == "class_names" and isinstance(have, list) and isinstance(value, list):
                missing = [c for c in have if c not in value]
                extra = [c for c in value if c not in have]
                if not missing and not extra:
                    line += " (same classes in another order: label indices would mean other classes)"
                else:
                    parts = []
                    if missing:
                        parts.append(f"not given: {missing}")
                    if extra:
                        parts.append(f"unknown to the model: {extra}")
                    line += f" ({'; '.join(parts)})"
            problems.append((key, line))
        if not problems:
            return
        keys = {k for k, _ in problems}
        advice = []
        if keys & {"feature_dim", "backbone", "layer", "pooling", "weights_digest", "preprocessing",
                   "input_size"}:
            advice.append("re-extract the codes with the model's backbone, weights, layer, pooling, preprocessing "
                          "and input size")
        if "class_names" in keys:
            advice.append("use codes of a dataset with the model's classes in the model's order")
        raise ModelMismatchError(
            f"model {self.name!r} v{self.version} ({self.path}) was trained on other codes than these:\n  "
            + "\n  ".join(line for _, line in problems)
            + f"\nTo use this model, {' and '.join(advice)}; or train a new model on these codes.")



def _what_to_do(exc: BaseException, where: Path) -> str:
    """What a user can do about a full disk or a denied permission met while saving (else nothing)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return " The disk is full: free space there, then run the same command again."
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f" Give the user running cnncodes write permission on {where}, or use another registry "
                "(--registry), then run the same command again.")
    return ""

class ModelRegistry:
    """Trained models, by name and integer version, with metadata and aliases such as "champion".

    >>> reg = ModelRegistry("models")                                  # doctest: +SKIP
    >>> rec = reg.save("flowers-probe", pipeline, {"class_names": names, "feature_dim": 1280})  # doctest: +SKIP
    >>> reg.set_alias("flowers-probe", "champion", rec.version)       # doctest: +SKIP
    >>> model, rec = reg.load("flowers-probe", "champion", expect={"feature_dim": 1280})  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    # -- listing -------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / _check_name(name)

    def names(self) -> list[str]:
        """Names with at least one version, sorted. An absent root has none."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RegistryError(f"cannot list model registry {self.root}: {exc}.") from exc
        return [e for e in entries if _NAME_RE.match(e) and (self.root / e).is_dir() and self.versions(e)]

    def _known_names(self) -> str:
        return ", ".join(self.names()) or "none"

    def versions(self, name: str) -> list[int]:
        """Finished versions of ``name``, ascending; empty if there are none. Saves in progress are not listed."""
        d = self._dir(name)
        try:
            entries = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise RegistryError(f"cannot list versions of model {name!r} in {d}: {exc}.") from exc
        out = []
        for e in entries:
            m = _VERSION_DIR_RE.match(e)
            if m and (d / e).is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self, name: str) -> int:
        """The highest version of ``name``; RegistryError listing the known names if it has none."""
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no saved model named {name!r} in registry {self.root} "
                                f"(models there: {self._known_names()}).")
        return versions[-1]

    # -- resolving and reading -------------------------------------------------
    def _resolve(self, name: str, version: int | str | None) -> int:
        """The integer version meant by ``version``: None -> latest, an int, "v3"/"3", or an alias."""
        if version is None:
            return self.latest(name)
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no saved model named {name!r} in registry {self.root} "
                                f"(models there: {self._known_names()}).")
        have = ", ".join(f"v{v}" for v in versions)
        if isinstance(version, numbers.Integral) and not isinstance(version, bool):
            n = int(version)
        elif isinstance(version, str):
            aliases = self.aliases(name)
            if version in aliases:
                n = aliases[version]
                if n not in versions:
                    raise RegistryError(f"alias {version!r} of model {name!r} points to v{n}, which does not "
                                        f"exist (versions: {have}). Point it elsewhere with set_alias.")
                return n
            m = _VERSION_STR_RE.match(version.strip())
            if not m:
                known = ", ".join(sorted(aliases)) or "none"
                raise RegistryError(f"model {name!r} has no alias {version!r} (aliases: {known}; versions: "
                                    f"{have}). Give a version number, 'v<N>', or one of the aliases.")
            n = int(m.group(1))
        else:
            raise RegistryError(f"version must be an int, 'v<N>' or an alias name, not {version!r}.")
        if n not in versions:
            raise RegistryError(f"model {name!r} has no version {n} (versions: {have}).")
        return n

    def record(self, name: str, version: int | str | None = None) -> ModelRecord:
        """The record of one version: None is the latest, a str is an alias ("champion") or "v3"/"3".

        Raises RegistryError for an unknown name, version or alias (listing what
        exists) and TamperedModelError if ``metadata.json`` is missing, not valid
        JSON, or does not describe this name and version.
        """
        n = self._resolve(name, version)
        path = self._dir(name) / f"v{n}"
        meta_path = path / METADATA_FILE
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError:
            raise TamperedModelError(f"model {name!r} v{n} has no {METADATA_FILE} ({meta_path}): the version "
                                     "directory was not written by the registry or was damaged. Delete it "
                                     "and save the model again.") from None
        except OSError as exc:
            raise TamperedModelError(f"cannot read {meta_path}: {exc}.") from exc
        try:
            meta = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise TamperedModelError(f"{meta_path} is not valid JSON ({exc}): the metadata of model {name!r} "
                                     f"v{n} was damaged or edited. Delete the version and save the model again."
                                     ) from None
        problems = []
        if not isinstance(meta, dict):
            problems.append("it is not a JSON object")
        else:
            summed = _sum_ok(meta, METADATA_SUM)
            if summed is False:
                problems.append(f"its {METADATA_SUM} is not the checksum of its contents (the file was damaged or "
                                "edited after the save)")
            elif summed is None and meta.get("registry_format") == UNCHECKED_FORMAT:
                problems.append(f"it is in registry format 1, written before metadata carried a checksum by a "
                                "cnncodes that was never released; save the model again (train-linear, fine-tune "
                                "or transfer on its data) to write it in the current format")
            elif summed is None:
                problems.append(f"its checksum ({METADATA_SUM}) is missing although its format "
                                f"{meta.get('registry_format')!r} writes one")
            if meta.get("name") != name or meta.get("version") != n:
                problems.append(f"it describes {meta.get('name')!r} v{meta.get('version')}, not {name!r} v{n}")
            model_file = meta.get("model_file")
            if (not isinstance(model_file, str) or model_file in ("", ".", "..", METADATA_FILE)
                    or "/" in model_file or "\\" in model_file or model_file != os.path.basename(model_file)):
                problems.append(f"model_file {model_file!r} is not a file name inside the version directory")
            sha = meta.get("model_sha256")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                problems.append(f"model_sha256 {sha!r} is not a sha256 hex digest")
        if problems:
            raise TamperedModelError(f"{meta_path} is not the registry's metadata of model {name!r} v{n}: "
                                     + "; ".join(problems) + ". Delete the version and save the model again.")
        return ModelRecord(name=name, version=n, path=path, metadata=meta)

    def load(self, name: str, version: int | str | None = None, *,
             expect: dict | None = None) -> tuple[object, ModelRecord]:
        """Load one version: ``(model, record)`` for joblib models, ``(path of the file, record)`` otherwise.

        The model file's sha256 is checked against the metadata *before* it is
        unpickled; a missing or changed file raises TamperedModelError and
        nothing in it runs (a joblib file is read once into memory, hashed and
        unpickled from those bytes, so it cannot change in between). Then
        ``expect`` (keys of :meth:`ModelRecord.check_compatible`) is checked:
        ModelMismatchError if the model was trained on other codes.
        """
        rec = self.record(name, version)
        if expect is not None:
            unknown = sorted(set(expect) - set(COMPAT_KEYS))
            if unknown:
                raise RegistryError(f"cannot check {unknown} against a model: expect takes "
                                    f"{', '.join(COMPAT_KEYS)}.")
        path = rec.model_path
        joblib_kind = rec.model_kind == "joblib"
        try:
            if joblib_kind:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
            else:
                digest = file_sha256(path)
        except FileNotFoundError:
            raise TamperedModelError(f"the model file of {name!r} v{rec.version} is missing ({path}): it was "
                                     "deleted or moved after the save. Restore it, or delete this version "
                                     "and save the model again.") from None
        except OSError as exc:
            raise TamperedModelError(f"cannot read the model file of {name!r} v{rec.version} ({path}): {exc}."
                                     ) from exc
        if digest != rec.metadata["model_sha256"]:
            raise TamperedModelError(
                f"the model file of {name!r} v{rec.version} ({path}) is not the one that was saved: its sha256 "
                f"is {digest}, the metadata says {rec.metadata['model_sha256']}. It was not loaded (a joblib "
                "file runs code when loaded). Restore the original file, or delete this version and save the "
                "model again.")
        if expect:
            rec.check_compatible(**expect)
        if not joblib_kind:
            return path, rec
        try:
            model = joblib.load(io.BytesIO(data))
        except Exception as exc:  # the bytes are what was saved: a missing library or an incompatible version
            libs = rec.metadata.get("libraries", {})
            raise RegistryError(f"cannot unpickle model {name!r} v{rec.version} ({path}): "
                                f"{type(exc).__name__}: {exc}. It was saved with {libs}; install those "
                                "versions or retrain the model.") from exc
        return model, rec

    # -- writing -------------------------------------------------------------
    def save(self, name: str, model: object | None = None, metadata: dict | None = None, *,
             file: str | os.PathLike | None = None) -> ModelRecord:
        """Save a new version of ``name`` and return its record.

        Give either ``model`` (pickled with joblib to ``model.joblib``) or
        ``file`` (an existing file, e.g. a ``.keras`` model, copied in under its
        own name). ``metadata.json`` holds everything in ``metadata`` (which must
        be JSON serialisable; NumPy scalars and arrays are converted) plus name,
        version, created (UTC ISO), model_file, model_sha256 (of the file as
        written), model_kind ("joblib" or the file's suffix) and libraries
        (python, numpy, joblib; sklearn, tensorflow, keras, jax, torch only if
        already imported, and keras_backend where Keras is). Nothing is visible under ``v<N>`` until all of it is written;
        a failed save leaves no trace but a skipped version number at worst.
        """
        _check_name(name)
        if (model is None) == (file is None):
            raise RegistryError(f"save({name!r}, ...) needs exactly one of `model` (an object to pickle with "
                                "joblib) or `file=` (a model file to copy, e.g. a .keras file).")
        metadata = dict(metadata or {})
        clash = sorted(set(metadata) & set(RESERVED_KEYS))
        if clash:
            raise RegistryError(f"metadata keys {clash} are written by the registry itself; rename them "
                                f"(reserved: {', '.join(RESERVED_KEYS)}).")
        bad_keys = [k for k in metadata if not isinstance(k, str)]
        if bad_keys:
            raise RegistryError(f"metadata keys must be strings, not {bad_keys!r}.")
        try:
            metadata = _normalise(metadata)
        except (TypeError, ValueError) as exc:
            bad = []
            for k, v in metadata.items():
                try:
                    _normalise(v)
                except (TypeError, ValueError):
                    bad.append(k)
            raise RegistryError(f"metadata of {name!r} is not JSON serialisable ({exc}; keys {bad}). Store "
                                "plain values: str, numbers, bools, lists and dicts of them.") from None
        src = None
        if file is not None:
            src = Path(file)
            if not src.is_file():
                raise RegistryError(f"cannot save {name!r} from {src}: it is not an existing file.")
            if src.name == METADATA_FILE:
                raise RegistryError(f"cannot save a file named {METADATA_FILE!r} as a model: the registry "
                                    "writes its own. Rename the file.")

        d = self._dir(name)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create {d} for model {name!r}: {exc}.") from exc
        n, tmp = self._reserve(d)
        try:
            if src is None:
                model_file = JOBLIB_FILE
                kind = "joblib"
                with open(tmp / model_file, "wb") as fh:
                    joblib.dump(model, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                model_file = src.name
                kind = src.suffix[1:].lower() if src.suffix else "file"
                shutil.copyfile(src, tmp / model_file)
            meta = dict(metadata)
            meta.update(registry_format=REGISTRY_FORMAT, name=name, version=n, created=now_iso(),
                        model_file=model_file, model_sha256=file_sha256(tmp / model_file), model_kind=kind,
                        libraries=_library_versions())
            meta = _summed(_normalise(meta), METADATA_SUM)
            atomic_write_json(tmp / METADATA_FILE, meta, indent=1, sort_keys=True)
            fsync_dir(tmp)
            os.rename(tmp, d / f"v{n}")
            fsync_dir(d)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, CnncodesError) or not isinstance(exc, Exception):
                raise
            raise RegistryError(f"cannot save model {name!r} to {d}: {type(exc).__name__}: {exc}. "
                                f"Nothing was saved.{_what_to_do(exc, d)}") from exc
        return ModelRecord(name=name, version=n, path=d / f"v{n}", metadata=meta)

    def _reserve(self, d: Path) -> tuple[int, Path]:
        """Reserve the next version number by creating ``.v<N>.incomplete``; retry with N + 1 while taken."""
        used = [0]
        for e in os.listdir(d):
            m = _RESERVED_DIR_RE.match(e)
            if m:
                used.append(int(m.group(1)))
        n = max(used) + 1
        for _ in range(10_000):
            tmp = d / f".v{n}.incomplete"
            try:
                os.mkdir(tmp)
            except FileExistsError:
                n += 1
                continue
            except OSError as exc:
                raise RegistryError(f"cannot create {tmp}: {exc}.") from exc
            # The mkdir succeeded, so any save that held this number earlier has renamed its
            # directory already: a finished v<N> (or its tombstone) is visible now.
            if (d / f"v{n}").exists() or (d / f".v{n}.deleted").exists():
                os.rmdir(tmp)
                n += 1
                continue
            return n, tmp
        raise RegistryError(f"could not reserve a version number in {d}: too many concurrent saves or "
                            "leftover directories.")

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """An exclusive lock on ``<root>/<name>/.lock`` for read-modify-write of aliases and deletes."""
        d = self._dir(name)
        if not d.is_dir():
            raise RegistryError(f"no saved model named {name!r} in registry {self.root} "
                                f"(models there: {self._known_names()}).")
        with FileLock(d / ".lock"):
            yield d

    def aliases(self, name: str) -> dict[str, int]:
        """Aliases of ``name`` and the versions they point to (empty if none were set)."""
        path = self._dir(name) / ALIASES_FILE
        try:
            data = _read_json(path, "the aliases file", "Fix or delete it and set the aliases again with set_alias.")
        except FileNotFoundError:
            return {}
        if isinstance(data, dict) and _sum_ok(data, ALIASES_SUM) is False:
            raise RegistryError(f"the aliases file {path} is damaged: its checksum does not match its contents. "
                                "Fix or delete it and set the aliases again with set_alias.")
        if isinstance(data, dict):
            data.pop(ALIASES_SUM, None)
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()):
            raise RegistryError(f"{path} is not a map of alias names to version numbers. Fix or delete it "
                                "and set the aliases again with set_alias.")
        return dict(sorted(data.items()))

    def _check_alias(self, alias: Any) -> str:
        _check_name(alias, "alias")
        if _VERSION_STR_RE.match(alias):
            raise RegistryError(f"invalid alias {alias!r}: it reads as a version number; choose a word "
                                "such as 'champion'.")
        return alias

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` (e.g. "champion") at an existing version of ``name``; aliases.json is replaced atomically."""
        self._check_alias(alias)
        with self._locked(name) as d:
            n = self._resolve(name, version)
            aliases = self.aliases(name)
            aliases[alias] = n
            _write_aliases(d, aliases)

    def record_event(self, name: str, event: dict[str, Any]) -> None:
        """Append one JSON line to ``<name>/history.jsonl`` (champion decisions of retraining, ...)."""
        try:
            entry = _summed(_normalise({"time": now_iso(), **event}), SPLITS_SUM)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"event of {name!r} is not JSON serialisable ({exc}).") from None
        line = json.dumps(entry, sort_keys=True)
        with self._locked(name) as d:
            _drop_torn_tail(d / HISTORY_FILE)
            with open(d / HISTORY_FILE, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def splits_path(self, name: str) -> Path:
        """Where the lineage's pinned splits live (``<name>/splits.json``)."""
        return self._dir(name) / SPLITS_FILE

    def splits(self, name: str) -> dict[str, Any]:
        """The lineage's pinned splits: ``{"seed", "fractions", "samples": {sha256: split}}``, every image
        any version of ``name`` was trained, validated or tested on, with the split it had the first
        time. Empty (``{}``) for a lineage that has none recorded."""
        path = self.splits_path(name)
        advice = (f"Restore it from a backup: without it, retraining {name!r} cannot keep its test images out of "
                  "training.")
        try:
            data = _read_json(path, "the pinned splits", advice)
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("samples"), dict):
            raise RegistryError(f"{path} is not a pinned-splits file (a JSON object with 'samples'). Restore it "
                                "from a backup.")
        summed = _sum_ok(data, SPLITS_SUM)
        if summed is False or (summed is None and (data.get("format") != 1
                                                   or any(_near(k, SPLITS_SUM) for k in data))):
            raise RegistryError(f"the pinned splits {path} are damaged: their checksum "
                                f"{'does not match' if summed is False else 'is missing'}. {advice}")
        data.pop(SPLITS_SUM, None)
        return data

    @contextmanager
    def retraining(self, name: str) -> Iterator[None]:
        """Held while lineage ``name`` is retrained (``<name>/.retrain.lock``): a second retraining of the same
        lineage meanwhile, from any process, is refused with a RegistryError naming the first."""
        lock = FileLock(self._dir(name) / ".retrain.lock")
        try:
            lock.acquire(blocking=False)
        except FileLockBusy as busy:
            raise RegistryError(f"lineage {name!r} is being retrained already, by {busy.holder}: wait for that run "
                                "to finish (two at once would judge two challengers against one champion); a "
                                "scheduled run that finds one still going can simply be skipped.") from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def kept_only_with_its_splits(self, record: ModelRecord) -> Iterator[None]:
        """Around pinning the splits of a version just saved: if that fails (a full disk, say), the version
        is deleted again, so that no version lacks its lineage's holdout, and the error goes on."""
        try:
            yield
        except BaseException:
            try:
                self.delete(record.name, record.version)
            except (OSError, RegistryError):  # (the error that stopped the pinning is the one to say)
                pass
            raise

    def pin_splits(self, name: str, samples: dict[str, str], fractions: dict[str, float] | None = None,
                   seed: int | None = None, group_by: str | None = None) -> dict[str, int]:
        """Record the split of each image (content hash) of a training of ``name``: images already pinned
        keep their first split, new ones are added. ``fractions``, ``seed`` and ``group_by`` (the regular
        expression that grouped file names, as speakers) are kept from the first call that gives them.
        Returns the number of pinned images per split."""
        bad = sorted({v for v in samples.values() if v not in ("train", "val", "test")})
        if bad:
            raise RegistryError(f"unknown splits {bad} to pin for {name!r}; use train, val or test.")
        with self._locked(name) as d:
            data = self.splits(name) or {"format": SPLITS_FORMAT, "fractions": dict(fractions or {}), "seed": seed,
                                         "created": now_iso(), "samples": {}}
            if group_by and not data.get("group_by"):
                data["group_by"] = group_by
            pinned = data["samples"]
            for h, sp in samples.items():
                pinned.setdefault(h, sp)
            data["format"] = SPLITS_FORMAT
            atomic_write_json(d / SPLITS_FILE, _summed(data, SPLITS_SUM), indent=0)
        counts: dict[str, int] = {}
        for sp in pinned.values():
            counts[sp] = counts.get(sp, 0) + 1
        return counts

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every event recorded for ``name``, oldest first. A last line cut short (an append interrupted by
        a crash) is ignored; any other line that is not an intact event is a RegistryError naming the file
        and the line."""
        path = self._dir(name) / HISTORY_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RegistryError(f"cannot read the history {path}: {exc}.") from exc
        lines = raw.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline, as every complete append does
        out = []
        for i, line in enumerate(lines, 1):
            event = _history_event(line)
            if event is None:
                raise RegistryError(f"line {i} of the history {path} is damaged (not an intact event). Restore "
                                    "the file from a backup, or delete that line to keep the other events.")
            out.append(event)
        if torn:
            event = _history_event(torn)
            if event is not None:  # a whole event whose newline was not written yet
                out.append(event)
            elif _torn_is_damage(torn):
                raise RegistryError(f"the last line of the history {path} is damaged (an event followed by "
                                    "other bytes). Restore the file from a backup, or fix that line.")
        return out

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` of ``name``; RegistryError listing the aliases if it is not set."""
        with self._locked(name) as d:
            aliases = self.aliases(name)
            if alias not in aliases:
                raise RegistryError(f"model {name!r} has no alias {alias!r} (aliases: "
                                    f"{', '.join(aliases) or 'none'}).")
            del aliases[alias]
            _write_aliases(d, aliases)

    def delete(self, name: str, version: int | str) -> None:
        """Delete one version. Refused while an alias points to it; its number is never reused."""
        with self._locked(name) as d:
            n = self._resolve(name, version)
            pointing = sorted(a for a, v in self.aliases(name).items() if v == n)
            if pointing:
                raise RegistryError(f"cannot delete model {name!r} v{n}: alias(es) {pointing} point to it. "
                                    "Point them at another version with set_alias (or remove_alias) first.")
            tomb = d / f".v{n}.deleted"
            try:
                os.rename(d / f"v{n}", tomb)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise RegistryError(f"cannot delete {d / f'v{n}'}: {exc}.") from exc
                shutil.rmtree(tomb, ignore_errors=True)
                os.rename(d / f"v{n}", tomb)
            # Keep the (emptied) directory as a tombstone so that save() never reuses the number.
            for child in list(tomb.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _write_aliases(d: Path, aliases: dict[str, int]) -> None:
    atomic_write_json(d / ALIASES_FILE, _summed(dict(sorted(aliases.items())), ALIASES_SUM), indent=1,
                      sort_keys=True)


def _history_event(line: bytes) -> dict[str, Any] | None:
    """One complete line of history.jsonl as an event, or None when it is damaged. Lines written before
    events carried a checksum are accepted as they are."""
    try:
        event = json.loads(line.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    summed = _sum_ok(event, SPLITS_SUM)
    if summed is False or (summed is None and any(_near(k, SPLITS_SUM) for k in event)):
        return None
    event.pop(SPLITS_SUM, None)
    return event


def _torn_is_damage(tail: bytes) -> bool:
    """True when a last line without its newline, which is not an intact event, still starts with a whole
    JSON value: not an append cut short (that leaves a prefix of an event) but a damaged end of the file."""
    try:
        json.JSONDecoder().raw_decode(tail.decode("utf-8", "replace"))  # a cut may split a character
    except ValueError:
        return False
    return True


def _drop_torn_tail(path: Path) -> None:
    """Cut an append interrupted by a crash (bytes after the last newline) before appending again."""
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if not size:
                return
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            data = fh.read()
            cut = data.rfind(b"\n") + 1
            if _history_event(data[cut:]) is not None:  # a whole event that lacks only its newline
                fh.write(b"\n")
            else:
                fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return
