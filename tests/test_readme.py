"""The README's examples run as written."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_worked_analyst_example_runs_on_a_store(tmp_path):
    """The embedding example, against a store made like `make run` makes it (paths rewritten to tmp)."""
    import numpy as np

    from storage import Manifest, Sample
    from storage.store import GroupSpec, StoreWriter

    example = next(b for b in _blocks("python") if "embedding.png" in b)
    store = tmp_path / "cnncodes-out" / "stores" / "demo-data__mobilenet-alpha0.25__imagenet.h5"
    rng = np.random.default_rng(0)
    names = ["blobs", "checks", "rings", "stripes"]
    samples = [Sample(f"{names[c]}/{i}.jpg", f"{c}{i:063x}", c, "val" if i % 5 == 0 else "train")
               for c in range(4) for i in range(30)]
    X = (rng.normal(0, 1, (4, 256))[[s.label for s in samples]] + rng.normal(0, 1, (120, 256))).astype("f4")
    spec = GroupSpec("conv_pw_13_relu", "avg", (256,))
    with StoreWriter(store, {"backbone": "mobilenet"}, [spec]) as w:
        m = Manifest("/d", "folders", names, samples)
        w.plan(m)
        w.start_appending()
        w.append(spec.name, [s.path for s in samples], [s.sha256 for s in samples], [s.label for s in samples],
                 [s.split for s in samples], X)
        w.finish(m)
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + example
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = float(re.search(r"val accuracy of my own classifier: ([0-9.]+)", out.stdout).group(1))
    assert acc > 0.8
    png = tmp_path / "cnncodes-out" / "embedding.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10000
