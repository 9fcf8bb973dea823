"""The confidence gate: retries on a temperature schedule, then rejection with the reason."""

from __future__ import annotations

import json
import re

import pytest
from conftest import TAU, ingest, make_params
from llm_server import grounded_relabel, prompt_kind, user_text

from agenther.evidence.goal import describe_action, describe_goal
from agenther.llm import LLMClient
from agenther.stages.classify import classify
from agenther.stages.extract import extract
from agenther.stages.relabel import FACT_CHARS, FACTS, goal_of, relabel


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


def test_the_relabeler_sees_the_goal_not_the_transcript(candidates, llm_server, tmp_path):
    _run(candidates, llm_server, tmp_path)
    texts = [user_text(r) for r in llm_server.prompts_of("relabel")]
    assert len(texts) == candidates.height
    for row in candidates.iter_rows(named=True):
        goal = goal_of(row)
        # the computed goal: its writes, or (none) what the agent looked up and told the user
        shown = [describe_action(a) for a in goal.actions] or [
            *(describe_action(r) for f in goal.facts[-FACTS:] for r in f.reads), *(f.text[:40] for f in goal.facts[-FACTS:])]
        text = next(t for t in texts if all(line in t for line in shown))
        assert row["goal"].strip() not in text  # the failed goal is never shown (small models echo it)
        assert "TOOL RESULT" not in text and "[1] USER" not in text  # no transcript
        # the fixed instructions come first, so a prefix cache reuses them across records
        assert text.index("Return JSON") < text.index("RECORD:")


def test_a_coverage_miss_is_fed_back_and_fixed_on_the_next_attempt(candidates, llm_server, tmp_path):
    def brain(request):
        if "WAS REJECTED" in user_text(request):
            return grounded_relabel(request)
        return json.dumps({"hindsight_prompt": "Please help me with my trip plans today.", "confidence": 0.9})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path, max_attempts=2)
    # a vague request covers no write, and names nothing the agent reported: every candidate
    # needed the second attempt, which was told why the first failed
    assert out.kept.height == 3 and out.kept["relabel_attempts"].to_list() == [2, 2, 2]
    assert any(goal_of(r).actions for r in candidates.iter_rows(named=True))
    assert any(not goal_of(r).actions for r in candidates.iter_rows(named=True))
    retries = [r for r in llm_server.prompts_of("relabel") if "WAS REJECTED" in user_text(r)]
    # each retry is told which details the request still has to name
    assert len(retries) == 3 and all(re.search(r"FIX: .*Name (all|one or more) of: \S", user_text(r)) for r in retries)


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
    # The relabeler never sees the failed goal; this one knows it anyway (as a model that saw the
    # task elsewhere would) and hands it back with high confidence.
    goals = {describe_goal(goal_of(row), FACTS, FACT_CHARS).split("\n")[1]: row["goal"]
             for row in candidates.iter_rows(named=True)}

    def brain(request):
        record = request["messages"][0]["content"].partition("RECORD:")[2]  # not the template's examples
        goal = next(g for line, g in goals.items() if line in record)
        return json.dumps({"hindsight_prompt": goal, "confidence": 0.99, "rationale": "same"})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"repeats_goal"}, out.rejected["detail"].to_list()


def test_invalid_answers_are_rejected_with_the_reason(candidates, llm_server, tmp_path):
    llm_server.brain = lambda r: '{"hindsight_prompt": "Book it' if prompt_kind(r) == "relabel" else "{}"
    out = _run(candidates, llm_server, tmp_path, max_attempts=2)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"invalid_llm_answer"}
    assert "invalid JSON" in out.rejected["detail"][0]


def test_pasting_the_achievement_list_back_is_rejected(candidates, llm_server, tmp_path):
    def brain(request):
        # What small models really did on these logs: echo a record line as the "request".
        record = user_text(request).partition("RECORD:")[2].split("DONE:\n", 1)[1]
        echo = record.splitlines()[0][2:].strip()
        return json.dumps({"hindsight_prompt": echo.capitalize(), "confidence": 0.95, "rationale": "r"})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"copies_achievement"}
