"""Scan a dataset into a manifest: which images, labels and splits.

Three layouts are understood:

* ``folders``: ``root/<class>/**/<image>``; a stratified split is drawn.
* ``split-folders``: ``root/{train,val,test}/<class>/**/<image>`` (Keras'
  ``flow_from_directory`` layout); the folders are the split.
* ``csv``: a CSV file with a header ``path,label[,split]``; paths are relative
  to the CSV's folder (or absolute). Without a ``split`` column a split is drawn.

The split drawn for unsplit data is stratified per class, and each image's
side is decided by a hash of (seed, path): the same data and seed always give
the same split, growing the dataset moves few existing images, and identical
files never sit on both sides. Data with train and val but no test gets a test
split carved from val. A retraining lineage pins its images' splits by content
hash (``pinned``), so that its test images never move into training.

Which files are images is decided in :mod:`tasks.data.media`: a known image extension, or else
content Pillow identifies (header only). Nothing here decodes pixels or imports TensorFlow; files are
only hashed, and those without a known image extension sniffed in the same pass.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from storage.errors import DatasetError, ParameterError
from storage.hashing import file_sha256
from storage.manifest import SPLITS, Manifest, Sample, Skip

from . import statcache
from .media import (AUDIO, IMAGE, IMAGE_EXTENSIONS, NotMedia, content_kind, describe_supported,  # noqa: F401
                    kind_from_extension, sniff)
from .statcache import Key, NotRegularFile, cache_path_for, stat_key  # noqa: F401

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}

Progress = Callable[[int, int], None]
log = logging.getLogger("cnncodes")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


# why a folder's images are missing from a scan, when it cannot be listed
UNLISTABLE = ("folder cannot be listed ({}): its images are left out. Give the user running cnncodes read and "
              "execute permission on it (chmod a+rx), or move it out of the dataset")


def _walk(folder: str, loops: list[str], unlisted: list[tuple[str, OSError]] | None = None
          ) -> Iterator[tuple[str, str, Key | OSError]]:
    """``(folder, name, stat)`` of each file under ``folder``, folder by folder (files sorted by name, then
    each sub-folder in name order, depth first), hidden files and folders left out, symbolic links
    followed. ``stat`` is :func:`~tasks.data.statcache.stat_key` of the file's stat, or the error that
    says why there is none (a broken link, a FIFO). One ``os.scandir`` per folder and one ``stat`` per
    file: nothing is opened. ``loops`` receives the folders left out because they lead back to a folder
    already listed or to one above ``folder``: a link loop would otherwise list the same images again and
    again, under ever longer paths. ``unlisted`` receives each folder that cannot be listed (permission
    denied, say), with the error."""
    top = os.path.realpath(folder)
    seen = {top}
    stack = [(folder, top)]
    while stack:
        path, real = stack.pop()
        try:
            with os.scandir(path) as it:
                listed = [e for e in it if not _is_hidden(e.name)]
        except OSError as exc:
            if unlisted is not None:
                unlisted.append((path, exc))
            continue
        files, subs = [], []
        for e in listed:
            try:
                (subs if e.is_dir() else files).append(e)
            except OSError:
                files.append(e)
        subs.sort(key=lambda e: e.name)
        keep = []
        # real folders first, so that a link to a sibling is the copy left out
        for e in sorted(subs, key=lambda e: e.is_symlink()):
            sub_real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
            if sub_real in seen or top.startswith(sub_real.rstrip(os.sep) + os.sep):
                loops.append(e.path)
                continue
            seen.add(sub_real)
            keep.append((e.name, e.path, sub_real))
        stack.extend((p, r) for _, p, r in sorted(keep, reverse=True))
        files.sort(key=lambda e: e.name)
        for e in files:
            try:
                key = stat_key(e.stat())
            except OSError as exc:
                key = exc
            yield path, e.name, key


def _stat(path: str) -> Key | OSError:
    try:
        return stat_key(os.stat(path))
    except OSError as exc:
        return exc


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def detect_layout(source: str | os.PathLike) -> str:
    """``csv``, ``split-folders`` or ``folders``; raises DatasetError for anything else."""
    p = Path(source)
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "csv"
        raise DatasetError(f"{p} is a file but not a .csv manifest. Give a folder of class folders, "
                           "a folder with train/ val/ [test/], or a CSV with columns path,label[,split].")
    if not p.is_dir():
        raise DatasetError(f"dataset {p} does not exist. Give a folder of class folders, a folder with "
                           "train/ val/ [test/], or a CSV manifest.")
    try:
        subs = _subdirs(p)
    except PermissionError as exc:
        raise DatasetError(f"dataset folder {p} cannot be listed ({exc.strerror}). Give the user running cnncodes "
                           "read and execute permission on it (chmod a+rx).") from exc
    if not subs:
        raise DatasetError(f"dataset folder {p} has no class sub-folders. Put the images of each class in "
                           f"their own folder ({p}/<class>/<image>), or give a CSV manifest.")
    names = {s.name.lower() for s in subs}
    if names <= set(SPLIT_ALIASES):
        return "split-folders"
    if names & {"train", "training"} and names & set(SPLIT_ALIASES):
        others = sorted(s.name for s in subs if s.name.lower() not in SPLIT_ALIASES)
        raise DatasetError(f"dataset folder {p} mixes split folders with other folders {others}. "
                           "Either use only train/ val/ [test/] at the top, or only class folders.")
    return "folders"


_CHUNK = 64  # files per task of the reading pool (and per progress report)


def _read_chunk(paths: list[str]) -> tuple[list[str | Exception], float, float, int]:
    """Content hash of each path, or the exception that says why it is not used: OSError (unreadable) or
    NotMedia. A file without a known image extension is sniffed first (its header read by Pillow) and
    hashed only when it is an image, so each file is opened once more at most. Also returns the seconds
    spent sniffing and hashing, and how many files were sniffed."""
    out: list[str | Exception] = []
    sniff_s = hash_s = 0.0
    sniffed = 0
    for p in paths:
        t = time.perf_counter()
        try:
            if kind_from_extension(p) is None:
                sniffed += 1
                sniff(p)
                t2 = time.perf_counter()
                sniff_s += t2 - t
                t = t2
            out.append(file_sha256(p))
        except (OSError, NotMedia) as exc:
            out.append(exc)
        hash_s += time.perf_counter() - t
    return out, sniff_s, hash_s, sniffed


def _judge(entries: list[tuple], workers: int, progress: Progress | None, cache: str | os.PathLike | None = None,
           rehash: bool = False, started_ns: int = 0, stats: dict[str, Any] | None = None) -> list[str | Exception]:
    """What each file is: its content hash, or the exception that says why it is not used. ``entries``
    start with ``(folder, name, stat)`` (stat as :func:`_walk` gives it). With ``cache`` (a stat cache's
    path, :mod:`tasks.data.statcache`) a file whose stat equals its record keeps the recorded hash or
    verdict without being opened, unless ``rehash``; only the others are read, and the cache is then
    rewritten with every file's record."""
    t0 = time.perf_counter()
    total = len(entries)
    old, status = None, "none"
    if cache is not None:
        old, status = (None, "rehash") if rehash else statcache.StatCache.read(cache)
    t_read = time.perf_counter()
    out, groups, todo, failed = _look_up(entries, old)
    reused = total - len(todo) - failed
    # Nothing read, and every record of the old cache matched a file: the cache on disk is already the new one.
    unchanged = old is not None and not todo and reused == old.files
    del old
    t_lookup = time.perf_counter()
    if progress and total > len(todo):
        progress(total - len(todo), total)
    sniff_s, hash_s, sniffed = _read_files(entries, todo, out, workers, progress)
    t_hash = time.perf_counter()
    recorded = reused if unchanged else 0
    if cache is not None and not unchanged:
        recorded = _write_cache(cache, entries, groups, out, started_ns)
    if stats is not None:
        stats.update(files=total, reused=reused, read=len(todo), sniffed=sniffed, cache=status,
                     recorded=recorded, cache_rewritten=cache is not None and not unchanged)
        stats.setdefault("seconds", {}).update(
            cache_read=round(t_read - t0, 4), lookup=round(t_lookup - t_read, 4), read=round(t_hash - t_lookup, 4),
            read_thread_hash=round(hash_s, 4), read_thread_sniff=round(sniff_s, 4),
            cache_write=round(time.perf_counter() - t_hash, 4))
    return out


