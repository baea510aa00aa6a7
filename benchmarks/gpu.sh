#!/usr/bin/env bash
# GPU check (issue 30) for a GPU node without TensorFlow, as most GPU cloud images are: PyTorch and JAX built for
# CUDA, NumPy, h5py, scikit-learn, pandas, Pillow, but no TensorFlow, Keras or Prefect, and no package index.
#
#   bash benchmarks/gpu.sh wheels      # here, where the package index is reachable: what the node lacks (Keras,
#                                      # Prefect, pydantic, ...; benchmarks/gpu_wheels.py) as CPython 3.12 wheels
#                                      # at the versions of constraints.txt, into .whl/ (about 42 MB)
#   bash benchmarks/gpu.sh             # there, .whl carried beside the repository: installs the wheels into
#                                      # /tmp/site without an index, then runs benchmarks/gpu.py (the GPU tests
#                                      # and the figures) on JAX, then briefly on PyTorch where it is installed;
#                                      # one JSON per backend in $OUT or benchmarks/results (gpu-jax.json, ...)
#   bash benchmarks/gpu.sh --dry-run   # here, on the CPU: the same run with tiny counts, in .venv's Python with
#                                      # TensorFlow blocked (as on the node); checks that the repository and the
#                                      # wheels fit the 64 MiB a call to the GPU node may carry
# Under 8 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=run
for arg in "$@"; do
    case "$arg" in
        wheels) mode=wheels ;;
        --dry-run) mode=dry ;;
        *) echo "usage: bash benchmarks/gpu.sh [wheels | --dry-run]" >&2; exit 2 ;;
    esac
done
results="${OUT:-benchmarks/results}"
mkdir -p "$results"

carried_size() {  # bytes that travel to the node: the tracked files and the wheels
    local repo wheels
    repo=$(git ls-files -z | xargs -0 cat | wc -c)
    wheels=$(cat .whl/*.whl | wc -c)
    echo $((repo + wheels))
}

case "$mode" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_wheels.py
    ;;
dry)
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash benchmarks/gpu.sh wheels' first" >&2; exit 1; }
    size=$(carried_size)
    echo "repository + wheels: $((size / 1048576)) MiB of the 64 MiB a call may carry" >&2
    [ "$size" -le $((64 * 1048576)) ] || { echo "too large to carry to the GPU node" >&2; exit 1; }
    export GPU_CHECK_CARRIED_BYTES=$size GPU_CHECK_WHEELS=$(ls .whl/*.whl | wc -l)
    block=$(mktemp -d)
    trap 'rm -rf "$block"' EXIT
    .venv/bin/python -c "import sys; sys.path.insert(0, '.'); from tests.backends import BLOCK_TENSORFLOW; print(BLOCK_TENSORFLOW)" \
        > "$block/sitecustomize.py"
    export PYTHONPATH="$block:$PWD" PYTHONUNBUFFERED=1
    for backend in jax torch; do
        KERAS_BACKEND=$backend .venv/bin/python benchmarks/gpu.py --dry-run --json "$results/gpu-$backend-dry-run.json" >/dev/null
        echo "dry run on $backend: $results/gpu-$backend-dry-run.json" >&2
    done
    ;;
run)
    nvidia-smi -L >&2 || { echo '{"error": "nvidia-smi found no GPU: run this on a machine with an NVIDIA GPU"}'; exit 1; }
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash benchmarks/gpu.sh wheels' where the package index is reachable, and carry .whl" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
    status=0
    KERAS_BACKEND=jax python3 benchmarks/gpu.py --json "$results/gpu-jax.json" >/dev/null || status=1
    if python3 -c "import torch" 2>/dev/null; then  # PyTorch: the tests and the float16 figures, decoded inputs
        KERAS_BACKEND=torch python3 benchmarks/gpu.py --precisions float32,float16 --sources decoded \
            --json "$results/gpu-torch.json" >/dev/null || status=1
    fi
    exit $status
    ;;
esac
