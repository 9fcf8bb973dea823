"""Judges: grounding catches invented details; a rejection is never overridden."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import TAU, ingest, make_params, opening_rewritten
from llm_server import careful_except

from agenther import schema
from agenther.evidence.grounding import ungrounded
from agenther.llm import LLMClient
from agenther.stages.verify import verify


@pytest.fixture(scope="module")
def tau():
    return ingest(TAU).trajectories


def _row(tau: pl.DataFrame, trajectory_id: str, prompt: str) -> pl.DataFrame:
    row = tau.filter(pl.col("id") == trajectory_id).to_dicts()[0]
    row |= {"is_failure": True, "failure_type": "incomplete", "severity": 0.5, "recoverable": True,
            "classify_reason": "", "classify_mode": "rule", "achievements": [], "extract_mode": "rule"}
    row = opening_rewritten(row, prompt) | {"relabel_rationale": "SECRET-RATIONALE"}
    return schema.frame([row], schema.RELABELED)


FIRST = "tau-bench/gpt-4o-airline/task0-trial0"  # Mia Li, JFK -> SEA on 2024-05-20


def test_grounding_accepts_details_from_the_trajectory(tau):
    messages = tau.filter(pl.col("id") == FIRST)["messages"].to_list()[0]
    prompt = "I'm mia_li_3668. Book me a one-way economy flight from JFK to SEA on May 20 with 3 bags."
    assert ungrounded(prompt, messages) == []
    # a name that ends the sentence: the full stop is not part of it
    assert ungrounded("Book me a one-way economy flight from JFK to SEA for Mia Li.", messages) == []


@pytest.mark.parametrize("invented", [
    "with reservation ZX9Q41",          # an ID that never occurs
    "using 4 certificates worth $777",  # numbers that never occur
    "on 2024-06-31",                    # a date that never occurs
    "for my friend Bartholomew Quince",  # a name that never occurs
    'on the "Platinum Lounge" plan',    # a quoted name that never occurs
])
def test_grounding_rejects_invented_details(tau, invented):
    messages = tau.filter(pl.col("id") == FIRST)["messages"].to_list()[0]
    prompt = f"I'm mia_li_3668. Book me a flight from JFK to SEA {invented}."
    missing = ungrounded(prompt, messages)
    assert missing, f"grounding accepted an invented detail: {invented}"


LLM_JUDGES = {"judges": ["grounding", "trajectory", "evidence"]}  # the judges these mechanics tests are about


def _client(server, tmp_path) -> LLMClient:
    return LLMClient(model="openai/local", api_base=server.api_base, api_key="x", cache_dir=tmp_path / "c")


def test_trajectory_judge_rejection_is_final_under_all(tau, llm_server, tmp_path):
    # The trajectory judge rejects with full confidence; the evidence judge would accept.
    llm_server.brain = careful_except("judge_trajectory", lambda r: json.dumps(
        {"satisfied": False, "consistent_with_user": True, "confidence": 0.99, "reason": "the flight was never booked"}))
    params = make_params(tmp_path, llm_server, verify=LLM_JUDGES)
    grounded = "I'm mia_li_3668. Book me a one-way economy flight from JFK to SEA on May 20."
    out = verify(_row(tau, FIRST, grounded), params, _client(llm_server, tmp_path))
    assert out.kept["verified"].to_list() == [False]
    assert out.rejected["reason"].to_list() == ["rejected_by_trajectory"]
    # A final rejection: the remaining judge is not even asked, so nothing can overturn it.
    assert llm_server.prompts_of("judge_evidence") == []
    # The judge never sees the relabeler's rationale.
    assert all("SECRET-RATIONALE" not in r["messages"][0]["content"] for r in llm_server.requests)


def test_high_confidence_invalid_verdict_is_not_accepted_under_majority(tau, llm_server, tmp_path):
    # grounding rejects (invented ID) and the trajectory judge says not satisfied at 0.99:
    # the evidence judge alone accepting cannot carry a majority of three.
    llm_server.brain = careful_except("judge_trajectory", lambda r: json.dumps(
        {"satisfied": False, "consistent_with_user": False, "confidence": 0.99, "reason": "no"}))
    params = make_params(tmp_path, llm_server, verify={"policy": "majority"} | LLM_JUDGES)
    invented = "I'm mia_li_3668. Change reservation QQ7777 to business class."
    out = verify(_row(tau, FIRST, invented), params, _client(llm_server, tmp_path))
    judgements = out.kept["judgements"].to_list()[0]
    assert [j["judge"] for j in judgements] == ["grounding", "trajectory", "evidence"]
    assert [j["accept"] for j in judgements] == [False, False, True]
    assert out.kept["verified"].to_list() == [False]
    assert out.rejected.height == 1


def test_majority_accepts_two_of_three(tau, llm_server, tmp_path):
    llm_server.brain = careful_except("judge_evidence", lambda r: json.dumps(
        {"requirements": [], "all_met": False, "confidence": 0.9}))
    params = make_params(tmp_path, llm_server, verify={"policy": "majority"} | LLM_JUDGES)
    grounded = "I'm mia_li_3668. Book me a one-way economy flight from JFK to SEA on May 20."
    out = verify(_row(tau, FIRST, grounded), params, _client(llm_server, tmp_path))
    assert [j["accept"] for j in out.kept["judgements"].to_list()[0]] == [True, True, False]
    assert out.kept["verified"].to_list() == [True]


def test_evidence_judge_sees_no_assistant_narration_and_low_confidence_rejects(tau, llm_server, tmp_path):
    llm_server.brain = careful_except("judge_evidence", lambda r: json.dumps(
        {"requirements": [{"requirement": "x", "step": 7, "met": True}], "all_met": True, "confidence": 0.3}))
    params = make_params(tmp_path, llm_server, verify=LLM_JUDGES)
    grounded = "I'm mia_li_3668. Book me a one-way economy flight from JFK to SEA on May 20."
    out = verify(_row(tau, FIRST, grounded), params, _client(llm_server, tmp_path))
    assert out.kept["verified"].to_list() == [False]
    evidence_prompt = llm_server.prompts_of("judge_evidence")[0]["messages"][0]["content"]
    assert "ASSISTANT CALLS" in evidence_prompt and "TOOL RESULT" in evidence_prompt
    assert "] ASSISTANT:" not in evidence_prompt and "] USER:" not in evidence_prompt


def test_prompt_that_contradicts_the_user_is_rejected(tau, llm_server, tmp_path):
    # Multi-turn logs: the trajectory judge sees the user's turns and must flag a contradiction.
    def contradicted(request):
        assert "] USER: " in request["messages"][0]["content"]  # the judge sees what the user said
        return json.dumps({"satisfied": True, "consistent_with_user": False, "confidence": 0.95,
                           "reason": "the user asked for economy"})

    llm_server.brain = careful_except("judge_trajectory", contradicted)
    params = make_params(tmp_path, llm_server, verify=LLM_JUDGES)
    prompt = "I'm mia_li_3668. Book me a one-way economy flight from JFK to SEA on May 20."
    out = verify(_row(tau, FIRST, prompt), params, _client(llm_server, tmp_path))
    assert out.kept["verified"].to_list() == [False]
    # Structured output: llama.cpp-style json_object with the judge's schema.
    fmt = llm_server.prompts_of("judge_trajectory")[0]["response_format"]
    assert fmt["type"] == "json_object" and "consistent_with_user" in fmt["schema"]["properties"]
