"""The relabel gate: what the relabeler sees, retries on a temperature schedule, then rejection with
the reason; and the conversations that need no relabeler at all."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from conftest import TAU, ingest, make_params
from llm_server import grounded_relabel, prompt_kind, turns_of, user_text

from agenther.evidence.goal import describe_action
from agenther.llm import LLMClient
from agenther.stages.classify import classify
from agenther.stages.extract import extract
from agenther.stages.relabel import goal_of, relabel, ruled_and_written


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    params = make_params(tmp_path_factory.mktemp("p"))
    return extract(classify(ingest(TAU).trajectories, params), params).kept


@pytest.fixture(scope="module")
def candidates(extracted):
    """Three candidates whose plan has a turn to write that must drop something (not only add)."""
    def drops(row: dict) -> bool:
        return any(e.unask or e.unsay or e.instead for e in ruled_and_written(row)[1])  # (rules leave these)

    chosen = extracted.filter(pl.Series([drops(r) for r in extracted.iter_rows(named=True)]))
    assert chosen.height >= 3
    return chosen.head(3)


def _run(candidates, server, tmp_path, **relabel_params):
    params = make_params(tmp_path, server, relabel=relabel_params)
    client = LLMClient(model="openai/local", api_base=server.api_base, api_key="x", cache_dir=tmp_path / "c")
    return relabel(candidates, params, client)


def test_the_relabeler_sees_the_goal_and_the_turns_to_write_not_the_transcript(candidates, llm_server, tmp_path):
    _run(candidates, llm_server, tmp_path)
    texts = [user_text(r) for r in llm_server.prompts_of("relabel")]
    assert len(texts) == candidates.height
    for row in candidates.iter_rows(named=True):
        goal = goal_of(row)
        shown = [describe_action(a) for a in goal.actions] or ["(no change of state)"]
        text = next(t for t in texts if all(line in t for line in shown))
        asked = turns_of({"messages": [{"content": text}]})
        written = ruled_and_written(row)[1]
        assert [t.original for t in asked] == [" ".join(row["messages"][e.step]["content"].split()) for e in written]
        # only those user turns: no tool result, no assistant turn, no other user turn
        others = [m["content"] for i, m in enumerate(row["messages"]) if m["content"] and m["role"] != "system"
                  and i not in {e.step for e in written} and len(m["content"]) > 30]
        assert "TOOL RESULT" not in text and not any(o in text for o in others)
        # the fixed instructions come first, so a prefix cache reuses them across records
        assert text.index("Return JSON") < text.index("RECORD:")


def test_a_conversation_that_needs_no_writer_makes_no_call(extracted, llm_server, tmp_path):
    # rules only add to these (a turn rules take something from may still need the model)
    def rules_only_add(row: dict) -> bool:
        return not any(e.unask or e.unsay or e.instead for e in goal_of(row).edits) and not ruled_and_written(row)[1]

    ruled = extracted.filter(pl.Series([rules_only_add(r) for r in extracted.iter_rows(named=True)]))
    assert ruled.height >= 3
    out = _run(ruled, llm_server, tmp_path)
    assert llm_server.prompts_of("relabel") == []
    assert out.kept.height + out.rejected.height == ruled.height and out.kept.height
    assert set(out.kept["relabel_model"]) == {"rules"} and set(out.kept["relabel_attempts"]) == {0}


def test_a_coverage_miss_is_fed_back_and_fixed_on_the_next_attempt(candidates, llm_server, tmp_path):
    def brain(request):
        if "WAS REJECTED" in user_text(request):
            return grounded_relabel(request)
        return json.dumps({"turns": [{"turn": t.number, "text": "Please help me with my trip plans today."}
                                     for t in turns_of(request)], "confidence": 0.9})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path, max_attempts=2)
    # vague turns lose what the agent then used, and ask for nothing the run did: every candidate
    # needed the second attempt, which was told why the first failed and what to do
    assert out.kept.height == 3 and out.kept["relabel_attempts"].to_list() == [2, 2, 2]
    retries = [r for r in llm_server.prompts_of("relabel") if "WAS REJECTED" in user_text(r)]
    assert len(retries) == 3 and all(re.search(r"REJECTED: \S.*\nFIX: \S", user_text(r)) for r in retries)


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


def test_handing_the_turns_back_unchanged_is_rejected(candidates, llm_server, tmp_path):
    # Each candidate has a turn that must drop something the goal lacks; a relabeler that echoes the
    # original turns (as small models do) hands back what the user side must no longer say.
    def brain(request):
        return json.dumps({"turns": [{"turn": t.number, "text": t.original} for t in turns_of(request)],
                           "confidence": 0.99, "rationale": "same"})

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
        return json.dumps({"turns": [{"turn": t.number, "text": echo.capitalize()} for t in turns_of(request)],
                           "confidence": 0.95, "rationale": "r"})

    llm_server.brain = brain
    out = _run(candidates, llm_server, tmp_path)
    assert out.kept.height == 0
    assert set(out.rejected["reason"]) == {"copies_achievement"}
