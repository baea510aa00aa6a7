"""Re-scans cost what changed: a first scan, a no-change re-run and a 1%-new re-run over N tiny images.

Generates N tiny valid PNGs (1 x 1 px, each made distinct by a text chunk carrying its number; 1 in 101
has no extension, so the scan sniffs it with Pillow) in 100 class folders under a temporary folder,
by writing bytes (no encoder), and deletes them at the end. Then, each measurement in a fresh
subprocess (so that its peak RSS is its own), what the flows' ``scan-dataset`` task does:
``scan_dataset(..., cache=<manifest>.statcache)``, then the manifest's fingerprint and ``Manifest.save``:

* **first**: no stat cache: every file is read (sniffed where it has no extension) and hashed;
* **no change**: the same tree again: every file is only listed and stat-ed;
* **1% new**: N/100 new files added (the same cache restored before each repeat); its repeats alternate
  with the no-change run's, so that each pair ran under the same load;
* **rehash**: ``rehash=True`` on the unchanged tree: a full read again, the cost of ``--rehash``.

For each: wall seconds of the scan and of the manifest's writing, the phases the scan reports (listing
and stat, reading the cache, looking files up in it, reading new files, writing the cache, splits and
manifest building), the files opened under the data folder (``open`` wrapped: hashing and sniffing
both use it), the bytes the process read (``rchar`` of /proc/self/io: image files, the cache, the
Python modules it imports while scanning), and the peak RSS (``ru_maxrss``) of the scan and the
manifest's writing, and then with ``Manifest.load`` too (what the next task of a flow does). Then, single-threaded in
this process on a sample, the per-file costs: stat, sha256 of a tiny file, sniff; and sha256's
throughput on large buffers.

Extrapolation to 1,000,000 files: every phase is linear in the number of files (the split's sort is
n log n, near enough), so each measured phase is scaled by 1,000,000 / N; memory above the
interpreter's own (RSS after the imports) likewise. The files here are tiny and in the page cache:
the hashing of a real dataset (about 100 KB per image) is bounded by the disk or by sha256's
throughput, which is reported so that the cost of a full scan of real images can be worked out.

Usage:
    .venv/bin/python benchmarks/rescan.py [--files 200000] [--quick] [--json benchmarks/results/rescan.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from report import emit  # noqa: E402  benchmarks/ is the script's folder

CLASSES = 100
NO_EXTENSION_EVERY = 101  # 1 file in 101 has no extension (spread over the classes: 101 and 100 are coprime)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_HEAD = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
_TAIL = _chunk(b"IDAT", zlib.compress(b"\x00\x80")) + _chunk(b"IEND", b"")


def tiny_png(i: int) -> bytes:
    """A valid 1 x 1 grey PNG, distinct for each ``i`` (a tEXt chunk holds it)."""
    return _HEAD + _chunk(b"tEXt", b"n\x00%d" % i) + _TAIL


def generate(root: Path, start: int, n: int) -> float:
    """Files ``start .. start+n-1`` into ``root/cNNN/``; returns the seconds taken."""
    t = time.perf_counter()
    folders = [str(root / f"c{c:03d}") for c in range(CLASSES)]
    for f in folders:
        os.makedirs(f, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(start, start + n):
        name = f"{i:07d}" if i % NO_EXTENSION_EVERY == NO_EXTENSION_EVERY - 1 else f"{i:07d}.png"
        fd = os.open(f"{folders[i % CLASSES]}/{name}", flags, 0o644)
        os.write(fd, tiny_png(i))
        os.close(fd)
    return time.perf_counter() - t


def _rchar() -> int:
    try:
        with open("/proc/self/io") as fh:
            return int(next(line for line in fh if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration):  # not Linux
        return -1


def _count_opens(data: str) -> list[int]:
    """Count the files under ``data`` that this process opens (hashing and sniffing go through ``open``)."""
    import builtins

    opened = [0]
    real_open, prefix = builtins.open, os.path.realpath(data)

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str) and file.startswith(prefix):
            opened[0] += 1
        return real_open(file, *args, **kwargs)

    builtins.open = counting_open
    return opened


def child(data: str, manifest: str, rehash: bool) -> None:
    """One measurement, in its own process: what the scan-dataset task does, without Prefect."""
    import builtins

    import importlib

    importlib.import_module("tasks.settings")  # the split settings' checks (a flow has them loaded)
    from storage.manifest import Manifest
    from tasks.data.datasets import cache_path_for, scan_dataset

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    real_open = builtins.open
    opened = _count_opens(data)
    from tasks.data import datasets

    split_s = [0.0]  # the split functions' own time (assign_splits, carve_test: logic this issue left alone)
    for name in ("assign_splits", "carve_test"):
        def timed(*a, _f=getattr(datasets, name), **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                split_s[0] += time.perf_counter() - t
        setattr(datasets, name, timed)
    stats: dict = {}
    r0 = _rchar()
    t0 = time.perf_counter()
    m = scan_dataset(data, cache=cache_path_for(manifest), rehash=rehash, stats=stats)
    t1 = time.perf_counter()
    fp = m.fingerprint()  # as the scan-dataset task: the fingerprint once, for its summary and the file
    m.save(manifest, fp)
    t2 = time.perf_counter()
    read = _rchar() - r0
    rss_scan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    builtins.open = real_open
    t3 = time.perf_counter()
    Manifest.load(manifest)
    t4 = time.perf_counter()
    print(json.dumps({"scan_s": t1 - t0, "save_s": t2 - t1, "total_s": t2 - t0, "load_s": t4 - t3,
                      "images": len(m.samples), "skipped": len(m.skipped), "fingerprint": fp,
                      "stats": stats, "split_functions_s": split_s[0],
                      "files_opened_under_data": opened[0], "bytes_read": read,
                      "rss_after_imports_mb": rss_imports, "peak_rss_mb": rss_scan,
                      "peak_rss_with_load_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "cache_bytes": os.path.getsize(cache_path_for(manifest)),
                      "manifest_bytes": os.path.getsize(manifest)}))


def measure(data: Path, manifest: Path, rehash: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(data), str(manifest)]
    if rehash:
        cmd.append("--rehash")
    env = dict(os.environ, CNNCODES_PROGRESS="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"measurement failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_file_costs(data: Path, sample: int = 3000) -> dict:
    """Single-threaded costs per file on a sample (page cache warm): stat, sha256 of a tiny file, sniff."""
    from storage.hashing import file_sha256
    from tasks.data.media import sniff

    files: list[str] = []
    for c in range(CLASSES):
        files += sorted(str(p) for p in (data / f"c{c:03d}").iterdir())[:sample // CLASSES]
    unnamed = [f for f in files if not f.endswith(".png")]
    for f in files[:100]:
        sniff(f)  # Pillow's import and plugin registration out of the timing
    out = {}
    for name, fn, items in (("stat", os.stat, files), ("sha256_tiny_file", file_sha256, files),
                            ("sniff", sniff, files)):
        t = time.perf_counter()
        for f in items:
            fn(f)
        out[f"{name}_us"] = round(1e6 * (time.perf_counter() - t) / len(items), 2)
    out["files_sampled"] = len(files)
    out["files_without_extension_sampled"] = len(unnamed)
    import hashlib

    block = os.urandom(1 << 20) * 64
    t = time.perf_counter()
    for _ in range(3):
        hashlib.sha256(block).digest()
    out["sha256_mb_per_s_one_core"] = round(3 * len(block) / (1 << 20) / (time.perf_counter() - t), 1)
    return out


PHASES = ("list", "cache_read", "lookup", "read", "cache_write", "splits")


def summary(runs: list[dict]) -> dict:
    """Medians over repeats of each figure."""
    def med(get):
        return round(statistics.median(get(r) for r in runs), 4)

    return {"repeats": len(runs), "total_s": med(lambda r: r["total_s"]), "scan_s": med(lambda r: r["scan_s"]),
            "save_s": med(lambda r: r["save_s"]), "load_s": med(lambda r: r["load_s"]),
            "phases_s": {p: med(lambda r, p=p: r["stats"]["seconds"][p]) for p in PHASES},
            "split_functions_s": med(lambda r: r["split_functions_s"]),
            "read_thread_hash_s": med(lambda r: r["stats"]["seconds"]["read_thread_hash"]),
            "read_thread_sniff_s": med(lambda r: r["stats"]["seconds"]["read_thread_sniff"]),
            "files_read": runs[0]["stats"]["read"], "files_reused": runs[0]["stats"]["reused"],
            "files_sniffed": runs[0]["stats"]["sniffed"],
            "files_opened_under_data": max(r["files_opened_under_data"] for r in runs),
            "bytes_read": med(lambda r: r["bytes_read"]),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "peak_rss_with_load_mb": round(max(r["peak_rss_with_load_mb"] for r in runs), 1),
            "rss_after_imports_mb": round(max(r["rss_after_imports_mb"] for r in runs), 1),
            "cache_rewritten": runs[0]["stats"]["cache_rewritten"],
            "cache_bytes": runs[0]["cache_bytes"], "manifest_bytes": runs[0]["manifest_bytes"],
            "images": runs[0]["images"], "totals_each_s": [round(r["total_s"], 3) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200_000, help="files to generate (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="20,000 files and fewer repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the re-runs (default: %(default)s)")
    ap.add_argument("--tmp", default=None, help="folder for the generated files (default: the system's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("DATA", "MANIFEST"), help=argparse.SUPPRESS)
    ap.add_argument("--rehash", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.rehash)
    n = 20_000 if args.quick else args.files
    repeats = 2 if args.quick else args.repeats
    n_new = max(1, n // 100)
    work = Path(tempfile.mkdtemp(prefix="cnncodes-rescan-", dir=args.tmp))
    try:
        data, manifest = work / "data", work / "out" / "runs" / "rescan.manifest.json"
        manifest.parent.mkdir(parents=True)
        cache = Path(str(manifest) + ".statcache")
        gen_s = generate(data, 0, n)
        time.sleep(2.1)  # past the racy margin: the first scan may record every file
        first = []
        for _ in range(2):
            cache.unlink(missing_ok=True)
            first.append(measure(data, manifest))
        rehash = [measure(data, manifest, rehash=True)]
        base_cache = work / "base.statcache"
        shutil.copy(cache, base_cache)
        staging = work / "new"  # the 1% new files, moved in for each 1%-new run and out after it
        generate(staging, n, n_new)
        moves = [(str(p), str(data / p.parent.name / p.name)) for p in sorted(staging.glob("*/*"))]
        no_change, new = [], []
        for _ in range(repeats):  # alternating, each from the same cache: paired runs on a shared machine
            shutil.copy(base_cache, cache)
            no_change.append(measure(data, manifest))
            for a, b in moves:
                os.rename(a, b)
            shutil.copy(base_cache, cache)
            new.append(measure(data, manifest))
            for a, b in moves:
                os.rename(b, a)
        costs = per_file_costs(data)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fp = {r["fingerprint"] for r in first + no_change + rehash}
    unnamed = sum(1 for i in range(n) if i % NO_EXTENSION_EVERY == NO_EXTENSION_EVERY - 1)
    res = {"files": n, "classes": CLASSES, "files_without_extension": unnamed, "new_files": n_new,
           "file_bytes": len(tiny_png(n)), "cores": os.cpu_count(), "generate_s": round(gen_s, 2),
           "generate_files_per_s": round(n / gen_s),
           "manifest_fingerprints": "identical" if len(fp) == 1 else f"{len(fp)} different",
           "first": summary(first), "no_change": summary(no_change), "rehash": summary(rehash),
           "one_percent_new": summary(new), "per_file": costs}
    f, u, w = res["first"], res["no_change"], res["one_percent_new"]
    read_per_file = f["phases_s"]["read"] / n  # wall seconds per file read in the first scan
    res["targets"] = {
        "no_change_s": u["total_s"], "no_change_target_s": 10.0 * n / 200_000,
        "no_change_met": u["total_s"] <= 10.0 * n / 200_000 and u["files_opened_under_data"] == 0,
        "one_percent_new_over_first": round(w["total_s"] / f["total_s"], 4),
        "one_percent_new_allowed_s": round(0.02 * f["total_s"] + n_new * read_per_file, 4),
        "one_percent_new_met": w["total_s"] <= 0.02 * f["total_s"] + n_new * read_per_file,
        "one_percent_new_minus_no_change_s": round(statistics.median(
            b["total_s"] - a["total_s"] for a, b in zip(no_change, new)), 4),
        "peak_rss_mb": max(f["peak_rss_mb"], u["peak_rss_mb"], w["peak_rss_mb"]),
        "peak_rss_target_mb": 500 * n / 200_000,
        "memory_met": max(f["peak_rss_mb"], u["peak_rss_mb"], w["peak_rss_mb"]) <= 500 * n / 200_000}
    for k in ("no_change", "one_percent_new", "memory"):
        res["targets"][k + "_verdict"] = "met" if res["targets"][k + "_met"] else "not met"
    scale = 1_000_000 / n
    res["at_1m_files"] = {
        "how": f"each measured phase x {scale:g} (linear in files); memory: RSS after imports + (peak - it) x {scale:g}",
        "first_s": round(f["total_s"] * scale, 1), "no_change_s": round(u["total_s"] * scale, 1),
        "one_percent_new_s": round(w["total_s"] * scale, 1),
        "no_change_phases_s": {p: round(v * scale, 2) for p, v in u["phases_s"].items()} | {
            "manifest_save": round(u["save_s"] * scale, 2)},
        "peak_rss_mb": round(u["rss_after_imports_mb"] + (max(f["peak_rss_mb"], w["peak_rss_mb"])
                                                          - u["rss_after_imports_mb"]) * scale),
        "peak_rss_with_load_mb": round(u["rss_after_imports_mb"] + (max(f["peak_rss_with_load_mb"],
                                                                        w["peak_rss_with_load_mb"])
                                                                    - u["rss_after_imports_mb"]) * scale),
        "cache_mb": round(u["cache_bytes"] * scale / 1e6, 1), "manifest_mb": round(u["manifest_bytes"] * scale / 1e6, 1),
        "sha256_100gb_s_all_cores": round(100e9 / (costs["sha256_mb_per_s_one_core"] * (1 << 20))
                                          / (os.cpu_count() or 1), 1)}
    emit(res, args.json)


if __name__ == "__main__":
    main()
