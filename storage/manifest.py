"""The dataset manifest: which images, with which label and split.

A manifest is produced by scanning a dataset (``tasks.data.datasets``) and consumed
by the feature store to decide what to compute. It is a small JSON file so
that tasks can pass its path to each other instead of large objects.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DatasetError
from .files import atomic_write_json
from .hashing import fingerprint

SPLITS = ("train", "val", "test")
CHECKSUM = "sha256"  # key of a saved manifest: the fingerprint of its other keys


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root, content hash, label index and split."""

    path: str
    sha256: str
    label: int
    split: str


@dataclass
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
    def to_dict(self) -> dict:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(
            root=d["root"], layout=d["layout"], class_names=list(d["class_names"]),
            samples=[Sample(**s) for s in d["samples"]],
            split_seed=d.get("split_seed"), split_fractions=dict(d.get("split_fractions") or {}),
            skipped=[Skip(**s) for s in d.get("skipped", [])],
        )

    def save(self, path: str | Path) -> Path:
        """Write the manifest as JSON with a checksum of its contents (``sha256``), atomically."""
        path = Path(path)
        d = json.loads(json.dumps(self.to_dict()))
        d[CHECKSUM] = fingerprint(d)
        atomic_write_json(path, d, indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read a manifest; DatasetError naming the file when it is unreadable or damaged (its checksum, where
        it has one, does not match)."""
        try:
            d = json.loads(Path(path).read_bytes().decode("utf-8"))
            if isinstance(d, dict) and CHECKSUM in d:
                body = {k: v for k, v in d.items() if k != CHECKSUM}
                if fingerprint(body) != d[CHECKSUM]:
                    raise ValueError("its checksum does not match its contents: the file was damaged or edited")
            return cls.from_dict(d)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"cannot read manifest {path}: {exc}. Re-run the scan to write it again.") from exc

