"""The dataset manifest: which images (or sound recordings: ``media``), with which label and split.

A manifest is produced by scanning a dataset (``tasks.data.datasets``) and consumed
by the feature store to decide what to compute. It is a JSON file (one sample per line) so
that tasks can pass its path to each other instead of large objects.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path

from .errors import DatasetError
from .files import atomic_path
from .hashing import fingerprint

_str = encode_basestring_ascii  # a JSON string literal, as json.dumps writes it (C)

SPLITS = ("train", "val", "test")
CHECKSUM = "sha256"  # last key of a saved manifest: the sha256 of every byte before it
CHECKSUM_SEP = f',\n"{CHECKSUM}": "'


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: its path relative to the dataset root, content hash, label index and split."""

    path: str
    sha256: str
    label: int
    split: str


@dataclass(slots=True)
class Skip:
    """A file that was not used, and why."""

    path: str
    reason: str


@dataclass
class Manifest:
    """Everything a run needs to know about a dataset, without the pixels."""

    root: str
    layout: str  # "folders", "split-folders" or "csv"
    class_names: list[str]
    samples: list[Sample]
    split_seed: int | None = None
    split_fractions: dict[str, float] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    media: str = "image"  # "image" or "audio": how the files are read (audio: drawn as spectrograms)
    groups: dict[str, str] = field(default_factory=dict)  # path -> group (a speaker...): kept whole in one split
    group_by: str | None = None  # the regular expression the groups were drawn from file names with, if any

    def fingerprint(self) -> str:
        """Hash of what decides the features' rows: paths, contents, labels, splits, classes."""
        rows = sorted((s.path, s.sha256, s.label, s.split) for s in self.samples)
        return fingerprint({"classes": self.class_names, "rows": rows})

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class: ``{split: {class_name: n}}``."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            per = out.setdefault(s.split, {})
            name = self.class_names[s.label] if 0 <= s.label < len(self.class_names) else "(unlabelled)"
            per[name] = per.get(name, 0) + 1
        return out

    def abspath(self, sample: Sample) -> str:
        return sample.path if os.path.isabs(sample.path) else os.path.join(self.root, sample.path)

    # -- (de)serialisation -------------------------------------------------
    def _head(self) -> dict:
        return {"root": self.root, "layout": self.layout, "class_names": list(self.class_names),
                "split_seed": self.split_seed, "split_fractions": dict(self.split_fractions), "media": self.media,
                "groups": dict(self.groups), "group_by": self.group_by}

    def to_dict(self) -> dict:
        return {**self._head(),
                "samples": [{"path": s.path, "sha256": s.sha256, "label": s.label, "split": s.split}
                            for s in self.samples],
                "skipped": [{"path": k.path, "reason": k.reason} for k in self.skipped],
                "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(
            root=d["root"], layout=d["layout"], class_names=list(d["class_names"]),
            samples=[Sample(s["path"], s["sha256"], s["label"], s["split"]) for s in d["samples"]],
            split_seed=d.get("split_seed"), split_fractions=dict(d.get("split_fractions") or {}),
            skipped=[Skip(s["path"], s["reason"]) for s in d.get("skipped", [])],
            media=d.get("media") or "image", groups=dict(d.get("groups") or {}), group_by=d.get("group_by"),
        )

    def _lines(self, fingerprint: str):
        """The JSON text of :meth:`to_dict`, one sample or skip per line, written piece by piece (no second
        copy of every sample as a dict, and json's C encoder for each string); without the closing brace
        (the checksum follows)."""
        head = json.dumps(self._head())
        yield head[:-1] + ',\n"samples": ['
        sep = "\n"
        for s in self.samples:
            yield (f'{sep}{{"path": {_str(s.path)}, "sha256": {_str(s.sha256)}, "label": {int(s.label)}, '
                   f'"split": {_str(s.split)}}}')
            sep = ",\n"
        yield '],\n"skipped": ['
        sep = "\n"
        for k in self.skipped:
            yield f'{sep}{{"path": {_str(k.path)}, "reason": {_str(k.reason)}}}'
            sep = ",\n"
        yield f'],\n"fingerprint": {_str(fingerprint)}'

    def save(self, path: str | Path, fingerprint: str | None = None) -> Path:
        """Write the manifest as JSON (one sample per line), atomically, ending with the sha256 of every
        byte before it (``"sha256"``), so that damage is found on loading. ``fingerprint``: this manifest's
        :meth:`fingerprint` where the caller has it already (it costs a sort of every sample)."""
        path = Path(path)
        digest = hashlib.sha256()
        with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii", buffering=1 << 20) as fh:
            for piece in self._lines(fingerprint or self.fingerprint()):
                digest.update(piece.encode("ascii"))
                fh.write(piece)
            fh.write(f'{CHECKSUM_SEP}{digest.hexdigest()}"}}\n')
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read a manifest; DatasetError naming the file when it is unreadable or damaged (its checksum, where
        it has one, does not match)."""
        try:
            raw = Path(path).read_bytes()
            cut = raw.rfind(CHECKSUM_SEP.encode())
            if cut >= 0:  # written with a checksum: the sha256 of every byte before it
                stated = raw[cut + len(CHECKSUM_SEP):].strip().rstrip(b"}").strip().strip(b'"').decode("ascii")
                if hashlib.sha256(raw[:cut]).hexdigest() != stated:
                    raise ValueError("its checksum does not match its contents: the file was damaged or edited")
            d = json.loads(raw.decode("utf-8"))
            return cls.from_dict(d)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"cannot read manifest {path}: {exc}. Re-run the scan to write it again.") from exc

