#!/usr/bin/env bash
# The project's test command:  bash scripts/test.sh [extra pytest args]
# Brings .venv up to date (idempotent, ~1 s when nothing changed; the tests only need the
# small smollm2-135m model and the embedded default qwen2.5-coder-1.5b), then runs the whole suite
# against real local services. Extra args go to pytest: `-m "not slow"` is the quick loop (the
# tests marked slow in pyproject.toml's sense: whole runs, real models, DVC, Prefect, SeaweedFS).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# No phoning home and no metadata-endpoint hangs in anything the tests start.
export DVC_NO_ANALYTICS=1 AWS_EC2_METADATA_DISABLED=true DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false LITELLM_LOCAL_MODEL_COST_MAP=True

# --consumers: the exports' real consumers (datasets, TRL, LLaMA-Factory) in their own venvs, for
# tests/test_consumers.py (slow; a missing environment fails those tests, it never skips them).
bash scripts/setup.sh --model smollm2-135m --model qwen2.5-coder-1.5b --consumers

# The review page's test drives a real headless browser: Debian's chromium (playwright's Python
# client talks to it; playwright's own browser downloads are never used).
if ! command -v chromium >/dev/null; then
    echo "test.sh: installing Debian's chromium (for tests/test_review.py)"
    sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

status=0
.venv/bin/python -m pytest -q tests "$@" || status=$?
if [[ $status -eq 5 ]]; then
    # pytest's "no tests collected" must never pass as green.
    echo "test.sh: FAILED: pytest collected no tests (exit 5): check tests/ and the -k/-m filters" >&2
    exit 1
fi
exit "$status"
