"""Running cnncodes on another Keras backend, in its own process (Keras fixes its backend when it is imported).

:func:`run_on` runs a Python script with ``KERAS_BACKEND`` set and returns the JSON object its last line prints;
with ``without_tensorflow`` the process cannot see TensorFlow (as on a GPU node that has only JAX or PyTorch): a
``sitecustomize`` on its path makes sys.path's finder blind to ``tensorflow`` and its submodules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OTHER_BACKENDS = ("jax", "torch")

BLOCK_TENSORFLOW = textwrap.dedent('''
    import importlib.machinery
    import sys


    class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
        """sys.path's finder, blind to TensorFlow: `import tensorflow` fails and find_spec finds nothing, as on a
        machine where it is not installed."""

        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname == "tensorflow" or fullname.startswith("tensorflow."):
                return None
            return super().find_spec(fullname, path, target)


    sys.meta_path[:] = [_PathFinderWithoutTensorFlow if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
''')


def run_on(backend: str, script: str, tmp_path: Path, *, without_tensorflow: bool = False,
           timeout: int = 600, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` (dedented) on ``backend``; returns the JSON object printed on its last stdout line."""
    paths = [str(ROOT)]
    if without_tensorflow:
        site = tmp_path / "no-tensorflow"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
        paths.insert(0, str(site))
    full_env = {**os.environ, **(env or {}), "KERAS_BACKEND": backend,
                "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"on {backend}: exit {done.returncode}\n{done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"on {backend}: no JSON printed\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return json.loads(lines[-1])
