from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/llm_server.py

from llm_server import FakeLLMServer, careful_brain  # noqa: E402

import agenther  # noqa: E402,F401  (quiet-environment defaults before anything else)

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
TOOLBENCH = ROOT / "data/raw/toolbench/answer"


@pytest.fixture
def llm_server():
    """A scripted OpenAI-compatible server; tests may replace `.brain`."""
    with FakeLLMServer(careful_brain) as server:
        yield server


def params_overrides(cache: Path, server: FakeLLMServer | str | None = None, **sections: dict) -> dict:
    """The params a test sets over params.yaml's defaults: the LLM cache in `cache`; with a
    `server` (the scripted one, or an api_base URL) the model `openai/local` at it with short
    retries; then each of `sections` merged into its section (llm={...} adds to the llm keys)."""
    llm: dict = {"cache_dir": str(cache)}
    if server is not None:
        api_base = server if isinstance(server, str) else server.api_base
        llm |= {"model": "openai/local", "api_base": api_base, "max_retries": 2, "timeout_s": 20}
    overrides: dict = {"llm": llm}
    for name, values in sections.items():
        overrides[name] = overrides.get(name, {}) | values
    return overrides


def make_params(tmp_path: Path, server: FakeLLMServer | str | None = None, **sections: dict) -> dict:
    """Loaded params (params_overrides, cache in tmp_path/cache), for calling stage functions."""
    from agenther.params import load_params

    return load_params(None, params_overrides(tmp_path / "cache", server, **sections))


def write_params(path: Path, server: FakeLLMServer | str | None = None, *, cache: Path | None = None,
                 **sections: dict) -> Path:
    """A params file (params_overrides, cache beside it unless given) for `--params`; returns its path."""
    path.write_text(yaml.safe_dump(params_overrides(cache or path.parent / "cache", server, **sections)))
    return path


def whole_run_goal(messages: list[dict]) -> str:
    """An achieved goal (JSON) whose sample is the whole run, every assistant turn training: for
    tests of what packaging and judging do with a goal, not of how extract computes one."""
    from agenther.evidence.goal import AchievedGoal

    train = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return AchievedGoal(sample_end=len(messages), train_steps=train).model_dump_json()
