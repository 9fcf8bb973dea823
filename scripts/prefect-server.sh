#!/usr/bin/env bash
# A local Prefect server (API + UI) for agenther, in the foreground; Ctrl-C stops it.
#
#   bash scripts/prefect-server.sh [PORT]        (default 4200, or $PREFECT_SERVER_PORT)
#
# Listens on 127.0.0.1 only; its SQLite database, settings and task results live under
# .prefect/ in the project (PREFECT_HOME); analytics off. Then, in other shells:
#   export PREFECT_API_URL=http://127.0.0.1:PORT/api PREFECT_HOME=$PWD/.prefect
#   .venv/bin/python -m flows.serve          # serve the deployments (see flows/serve.py)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
port="${1:-${PREFECT_SERVER_PORT:-4200}}"

export PREFECT_HOME="$root/.prefect"
export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$PREFECT_HOME/prefect.db"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export DVC_NO_ANALYTICS=1 AWS_EC2_METADATA_DISABLED=true LITELLM_LOCAL_MODEL_COST_MAP=True
unset PREFECT_API_URL  # the server itself must not point at another API
mkdir -p "$PREFECT_HOME"

[[ -x .venv/bin/prefect ]] || { echo "prefect-server: no .venv: run scripts/setup.sh first" >&2; exit 1; }
if curl -sf "http://127.0.0.1:$port/api/health" >/dev/null 2>&1; then
    echo "prefect-server: something already answers on 127.0.0.1:$port (a server from an earlier start?)" >&2
    exit 1
fi

.venv/bin/prefect server start --host 127.0.0.1 --port "$port" --analytics-off &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' INT TERM EXIT

for _ in $(seq 120); do  # healthy after 4-15 s on 2 cores
    curl -sf "http://127.0.0.1:$port/api/health" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { echo "prefect-server: the server exited during startup" >&2; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/api/health" >/dev/null 2>&1 \
    || { echo "prefect-server: no answer from 127.0.0.1:$port after 120 s" >&2; exit 1; }

cat <<EOF

  Prefect UI:  http://127.0.0.1:$port
  API:         http://127.0.0.1:$port/api   (database: $PREFECT_HOME/prefect.db)

  In another shell, from $root:
    export PREFECT_API_URL=http://127.0.0.1:$port/api PREFECT_HOME=$PREFECT_HOME
    .venv/bin/python -m flows.serve            # deployments: hindsight/manual, /scheduled, /on-new-logs, watch-logs/watch

EOF
wait "$server"
