from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def make_params(tmp_path: Path, server: FakeLLMServer | None = None, **sections: dict) -> dict:
    """Defaults pointed at the test server and a per-test cache, with section overrides."""
    from agenther.params import load_params

    overrides: dict = {"llm": {"cache_dir": str(tmp_path / "cache"), "max_retries": 2, "timeout_s": 20}}
    if server is not None:
        overrides["llm"] |= {"model": "openai/local", "api_base": server.api_base}
    for name, values in sections.items():
        overrides[name] = overrides.get(name, {}) | values
    return load_params(None, overrides)


def whole_run_goal(messages: list[dict]) -> str:
    """An achieved goal (JSON) whose sample is the whole run, every assistant turn training: for
    tests of what packaging and judging do with a goal, not of how extract computes one."""
    from agenther.goal import AchievedGoal

    train = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return AchievedGoal(sample_end=len(messages), train_steps=train).model_dump_json()
