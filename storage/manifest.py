"""The dataset manifest: which images (or sound recordings: ``media``), with which label and split.

A manifest is produced by scanning a dataset (``tasks.data.datasets``) and consumed
by the feature store to decide what to compute. It is a JSON file (one sample per line) so
that tasks can pass its path to each other instead of large objects.

A re-scan that knows what changed (a watched dataset, :mod:`tasks.data.incremental`) does not rewrite
the whole file: it appends one **delta line** after it, ``<JSON>\t<sha256>\n``, whose JSON holds the
samples set or replaced (``set``: ``[path, sha256, label, split]``), the paths dropped (``drop``), the
skips added or replaced (``skip``: ``[path, reason]``) and removed (``unskip``), and the scan's record
(``scan``). Each line's sha256 covers the state before it (the previous line's sha256, or the base's
checksum) and its JSON, so the lines form a chain: :attr:`Manifest.state` is its last link, and a line that
was edited, or lost from the middle, breaks it. A last line without its newline (a run killed while
writing it) is ignored with a warning: the scan that wrote it had not finished. :meth:`Manifest.save`
writes the whole manifest again, without deltas.
"""
from __future__ import annotations

import hashlib
import json
import logging
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
log = logging.getLogger("cnncodes")


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
    scan: dict = field(default_factory=dict)  # what the scan that wrote it recorded (a watcher's position...)
    state: str = field(default="", compare=False)  # the file's last checksum (see the module's docstring)

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
                "groups": dict(self.groups), "group_by": self.group_by, "scan": dict(self.scan)}

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
            scan=dict(d.get("scan") or {}),
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
        self.state = digest.hexdigest()
        return path

    @staticmethod
    def append_delta(path: str | Path, state: str, delta: dict) -> str:
        """Append one delta line (see the module's docstring) to the manifest at ``path``, whose current
        :attr:`state` is ``state``; returns the new state. A torn last line left by a killed run is cut off
        first. The caller knows ``state`` from the manifest it changed; nothing else is read."""
        text = json.dumps(delta, separators=(",", ":"), ensure_ascii=True)
        new = hashlib.sha256(f"{state}\n{text}".encode("ascii")).hexdigest()
        with open(path, "r+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end:
                fh.seek(end - 1)
                if fh.read(1) != b"\n":  # a torn line: find where it starts and cut it
                    back = min(end, 1 << 20)
                    fh.seek(end - back)
                    tail = fh.read(back)
                    fh.truncate(end - back + tail.rindex(b"\n") + 1)
                    fh.seek(0, os.SEEK_END)
            fh.write(f"{text}\t{new}\n".encode("ascii"))
            fh.flush()
            os.fsync(fh.fileno())
        return new

    def apply_delta(self, delta: dict) -> None:
        """Apply one delta (see the module's docstring) to this manifest, in place."""
        gone = set(delta.get("drop", ()))
        sets = {p: Sample(p, h, int(lab), sp) for p, h, lab, sp in delta.get("set", ())}
        moves = dict(delta.get("move", ()))
        if gone or sets or moves:
            kept = []
            for s in self.samples:
                if s.path in gone:
                    continue
                s = sets.pop(s.path, s)
                kept.append(Sample(s.path, s.sha256, s.label, moves[s.path]) if s.path in moves else s)
            kept.extend(sets.values())
            self.samples = kept
            self.groups = {p: g for p, g in self.groups.items() if p not in gone}
        skips = dict(delta.get("skip", ()))
        unskip = set(delta.get("unskip", ()))
        if skips or unskip:
            out = []
            for k in self.skipped:
                if k.path in unskip:
                    continue
                out.append(Skip(k.path, skips.pop(k.path)) if k.path in skips else k)
            out.extend(Skip(p, r) for p, r in skips.items())
            self.skipped = out
        if "scan" in delta:
            self.scan = dict(delta["scan"])

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read a manifest; DatasetError naming the file when it is unreadable or damaged (its checksum, where
        it has one, does not match)."""
        try:
            raw = Path(path).read_bytes()
            deltas = b""
            cut = raw.rfind(CHECKSUM_SEP.encode())
            state = ""
            if cut >= 0:  # written with a checksum: the sha256 of every byte before it
                end = raw.index(b"\n", cut + len(CHECKSUM_SEP)) + 1
                raw, deltas = raw[:end], raw[end:]
                stated = raw[cut + len(CHECKSUM_SEP):].strip().rstrip(b"}").strip().strip(b'"').decode("ascii")
                if hashlib.sha256(raw[:cut]).hexdigest() != stated:
                    raise ValueError("its checksum does not match its contents: the file was damaged or edited")
                state = stated
            manifest = cls.from_dict(json.loads(raw.decode("utf-8")))
            lines = deltas.split(b"\n")
            if lines[-1]:
                log.warning("manifest %s: its last change was being written when its scan stopped; it is left "
                            "out (the next scan looks at those files again).", path)
            for line in lines[:-1]:
                text, _, stated = line.decode("ascii").rpartition("\t")
                state = hashlib.sha256(f"{state}\n{text}".encode("ascii")).hexdigest()
                if state != stated:
                    raise ValueError("one of the changes appended to it does not match its checksum: the file "
                                     "was damaged or edited")
                manifest.apply_delta(json.loads(text))
            manifest.state = state
            return manifest
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"cannot read manifest {path}: {exc}. Re-run the scan to write it again.") from exc

