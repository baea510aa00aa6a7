#!/usr/bin/env bash
# Stop what deployments/up.sh started: workers first (a worker whose server is gone ignores SIGTERM), then the server.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-cnncodes-out}"
for f in "$OUT"/prefect/worker-*.pid "$OUT/prefect/server.pid"; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill -INT "$pid" 2>/dev/null
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -TERM "$pid" 2>/dev/null
  rm -f "$f"
done
echo stopped
