#!/usr/bin/env bash
# The project's local S3 (SeaweedFS on 127.0.0.1:8333) behind DVC's default remote `store`:
#   bash scripts/s3.sh start    # start it (keys generated once into .agenther-s3/credentials.env,
#                               #   written to .dvc/config.local for dvc push/pull; bucket created)
#   bash scripts/s3.sh status   # exit 0 if it answers
#   bash scripts/s3.sh stop     # SIGTERM, then SIGKILL after 20 s; data kept in .agenther-s3/weed
# Extra options: --port N (S3 port), --dir PATH (state folder). Same as `agenther s3 ...`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# No phoning home, no metadata-endpoint hangs.
export DVC_NO_ANALYTICS=1 AWS_EC2_METADATA_DISABLED=true DO_NOT_TRACK=1

if [[ ! -x .venv/bin/python ]]; then
    echo "s3.sh: .venv is missing: run  bash scripts/setup.sh  first" >&2
    exit 2
fi
exec .venv/bin/python -m agenther.devtools.s3_cli "$@"
