"""The confidence gate: retries on a temperature schedule, then rejection with the reason."""

from __future__ import annotations

import json

import pytest
from conftest import TAU, make_params
from llm_server import grounded_relabel, prompt_kind

from agenther.classify import classify
from agenther.extract import extract
from agenther.ingest import ingest
from agenther.llm import LLMClient
from agenther.relabel import relabel


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    params = make_params(tmp_path_factory.mktemp("p"))
    extracted = extract(classify(ingest(TAU, limit=12).trajectories, params), params).kept
    assert extracted.height >= 3
    return extracted.head(3)


def _run(candidates, server, tmp_path, **relabel_params):
    params = make_params(tmp_path, server, relabel=relabel_params)
    client = LLMClient(model="openai/local", api_base=server.api_base, api_key="x", cache_dir=tmp_path / "c")
    return relabel(candidates, params, client)


def test_low_confidence_is_retried_then_rejected(candidates, llm_server, tmp_path):
    llm_server.brain = lambda r: grounded_relabel(r, confidence=0.4)
    out = _run(candidates, llm_server, tmp_path, confidence_threshold=0.7, max_attempts=3,
               temperatures=[0.1, 0.6, 0.9])
    assert out.kept.height == 0
    assert out.rejected["reason"].to_list() == ["low_confidence"] * 3
    assert "attempt 3" in out.rejected["detail"][0]
    temps = sorted(r["temperature"] for r in llm_server.prompts_of("relabel"))
    assert temps == [0.1] * 3 + [0.6] * 3 + [0.9] * 3


def test_passes_the_gate_on_a_later_attempt(candidates, llm_server, tmp_path):
    def brain(request):
        return grounded_relabel(request, confidence=0.95 if request["temperature"] >= 0.5 else 0.3)

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path, confidence_threshold=0.7, max_attempts=3)
    assert out.kept.height == 3 and out.rejected.height == 0
    assert out.kept["relabel_attempts"].to_list() == [2, 2, 2]
    assert (out.kept["relabel_confidence"] >= 0.7).all()


def test_restating_the_failed_goal_is_rejected(candidates, llm_server, tmp_path):
    goals = {}
    for row in candidates.iter_rows(named=True):
        goals[row["id"]] = row["goal"]

    def brain(request):
        # A naive relabeler: hands the original goal back with high confidence.
        text = request["messages"][0]["content"]
        goal = next(g for g in goals.values() if g.strip() in text)
        return json.dumps({"hindsight_prompt": goal, "confidence": 0.99, "rationale": "same"})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"repeats_goal"}


def test_invalid_answers_are_rejected_with_the_reason(candidates, llm_server, tmp_path):
    llm_server.brain = lambda r: '{"hindsight_prompt": "Book it' if prompt_kind(r) == "relabel" else "{}"
    out = _run(candidates, llm_server, tmp_path, max_attempts=2)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"invalid_llm_answer"}
    assert "invalid JSON" in out.rejected["detail"][0]


def test_pasting_the_achievement_list_back_is_rejected(candidates, llm_server, tmp_path):
    def brain(request):
        # What small models really did on these logs: echo an achievement line as the "request".
        achievements = request["messages"][0]["content"].split("ACHIEVEMENTS:\n", 1)[1]
        line = achievements.splitlines()[0]
        echo = line[2:].split(" (steps")[0].replace("_", " ").split("{")[0].strip()
        return json.dumps({"hindsight_prompt": echo.capitalize(), "confidence": 0.95, "rationale": "r"})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"copies_achievement"}
