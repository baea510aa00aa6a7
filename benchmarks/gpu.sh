#!/usr/bin/env bash
# GPU check (issue 12). Needs a fresh clone, an NVIDIA GPU and the package index (to install the GPU
# build of TensorFlow). Runs the GPU tests and the GPU measurements, prints one JSON summary and keeps
# it in benchmarks/results/gpu.json; `benchmarks/gpu.py --markdown benchmarks/results/gpu.json` turns it
# into the table of BENCHMARKS.md. Under 8 minutes on one H100 (install included once the wheels are cached).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! nvidia-smi -L >&2; then
    echo '{"error": "nvidia-smi found no GPU: run this on a machine with an NVIDIA GPU and its driver"}'
    exit 1
fi
make install-gpu >&2
mkdir -p benchmarks/results
exec .venv/bin/python benchmarks/gpu.py --json benchmarks/results/gpu.json "$@"
