#!/usr/bin/env bash
# GPU figures where TensorFlow cannot be installed: benchmarks/gpu_keras_jax.py (the same Keras networks on
# JAX, and cnncodes' own decoder), on a GPU machine that has JAX, Pillow, NumPy, h5py and scikit-learn but no
# package index (as the machines lent to this project have). Two steps:
#
#   bash benchmarks/gpu_jax.sh wheels   # here, with the package index: the missing pure wheels, at the
#                                       # versions of constraints.txt, for CPython 3.12, into .whl/
#   bash benchmarks/gpu_jax.sh run      # there, with .whl/ carried: installs them into /tmp/site and writes
#                                       # benchmarks/results/gpu-keras-jax.json (about 2 minutes on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(keras namex optree pydantic pydantic_core annotated-types typing-inspection typing_extensions)

case "${1:-}" in
wheels)
    specs=()
    for name in "${WHEELS[@]}"; do
        pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt | head -1)
        [ -n "$pin" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
        specs+=("$pin")
    done
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
    ls .whl
    ;;
run)
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash benchmarks/gpu_jax.sh wheels' first, where the package index is reachable, and carry .whl" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
    mkdir -p benchmarks/results
    exec python3 benchmarks/gpu_keras_jax.py --json "${OUT:-benchmarks/results}/gpu-keras-jax.json" "${@:2}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_jax.sh wheels|run" >&2
    exit 2
    ;;
esac
