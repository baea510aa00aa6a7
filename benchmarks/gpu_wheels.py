"""The wheels a GPU node without TensorFlow lacks to run cnncodes on JAX or PyTorch.

A GPU node of the kind this project is lent carries PyTorch, JAX, NumPy, h5py, scikit-learn, pandas, Pillow
and more (``benchmarks/gpu-node-packages.txt``, the node's own package list) but no Keras, no Prefect, no
TensorFlow and no package index. This script walks the requirements of ``cnncodes[jax,dev]`` as installed in
this environment (the versions of constraints.txt), leaves out what the node already has and TensorFlow's own
tree, and downloads the rest as wheels for CPython 3.12 on manylinux x86_64 (the node's Python) into ``.whl/``,
which ``benchmarks/gpu.sh`` installs there with ``pip --no-index``.

Usage (here, where the package index is reachable):
    .venv/bin/python benchmarks/gpu_wheels.py            # downloads into .whl/, prints names and sizes
    .venv/bin/python benchmarks/gpu_wheels.py --list     # only the list of name==version
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
NODE_PACKAGES = Path(__file__).with_name("gpu-node-packages.txt")
# Never carried: TensorFlow's tree is what the node cannot hold; the backends are the node's own.
NEVER = {"tensorflow", "tensorboard", "torch", "jax", "jaxlib"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64", "manylinux_2_5_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def node_packages() -> set[str]:
    return {canonical(line.strip()) for line in NODE_PACKAGES.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def closure(root: str = "cnncodes", extras: tuple[str, ...] = ("jax", "dev")) -> dict[str, str]:
    """``{name: version}`` of every distribution ``root[extras]`` needs here, on CPython 3.12 Linux."""
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found: dict[str, str] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonical(name)
        if key in NEVER:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-only need (another platform or Python): not installed here, not needed there
        if key not in found:
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (wanted or {""})):
                continue
            if canonical(req.name) not in found:
                todo.append((req.name, set(req.extras)))
    found.pop(canonical(root), None)
    return found


def missing_on_node() -> dict[str, str]:
    have = node_packages()
    return {k: v for k, v in sorted(closure().items()) if k not in have}


def download(pins: dict[str, str], dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    specs = [f"{k}=={v.split('+')[0]}" for k, v in pins.items()]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(dest), *specs], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print name==version of each wheel and stop")
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    a = ap.parse_args()
    pins = missing_on_node()
    if a.list:
        print("\n".join(f"{k}=={v}" for k, v in pins.items()))
        return 0
    dest = Path(a.dest)
    for old in dest.glob("*.whl"):  # one version of each: two would stop the install there
        old.unlink()
    download(pins, dest)
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(pins)} wheels, {total / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
