#!/usr/bin/env bash
# The main job on a fresh machine, with the embedded defaults: set up, start the local S3
# (SeaweedFS on 127.0.0.1), run the `hindsight` Prefect flow (Prefect's temporary local API,
# SQLite under ~/.prefect) on the shipped tau-bench airline logs with the local llama.cpp
# model, and push the dataset to s3://agenther/datasets/<params hash>/<flow run id>/.
#   DEMO_LIMIT=N trajectories (default: all 200); DEMO_OUT=DIR (default out/tau-bench);
#   DEMO_KEEP_S3=1 leaves the S3 server running afterwards (bash scripts/s3.sh stop).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DVC_NO_ANALYTICS=1 AWS_EC2_METADATA_DISABLED=true DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false LITELLM_LOCAL_MODEL_COST_MAP=True

bash scripts/setup.sh --model qwen2.5-coder-1.5b

started_s3=0
if ! bash scripts/s3.sh status >/dev/null 2>&1; then
    bash scripts/s3.sh start
    started_s3=1
fi
stop_s3() { [[ $started_s3 == 1 && "${DEMO_KEEP_S3:-0}" != 1 ]] && bash scripts/s3.sh stop || true; }
trap stop_s3 EXIT
set -a; source .agenther-s3/credentials.env; set +a   # endpoint and keys for the push, never printed

out="${DEMO_OUT:-out/tau-bench}"
limit=()
[[ -n "${DEMO_LIMIT:-}" ]] && limit=(--limit "$DEMO_LIMIT")
.venv/bin/python -m flows.hindsight --params params.yaml --input data/raw/tau-bench/gpt-4o-airline.json \
    --format tau-bench "${limit[@]}" --out "$out" --push-url s3://agenther/datasets "$@"
echo "demo: outputs in $out (summary.json, dataset_card.md, openai/, trl/, llamafactory/, hf/); copy pushed to s3://agenther/datasets"