def _look_up(entries: list[tuple], old: statcache.StatCache | None
             ) -> tuple[list[Any], dict[str, list[int]], list[int], int]:
    """The first phase of :func:`_judge`: each entry's verdict where the stat cache ``old`` vouches for it (or
    its stat failed), else None. Returns the verdicts, the entries' indices per folder (in order), the
    indices left to read, and how many files have no stat (broken links, FIFOs: never read, never recorded)."""
    out: list[Any] = [None] * len(entries)
    groups: dict[str, list[int]] = {}  # folder -> indices of its files, in order
    for i, e in enumerate(entries):
        groups.setdefault(e[0], []).append(i)
    todo: list[int] = []
    failed = 0
    for folder, indices in groups.items():
        records = old.folder(folder) if old is not None else {}
        for i in indices:
            e = entries[i]
            rec = records.get(e[1])
            if rec is not None and rec[0] == e[2]:
                v = rec[1]
                out[i] = NotMedia(v[1:]) if v[0] == "!" else v
            elif isinstance(e[2], OSError):
                out[i] = e[2]
                failed += 1
            else:
                todo.append(i)
    return out, groups, todo, failed


def _read_files(entries: list[tuple], todo: list[int], out: list[Any], workers: int,
                progress: Progress | None) -> tuple[float, float, int]:
    """The second phase of :func:`_judge`: read the entries at ``todo`` in a pool of ``workers`` threads, each
    verdict into ``out``; returns the seconds the threads spent sniffing and hashing, and how many files
    were sniffed."""
    sniff_s = hash_s = 0.0
    sniffed = 0
    if not todo:
        return sniff_s, hash_s, sniffed
    total = len(entries)
    done = total - len(todo)
    chunks = [todo[k:k + _CHUNK] for k in range(0, len(todo), _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda c: _read_chunk([os.path.join(entries[i][0], entries[i][1]) for i in c]), chunks)
        for chunk, (verdicts, s_s, h_s, n_s) in zip(chunks, results):
            for i, v in zip(chunk, verdicts):
                out[i] = v
            sniff_s, hash_s, sniffed = sniff_s + s_s, hash_s + h_s, sniffed + n_s
            done += len(chunk)
            if progress:
                progress(done, total)
    return sniff_s, hash_s, sniffed


def _write_cache(cache: str | os.PathLike, entries: list[tuple], groups: dict[str, list[int]], out: list[Any],
                 started_ns: int) -> int:
    """The last phase of :func:`_judge`: write the stat cache with the record of every file that has one and is
    not racy; returns how many files it holds, 0 when it could not be written (the scan is right without it)."""
    def folders():
        for folder, indices in groups.items():
            names, keys, texts = [], [], []
            for i in indices:
                key, text = entries[i][2], statcache.verdict_text(out[i])
                if text is not None and not isinstance(key, OSError) and not statcache.is_racy(key, started_ns):
                    names.append(entries[i][1])
                    keys.append(key)
                    texts.append(text)
            yield folder, names, keys, texts

    try:
        return statcache.write(cache, folders(), started_ns)
    except OSError as exc:  # the scan is right without it; the next one is only slower
        log.warning("could not write the stat cache %s (%s): the next scan will read every file again. "
                    "Check that its folder is writable and has space.", cache, exc)
        return 0


def _unused_reason(path: str, exc: Exception) -> str:
    """Why a listed file is not used, from the exception :func:`_judge` gave for it."""
    if isinstance(exc, (NotMedia, NotRegularFile)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return f"broken symbolic link: its target {os.readlink(path)} does not exist"
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    return f"unreadable: {getattr(exc, 'strerror', None) or exc}"


def _no_images(source, skipped: list[Skip] | None = None, layouts: bool = True) -> DatasetError:
    """No file in ``source`` is an image; ``skipped`` holds the reasons for the files that were there."""
    examples = "; ".join(f"{s.path}: {s.reason}" for s in (skipped or [])[:3])
    reasons = f"; none of its {len(skipped)} files is one (for example {examples})" if skipped else ""
    advice = (" Check the path and the layout: <class>/<image>, train|val|test/<class>/<image>, or a CSV with "
              "path,label[,split].") if layouts else ""
    return DatasetError(f"no images found in {source} (supported types: {describe_supported()}){reasons}.{advice}")


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _n_held(n: int, fraction: float) -> int:
    return int(round(n * fraction))


def class_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of a class's ``n`` images a drawn split holds out: ``(n_test, n_val)``, each rounded, with at
    least one image left to train on."""
    n_test, n_val = _n_held(n, test_fraction), _n_held(n, val_fraction)
    while n_test + n_val > n - 1 and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def assign_splits(items: list[tuple[str, int]], val_fraction: float, test_fraction: float, seed: int,
                  content: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stratified split of ``(path, label)`` items: per class, items ordered by a hash of (seed,
    path) (so that editing a file does not move it); the first
    ``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)`` to val, the rest to
    train (at least one stays in train). Identical files (``content`` maps paths to content hashes)
    never straddle splits: when copies land apart, all of them go to train (or val), never to the
    side that judges."""
    content = content or {}
    by_class: dict[int, list[str]] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    out: dict[str, str] = {}
    for label, paths in by_class.items():
        paths.sort(key=lambda p: _rank(seed, p))
        n_test, n_val = class_counts(len(paths), val_fraction, test_fraction)
        for i, p in enumerate(paths):
            out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return _keep_copies_together(out, content)


def _keep_copies_together(split_of: dict[str, str], content: Mapping[str, str],
                          fallback: Mapping[str, str] | None = None) -> dict[str, str]:
    """Copies of one file (same content hash) on different sides all move to the least held-out side
    (train, else val); with ``fallback`` (given splits), a copy moves back to its given side instead."""
    sides: dict[str, set[str]] = {}
    for p, sp in split_of.items():
        if p in content:
            sides.setdefault(content[p], set()).add(sp)
    for p, sp in split_of.items():
        seen = sides.get(content.get(p, ""), set())
        if len(seen) > 1:
            target = "train" if "train" in seen else "val"
            if sp != target:
                split_of[p] = fallback[p] if fallback else target
    return split_of


def assign_grouped_splits(items: list[tuple[str, int]], groups: Mapping[str, str], val_fraction: float,
                          test_fraction: float, seed: int, content: Mapping[str, str] | None = None
                          ) -> dict[str, str]:
    """A split of ``(path, label)`` items in which every group (``groups`` maps a path to its group: a speaker,
    a patient, a session) lies whole in one split, so that nothing learnt from a group is judged on the
    same group. Stratified as far as whole groups allow: groups are taken largest first (ties in a seeded
    hash order of their names), and each goes to the split whose per-class deficit it fills best, a
    deficit being the split's share of each class (``test_fraction``, ``val_fraction``, the rest to
    train) minus what it holds already; ties go to the split that is relatively furthest from its share.
    The first group always goes to train. Identical files then follow :func:`_keep_copies_together`."""
    members: dict[str, list[tuple[str, int]]] = {}
    for path, label in items:
        members.setdefault(groups.get(path, path), []).append((path, label))
    classes = sorted({label for _, label in items})
    col = {c: i for i, c in enumerate(classes)}
    total = np.zeros(len(classes))
    for _, label in items:
        total[col[label]] += 1
    shares = {"test": test_fraction, "val": val_fraction, "train": 1.0 - val_fraction - test_fraction}
    target = {sp: total * f for sp, f in shares.items()}
    held = {sp: np.zeros(len(classes)) for sp in shares}
    order = sorted(members, key=lambda g: (-len(members[g]), _rank(seed, g)))
    out: dict[str, str] = {}
    for k, g in enumerate(order):
        counts = np.zeros(len(classes))
        for _, label in members[g]:
            counts[col[label]] += 1
        if k == 0:
            side = "train"
        else:
            def score(sp: str) -> tuple[float, float]:
                deficit = np.maximum(0.0, target[sp] - held[sp])
                want = float(target[sp].sum())
                return float(np.minimum(counts, deficit).sum()), float(deficit.sum()) / want if want else -1.0
            side = max((sp for sp in ("test", "val", "train") if shares[sp] > 0), key=score)
        held[side] += counts
        for path, _ in members[g]:
            out[path] = side
    return _keep_copies_together(out, content or {})


def groups_from_names(paths: list[str], pattern: str) -> dict[str, str]:
    """Group of each path: what ``pattern`` (a regular expression searched in the file's name) captures,
    its first group where it has one, else the whole match. ParameterError for a bad pattern; DatasetError
    when no name matches (a name that does not match is a group of its own)."""
    import re

    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ParameterError(f"group_by {pattern!r} is not a regular expression ({exc}). Give one that captures "
                             r"the group in a file name, e.g. '^\d+_([a-z]+)_' for 7_jackson_32.wav.") from None
    out: dict[str, str] = {}
    missed = []
    for p in paths:
        m = rx.search(os.path.basename(p))
        if m is None:
            missed.append(p)
            out[p] = "\0file:" + p
        else:
            out[p] = m.group(1) if rx.groups and m.group(1) is not None else m.group(0)
    if missed and len(missed) == len(paths):
        raise DatasetError(f"group_by {pattern!r} matches none of the file names (e.g. "
                           f"{os.path.basename(paths[0])!r}), so it groups nothing. Fix the pattern: it is searched "
                           "in each file's name and its first capture group names the group.")
    if missed:
        log.warning("group_by %r matches %d of %d file names; each of the others is a group of its own "
                    "(e.g. %s)", pattern, len(paths) - len(missed), len(paths), missed[0])
    return out


def check_groups_within_splits(split_of: Mapping[str, str], groups: Mapping[str, str], where: str) -> None:
    """DatasetError when a group has files in more than one of the given splits."""
    seen: dict[str, set[str]] = {}
    for p, sp in split_of.items():
        if p in groups:
            seen.setdefault(groups[p], set()).add(sp)
    bad = {g: sorted(v) for g, v in seen.items() if len(v) > 1}
    if bad:
        g, sides = next(iter(sorted(bad.items())))
        raise DatasetError(f"{where}: group {g!r} has files in {' and '.join(sides)} ({len(bad)} group(s) straddle "
                           "splits), so the model would be judged on a group it learnt from. Put each group's files "
                           "in one split, or leave the splits out and let cnncodes draw a grouped split.")


def carve_test(items: list[tuple[str, int, str]], test_fraction: float, seed: int,
               content: Mapping[str, str] | None = None) -> dict[str, str]:
    """A test split for data that came with train and val splits but no test: per class,
    ``round(n * test_fraction)`` of the class's images (``n`` counts all its images) move to test,
    taken from val first (in seeded hash order of paths) and from train only when val runs short. At
    least one image per class stays in train, and one in val where the class had val images. A file
    with a copy left in train or val stays where it was given. ``items`` are ``(path, label, given
    split)``; returns the final split of each path."""
    content = content or {}
    by_class: dict[int, list[tuple[str, str]]] = {}
    for path, label, given in items:
        by_class.setdefault(label, []).append((path, given))
    out: dict[str, str] = {}
    for label, rows in by_class.items():
        n_test = _n_held(len(rows), test_fraction)
        for path, given in rows:
            out[path] = given
        for source in ("val", "train"):
            pool = sorted((p for p, g in rows if g == source), key=lambda p: _rank(seed, p))
            take = max(0, min(n_test, len(pool) - 1))
            for p in pool[:take]:
                out[p] = "test"
            n_test -= take
    return _keep_copies_together(out, content, fallback={p: g for p, _, g in items})


def carve_grouped_test(items: list[tuple[str, int, str]], groups: Mapping[str, str], test_fraction: float,
                       seed: int) -> dict[str, str]:
    """:func:`carve_test` for grouped data: whole groups move to test, from val first (largest group first,
    ties in seeded order), then from train, until about ``test_fraction`` of the files are in test; each
    side keeps at least one of its groups (val one group where it had any, train one)."""
    out = {p: g for p, _, g in items}
    want = _n_held(len(items), test_fraction)
    by_group: dict[str, list[str]] = {}
    side: dict[str, str] = {}
    for p, _, g in items:
        by_group.setdefault(groups.get(p, p), []).append(p)
        side[groups.get(p, p)] = g
    moved = 0
    for source in ("val", "train"):
        pool = sorted((g for g in by_group if side[g] == source), key=lambda g: (-len(by_group[g]), _rank(seed, g)))
        for g in pool[:max(0, len(pool) - 1)]:
            if moved >= want:
                break
            if want - moved < len(by_group[g]) / 2:  # this group would overshoot more than it fills
                continue
            for p in by_group[g]:
                out[p] = "test"
            moved += len(by_group[g])
    return out


def load_pinned(path: str | os.PathLike) -> dict[str, str]:
    """Pinned splits from a JSON file: ``{sha256: split}``, or a registry lineage's ``splits.json``
    (whose ``samples`` hold that map)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the pinned splits {path}: {exc}. Point --pinned at a JSON file of "
                           "{sha256: split} or at a model lineage's splits.json in the registry.") from None
    samples = data.get("samples", data) if isinstance(data, dict) else None
    if not isinstance(samples, dict) or any(v not in SPLITS for v in samples.values()):
        raise DatasetError(f"{path} is not a map of content hashes to splits ({', '.join(SPLITS)}).")
    return dict(samples)


def check_split_params(val_fraction: float, test_fraction: float) -> None:
    """ParameterError unless both fractions are in [0, 1) and leave images to train on (the same rule as
    :class:`tasks.settings.SplitConfig`)."""
    from ..settings import check_fractions

    check_fractions(val_fraction, test_fraction)


def scan_dataset(source: str | os.PathLike, val_fraction: float = 0.2, test_fraction: float = 0.15,
                 seed: int = 0, workers: int = 4, progress: Progress | None = None,
                 pinned: Mapping[str, str] | None = None, *, cache: str | os.PathLike | None = None,
                 rehash: bool = False, stats: dict[str, Any] | None = None, group_by: str | None = None) -> Manifest:
    """Scan ``source`` into a :class:`Manifest` with content hashes.

    Splits: given ones (split folders, a CSV's split column) are kept. Data without splits gets a
    drawn, stratified, seeded one (``val_fraction``, ``test_fraction`` of each class). Data with
    train and val but no test gets a test split of ``test_fraction`` of each class, taken from val
    first (see :func:`carve_test`), so that no selection step (early stopping, checkpoint choice,
    C search, layer sweep) sees the images that decide. ``pinned`` maps content hashes to the split
    an image must keep (a retraining lineage's holdout): only images not in it are drawn. Identical
    files (same hash) always share a split.

    Files that cannot be used (not an image Pillow can identify, unreadable, not in a class folder,
    duplicates in a CSV) are listed in ``manifest.skipped`` with the reason; a class folder with no
    usable image is listed there too and the class is left out. Which files are images:
    :mod:`tasks.data.media`.

    Groups: a CSV's ``group`` column, or ``group_by`` (a regular expression whose first capture group,
    searched in each file's name, names its group: ``^\\d+_([a-z]+)_`` takes the speaker of
    ``7_jackson_32.wav``) keeps all of a group's files in one split: a drawn split is then grouped and
    stratified (:func:`assign_grouped_splits`), and given splits in which a group straddles two are refused.

    Media: images, or sound recordings (:mod:`tasks.data.media`); a dataset is one or the other
    (``manifest.media``), by the kind most of its files are; files of the other kind are skipped with
    the reason.

    Re-scans: with ``cache`` (a file path; the flows use :func:`cache_path_for` of their manifest) the
    scan keeps each file's stat with its hash there, and a later scan opens only the files whose stat
    (size, mtime, ctime, inode) changed, reusing the recorded hash (or "not an image" verdict) of all
    the others; see :mod:`tasks.data.statcache`. ``rehash`` reads and hashes every file regardless (and
    rewrites the cache). ``stats``, a dict, receives counts (files, reused, read, sniffed) and the
    seconds of each phase.
    Raises DatasetError when nothing usable remains.
    """
    check_split_params(val_fraction, test_fraction)
    started_ns = time.time_ns()
    t0 = time.perf_counter()
    listing = _list_dataset(source, detect_layout(source))
    if not listing.entries:
        raise _no_images(source)
    t_list = time.perf_counter()
    hashes = _judge(listing.entries, workers, progress, cache, rehash, started_ns, stats)
    t_judge = time.perf_counter()
    kept, used, failed = _sort_verdicts(listing, hashes, source)
    del hashes
    kept, media = _one_media(kept, listing.base, listing.skipped, source)
    listing.entries = []  # what the splits need is in kept: the listing's stat keys and names can go

    class_names = sorted({cls for _, _, cls, _ in kept})
    _skip_unused_class_folders(listing, used, failed, class_names)
    label_of = {c: i for i, c in enumerate(class_names)}
    groups = groups_from_names([rel for rel, _, _, _ in kept], group_by) if group_by else \
        {rel: listing.csv_groups[rel] for rel, _, _, _ in kept if rel in listing.csv_groups}
    splits_final, split_seed, split_fractions = _final_splits(kept, label_of, groups, pinned or {}, val_fraction,
                                                              test_fraction, seed, source)
    if groups:
        log.info("split grouped by %s: %d groups, each whole in one split", group_by or "the CSV's group column",
                 len(set(groups.values())))
    samples = [Sample(rel, h, label_of[cls], sp) for (rel, h, cls, _), sp in zip(kept, splits_final)]
    if not any(sp == "test" for sp in splits_final):
        log.warning("no test split in %s: the accuracy reported will be measured on val, which early stopping, "
                    "checkpoints and layer choice saw, so it is optimistic. Set --test-fraction above 0 (default "
                    "0.15) or add a test/ folder.", source)
    if stats is not None:
        stats.setdefault("seconds", {}).update(list=round(t_list - t0, 4), judge=round(t_judge - t_list, 4),
                                               splits=round(time.perf_counter() - t_judge, 4))
    return Manifest(root=str(listing.base), layout=listing.layout, class_names=class_names, samples=samples,
                    split_seed=split_seed, split_fractions=split_fractions, skipped=listing.skipped, media=media,
                    groups={rel: str(groups[rel]) for rel, _, _, _ in kept if rel in groups}, group_by=group_by)


@dataclass
class _Listing:
    """What listing a dataset found, before any file is read."""

    layout: str
    base: Path  # the folder sample paths are relative to
    # (folder, file name, stat key or error, relative path, class name, split or None, class folder index or -1)
    entries: list[tuple[str, str, Key | OSError, str, str, str | None, int]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    class_dirs: list[tuple[str, str]] = field(default_factory=list)  # (relative folder, class name)
    csv_groups: dict[str, str] = field(default_factory=dict)  # a CSV's group column: path -> group
    unlisted: set[str] = field(default_factory=set)  # relative folders that could not be listed


def _list_dataset(source: str | os.PathLike, layout: str) -> _Listing:
    """The first phase of :func:`scan_dataset`: every file of ``source`` (laid out as ``layout``) with its
    class and given split, and the files that cannot be used wherever they lie; nothing is opened but the
    folders and a CSV."""
    root = Path(source).resolve()
    if layout == "csv":
        listed, skipped = _read_csv(root)
        entries = [(*os.path.split(a), _stat(a), rel, cls, split, -1) for a, rel, cls, split, _ in listed]
        return _Listing(layout, root.parent, entries, skipped, csv_groups={rel: g for _, rel, _, _, g in listed if g})
    listing = _Listing(layout, root)
    splits = [(s, SPLIT_ALIASES[s.name.lower()]) for s in _subdirs(root)] if layout == "split-folders" \
        else [(root, None)]
    if layout == "split-folders":
        for f in sorted(p for p in root.iterdir() if p.is_file() and not _is_hidden(p.name)):
            listing.skipped.append(Skip(f.relative_to(root).as_posix(),
                                        "not inside a split and class folder; move it into <split>/<class>/ to use it"))
    for folder, split in splits:
        where = f"{folder.name}/<class>/" if split else "<class>/"
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not _is_hidden(p.name)):
            listing.skipped.append(Skip(f.relative_to(root).as_posix(),
                                        f"not inside a class folder; move it into {where} to use it"))
        for cls_dir in _subdirs(folder):
            _list_class_folder(listing, cls_dir, split)
    return listing


def _list_class_folder(listing: _Listing, folder: Path, split: str | None) -> None:
    """Add the files under the class folder ``folder`` (of the given ``split``) to ``listing``; links back to
    a folder already listed are skipped with the reason."""
    index = len(listing.class_dirs)
    listing.class_dirs.append((folder.relative_to(listing.base).as_posix() + "/", folder.name))
    prefix = os.path.join(str(listing.base), "")
    loops: list[str] = []
    unlisted: list[tuple[str, OSError]] = []
    last, rel_dir = None, ""
    for dirpath, name, key in _walk(str(folder), loops, unlisted):
        if dirpath is not last:
            last, rel_dir = dirpath, dirpath[len(prefix):] + "/"
        listing.entries.append((dirpath, name, key, rel_dir + name, folder.name, split, index))  # judged later
    for d in loops:
        listing.skipped.append(Skip(d[len(prefix):] + "/",
                                    "symbolic link to a folder already scanned (or above it); not followed"))
    for d, exc in unlisted:
        listing.unlisted.add(d[len(prefix):] + "/")
        listing.skipped.append(Skip(d[len(prefix):] + "/", UNLISTABLE.format(exc.strerror or exc)))


def _sort_verdicts(listing: _Listing, hashes: list[str | Exception], source
                   ) -> tuple[list[tuple[str, str, str, str | None]], set[int], set[int]]:
    """After :func:`_judge`: ``(relative path, sha256, class, given split)`` of each usable file, the others
    added to ``listing.skipped`` with the reason; and the class folders (indices) with a usable file, and
    with an unreadable one. DatasetError when no file is usable."""
    kept = []
    not_media = 0
    used, failed = set(), set()
    for (folder, name, _, rel, cls, split, index), h in zip(listing.entries, hashes):
        if isinstance(h, Exception):
            listing.skipped.append(Skip(rel, _unused_reason(os.path.join(folder, name), h)))
            not_media += isinstance(h, NotMedia)
            if index >= 0 and not isinstance(h, NotMedia):
                failed.add(index)
        else:
            kept.append((rel, h, cls, split))
            if index >= 0:
                used.add(index)
    if not kept:
        if not_media == len(listing.entries):
            rels = {e[3] for e in listing.entries}
            raise _no_images(source, [s for s in listing.skipped if s.path in rels])
        raise DatasetError(f"none of the {len(listing.entries)} files in {source} could be read as images; see the "
                           "reasons: " + "; ".join(f"{s.path}: {s.reason}" for s in listing.skipped[:5]))
    return kept, used, failed


def _skip_unused_class_folders(listing: _Listing, used: set[int], failed: set[int], class_names: list[str]) -> None:
    """List each class folder without a usable file in ``listing.skipped``, saying why."""
    for i, (rel_dir, cls) in enumerate(listing.class_dirs):
        if i not in used and rel_dir not in listing.unlisted:  # (an unlisted one is reported already)
            what = "class folder with no readable image (see its files' reasons)" if i in failed \
                else "empty class folder: no images"
            listing.skipped.append(Skip(rel_dir, what + ("" if cls in class_names else ", class left out")))


def _final_splits(kept: list[tuple], label_of: dict[str, int], groups: Mapping[str, str], pinned: Mapping[str, str],
                  val_fraction: float, test_fraction: float, seed: int, source
                  ) -> tuple[list[str], int | None, dict[str, float]]:
    """The split of each kept file (as :func:`scan_dataset` says: given, drawn, or carved from val), the seed
    of a drawn or carved split (None for given ones), and the fractions it drew."""
    given = [s for _, _, _, s in kept]
    content = {rel: h for rel, h, _, _ in kept}
    if all(s is None for s in given):
        drawn = _drawn_splits(kept, label_of, groups, pinned, val_fraction, test_fraction, seed, content)
        return drawn, seed, {"val": float(val_fraction), "test": float(test_fraction)}
    if "test" not in given and test_fraction > 0:
        rows = [(rel, label_of[cls], s or "train") for rel, h, cls, s in kept if pinned.get(h) != "test"]
        if groups:
            check_groups_within_splits({r: g for r, _, g in rows}, groups, str(source))
            carved = carve_grouped_test(rows, groups, test_fraction, seed)
        else:
            carved = carve_test(rows, test_fraction, seed, content)
        return ["test" if pinned.get(h) == "test" else carved[rel] for rel, h, _, _ in kept], seed, \
            {"test": float(test_fraction)}
    splits = [s or "train" for s in given]
    if groups:
        check_groups_within_splits({rel: sp for (rel, _, _, _), sp in zip(kept, splits)}, groups, str(source))
    return splits, None, {}


def _drawn_splits(kept: list[tuple], label_of: dict[str, int], groups: Mapping[str, str], pinned: Mapping[str, str],
                  val_fraction: float, test_fraction: float, seed: int, content: Mapping[str, str]) -> list[str]:
    """The split of each kept file of data without given splits: pinned files keep theirs, the others are
    drawn (:func:`assign_splits`, or :func:`assign_grouped_splits` for grouped data)."""
    items = [(rel, label_of[cls]) for rel, h, cls, _ in kept if h not in pinned]
    drawn = assign_grouped_splits(items, groups, val_fraction, test_fraction, seed, content) if groups else \
        assign_splits(items, val_fraction, test_fraction, seed, content)
    if groups and pinned:  # a new file of a group the pins already place joins its group's split
        placed: dict[str, str] = {}
        for rel, h, _, _ in kept:
            if h in pinned and rel in groups:
                placed.setdefault(groups[rel], pinned[h])
        drawn = {rel: placed.get(groups.get(rel, ""), sp) for rel, sp in drawn.items()}
    return [pinned.get(h) or drawn[rel] for rel, h, _, _ in kept]


def _kind(base: Path, rel: str) -> str:
    return kind_from_extension(rel) or content_kind(base / rel)


def _one_media(kept: list[tuple], base: Path, skipped: list[Skip], source) -> tuple[list[tuple], str]:
    """A dataset is images or sound, not both: the kind most of ``kept`` (``(rel, ...)`` tuples) are wins;
    files of the other kind are skipped with the reason. Returns the kept files and the kind."""
    # A file without a known extension is opened (its first 12 bytes) only when the answer can matter: some
    # file is sound by its name, or none has a known name. A re-scan of an image dataset thus opens nothing
    # the stat cache vouches for.
    named = [kind_from_extension(k[0]) for k in kept]
    if AUDIO in named or not any(named):
        kinds = [n or _kind(base, k[0]) for n, k in zip(named, kept)]
    else:
        kinds = [n or IMAGE for n in named]
    n_audio = sum(k == AUDIO for k in kinds)
    media = AUDIO if n_audio * 2 > len(kinds) else IMAGE
    if 0 < n_audio < len(kinds):
        other = "an image" if media == AUDIO else "a sound recording"
        where = "sound recordings" if media == AUDIO else "images"
        for k, kind in zip(kept, kinds):
            if kind != media:
                skipped.append(Skip(k[0], f"{other} in a dataset of {where} ({source}: most files are {where}); "
                                          "keep images and sound in separate datasets"))
        kept = [k for k, kind in zip(kept, kinds) if kind == media]
    return kept, media


def peek_media(source: str | os.PathLike, limit: int = 1000) -> str:
    """``"audio"`` or ``"image"``: what most of the first ``limit`` files of ``source`` (a dataset folder or CSV,
    as :func:`scan_dataset` takes) are, judged by their extensions alone; nothing is opened but the listing (a
    flow decides with it what to extract before the scan). Files without a known extension do not count;
    with none known, ``"image"``."""
    p = Path(source)
    names: list[str] = []
    if p.is_file() and p.suffix.lower() == ".csv":
        try:
            with open(p, newline="", encoding="utf-8-sig") as fh:
                for i, row in enumerate(csv.DictReader(fh)):
                    if i >= limit:
                        break
                    names.append(next((v or "" for k, v in row.items() if k and k.strip().lower() == "path"), ""))
        except (OSError, UnicodeDecodeError, csv.Error):
            return IMAGE  # the scan reports what is wrong with it
    elif p.is_dir():
        for _, name, _ in _walk(str(p), []):
            names.append(name)
            if len(names) >= limit:
                break
    kinds = [k for k in (kind_from_extension(n) for n in names) if k]
    return AUDIO if kinds and sum(k == AUDIO for k in kinds) * 2 > len(kinds) else IMAGE


def _read_csv(csv_path: Path):
    try:
        fh = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"cannot read CSV manifest {csv_path}: {exc}") from exc
    try:
        with fh:
            return _parse_csv(csv_path, csv.DictReader(fh))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"CSV manifest {csv_path} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                           "Save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet) and scan again.") from None
    except csv.Error as exc:
        raise DatasetError(f"CSV manifest {csv_path} cannot be parsed: {exc}. "
                           "Write it as plain comma-separated text with a header path,label[,split].") from None


def _parse_csv(csv_path: Path, reader: csv.DictReader):
    base = csv_path.parent
    entries, skipped, seen = [], [], set()
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "path" not in cols or "label" not in cols:
        raise DatasetError(f"CSV manifest {csv_path} needs a header with columns path,label[,split]; "
                           f"it has {reader.fieldnames}.")
    for lineno, raw in enumerate(reader, 2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        path, label, split = row.get("path", ""), row.get("label", ""), row.get("split") or None
        group = row.get("group") or None
        if not path or not label:
            raise DatasetError(f"{csv_path}:{lineno}: empty path or label. Every row needs both.")
        if split is not None:
            if split.lower() not in SPLIT_ALIASES:
                raise DatasetError(f"{csv_path}:{lineno}: unknown split {split!r}; use one of {', '.join(SPLITS)}.")
            split = SPLIT_ALIASES[split.lower()]
        abs_path = Path(path) if os.path.isabs(path) else base / path
        rel = Path(path).as_posix()
        if rel in seen:
            skipped.append(Skip(rel, f"listed twice in {csv_path.name} (line {lineno}); first entry kept"))
            continue
        seen.add(rel)
        entries.append((str(abs_path), rel, label, split, group))
    has_split = [e[3] is not None for e in entries]
    if any(has_split) and not all(has_split):
        raise DatasetError(f"{csv_path}: the split column is filled on some rows and empty on others. "
                           "Fill it on every row, or leave it out to let cnncodes draw a split.")
    return entries, skipped


def scan_images(source: str | os.PathLike, workers: int = 4, progress: Progress | None = None) -> Manifest:
    """Unlabelled images to predict on: a folder (searched recursively; class folders are not
    needed), one image file, a ``.txt`` list of paths (one per line), or a CSV with a ``path``
    column. Paths in a list are relative to the list's folder. Every sample has label -1 and split
    ``predict``; unusable files are listed in ``skipped``. Which files are images:
    :mod:`tasks.data.media`."""
    p = Path(source)
    skipped: list[Skip] = []
    listed_groups: dict[str, str] = {}  # a CSV's group column (a speaker...), for models that adapt per group
    if p.is_dir():
        base = p.resolve()
        prefix = os.path.join(str(base), "")
        loops: list[str] = []
        unlisted: list[tuple[str, OSError]] = []
        entries = [(d, name, key, d[len(prefix):] + "/" + name if d != str(base) else name)
                   for d, name, key in _walk(str(base), loops, unlisted)]
        skipped += [Skip(d[len(prefix):] + "/", "symbolic link to a folder already scanned; not followed")
                    for d in loops]
        skipped += [Skip(d[len(prefix):] + "/", UNLISTABLE.format(exc.strerror or exc)) for d, exc in unlisted]
    elif p.is_file() and kind_from_extension(p):
        base = p.resolve().parent
        entries = [(str(base), p.resolve().name, _stat(str(p.resolve())), p.name)]
    elif p.is_file() and p.suffix.lower() in (".txt", ".csv"):
        base = p.resolve().parent
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read image list {p}: {exc}. Save it as UTF-8 text.") from exc
        if p.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            if rows and "path" not in {k.strip().lower() for k in rows[0] if k}:
                raise DatasetError(f"CSV {p} needs a 'path' column.")
            listed = [next(v for k, v in r.items() if k and k.strip().lower() == "path").strip() for r in rows]
            listed_groups = {Path(x).as_posix(): (g or "").strip() for x, g in zip(
                listed, (next((v for k, v in r.items() if k and k.strip().lower() == "group"), None) for r in rows))}
        else:
            listed = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        entries = []
        for x in listed:
            a = str(Path(x) if os.path.isabs(x) else base / x)
            entries.append((*os.path.split(a), _stat(a), Path(x).as_posix()))
    elif p.is_file():
        try:
            sniff(p)
        except (NotMedia, OSError) as exc:
            raise DatasetError(f"{source} is neither a folder, an image ({_unused_reason(str(p), exc)}), nor a "
                               ".txt/.csv list of images. Give one of those.") from None
        base = p.resolve().parent
        entries = [(str(base), p.resolve().name, _stat(str(p.resolve())), p.name)]
    else:
        raise DatasetError(f"{source} is neither a folder, an image, nor a .txt/.csv list of images.")
    if not entries:  # their types are judged while hashing
        raise _no_images(source, layouts=False)
    hashes = _judge(entries, workers, progress)
    samples, seen = [], set()
    for (folder, name, _, rel), h in zip(entries, hashes):
        if isinstance(h, Exception):
            skipped.append(Skip(rel, _unused_reason(os.path.join(folder, name), h)))
        elif rel in seen:
            skipped.append(Skip(rel, "listed twice; first entry kept"))
        else:
            seen.add(rel)
            samples.append(Sample(rel, h, -1, "predict"))
    if not samples and all(isinstance(h, NotMedia) for h in hashes):
        raise _no_images(source, skipped, layouts=False)
    if not samples:
        raise DatasetError(f"none of the images in {source} could be read: "
                           + "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5]))
    rows, media = _one_media([(x.path, x) for x in samples], base, skipped, source)
    kept = [x for _, x in rows]
    return Manifest(root=str(base), layout="images", class_names=[], samples=kept, skipped=skipped, media=media,
                    groups={x.path: listed_groups[x.path] for x in kept if listed_groups.get(x.path)})
