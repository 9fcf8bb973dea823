#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the whole pipeline on the shipped
# tau-bench airline logs with the embedded local model.
#   DEMO_LIMIT=N (default 24) trajectories; DEMO_OUT=DIR (default out/tau-bench).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DVC_NO_ANALYTICS=1 AWS_EC2_METADATA_DISABLED=true DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false LITELLM_LOCAL_MODEL_COST_MAP=True

bash scripts/setup.sh --model qwen2.5-coder-0.5b

out="${DEMO_OUT:-out/tau-bench}"
.venv/bin/agenther run --params params.yaml --input data/raw/tau-bench/gpt-4o-airline.json \
    --format tau-bench --out "$out" --limit "${DEMO_LIMIT:-24}" "$@"
echo "demo: outputs in $out (summary.json, dataset_card.md, sft.jsonl, dpo.jsonl, sharegpt.jsonl)"
