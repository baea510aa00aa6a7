"""The worker process of tests/test_fuzz.py: reads one damaged file per case and says what came of it.

A hang inside HDF5's C code cannot be interrupted from a thread, so the cases run here, in a process the
test can kill: one JSON case per line on stdin, one JSON answer per line on stdout. An answer says how
the read ended ("read" with what was read, "error" with the message of a CnncodesError, or "crash" with
any other exception), for a store also what ``verify_store`` found, and how long it all took.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from storage import CnncodesError, Manifest, ModelRegistry, open_store  # noqa: E402
from storage.verify import verify_store  # noqa: E402


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def read_store(path: str) -> dict:
    store = open_store(path)
    prov = store.provenance
    c = store.read("l1", "avg")
    return {"features": c.features.tolist(), "paths": list(c.paths), "labels": c.labels.tolist(),
            "splits": list(c.splits), "sha256": list(c.sha256), "class_names": c.class_names,
            "provenance": {k: _plain(prov.get(k)) for k in ("backbone", "weights", "input_size", "class_names",
                                                            "skipped", "updated")}}


def read_registry(root: str) -> dict:
    reg = ModelRegistry(root)
    model, rec = reg.load("m", "champion")
    return {"model": _plain(model), "metadata": rec.metadata, "aliases": reg.aliases("m"),
            "splits": reg.splits("m"), "history": reg.history("m"), "record_v1": reg.record("m", 1).metadata}


def read_manifest(path: str) -> dict:
    return Manifest.load(path).to_dict()


READERS = {"store": read_store, "registry": read_registry, "manifest": read_manifest}


def run(case: dict) -> dict:
    t0 = time.monotonic()
    out: dict = {"id": case["id"]}
    try:
        out["value"] = READERS[case["kind"]](case["path"])
        out["outcome"] = "read"
    except CnncodesError as exc:
        out.update(outcome="error", message=str(exc), type=type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - the test reports it as a failure
        out.update(outcome="crash", message=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    if case["kind"] == "store":
        try:
            v = verify_store(case["path"])
            out["verify"] = {"ok": v["ok"], "problems": v["problems"], "damaged": v["damaged"]}
        except CnncodesError as exc:
            out["verify"] = {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001
            out["verify"] = {"crash": f"{type(exc).__name__}: {exc}"}
    out["seconds"] = time.monotonic() - t0
    return out


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
