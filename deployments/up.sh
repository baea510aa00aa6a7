#!/usr/bin/env bash
# A local Prefect server (SQLite) with every cnncodes flow deployed and a worker per pool.
#   deployments/up.sh            # then: prefect deployment run 'transfer/transfer' --param data=... --watch
#   deployments/down.sh          # stops the workers, then the server
# Environment: PORT (4200), PREFECT_HOME (~/.prefect), OUT (cnncodes-out).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BIN="$ROOT/.venv/bin"
PORT="${PORT:-4200}"
OUT="${OUT:-cnncodes-out}"
mkdir -p "$OUT/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export CNNCODES_ROOT="$ROOT"

if ! curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$OUT/prefect/server.log" 2>&1 &
  echo $! >"$OUT/prefect/server.pid"
  for _ in $(seq 1 60); do curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1 && break; sleep 1; done
  curl -fs "$PREFECT_API_URL/health" >/dev/null || { echo "server did not start; see $OUT/prefect/server.log"; exit 1; }
fi
for pool in cnncodes-cpu cnncodes-gpu; do
  "$BIN/prefect" work-pool inspect "$pool" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$pool" --type process
done
"$BIN/prefect" concurrency-limit inspect gpu >/dev/null 2>&1 || "$BIN/prefect" concurrency-limit create gpu 1
"$BIN/prefect" deploy --prefect-file deployments/prefect.yaml --all --no-prompt
for pool in cnncodes-cpu cnncodes-gpu; do
  "$BIN/prefect" worker start --pool "$pool" >"$OUT/prefect/worker-$pool.log" 2>&1 &
  echo $! >"$OUT/prefect/worker-$pool.pid"
done
cat <<MSG
Prefect UI and API: http://127.0.0.1:$PORT    (export PREFECT_API_URL=$PREFECT_API_URL in every shell)
Deployments: transfer, extract, train-linear, sweep, fine-tune, predict, retrain (nightly at 03:00 UTC).
Run one:     prefect deployment run 'transfer/transfer' --param data=$ROOT/cnncodes-out/demo-data --watch
Stop:        deployments/down.sh
MSG
