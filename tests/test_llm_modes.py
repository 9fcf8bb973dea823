"""classify and extract in LLM mode: answers are validated, never trusted blindly."""

from __future__ import annotations

import json

import polars as pl
from conftest import TAU, ingest, make_params
from llm_server import prompt_kind

from agenther.llm import LLMClient
from agenther.stages.classify import classify
from agenther.stages.extract import extract


def _client(server, tmp_path) -> LLMClient:
    return LLMClient(model="openai/local", api_base=server.api_base, api_key="x", cache_dir=tmp_path / "c")


def test_llm_classify_uses_the_answer_and_skips_logged_successes(llm_server, tmp_path):
    def brain(request):
        assert prompt_kind(request) == "classify"
        return json.dumps({"failure_type": "off_topic", "severity": 0.3, "recoverable": True, "reason": "llm says"})

    llm_server.brain = brain
    trajectories = ingest(TAU, limit=20).trajectories
    params = make_params(tmp_path, llm_server, classify={"mode": "llm"})
    out = classify(trajectories, params, _client(llm_server, tmp_path))
    failures = out.filter(pl.col("is_failure"))
    assert set(failures["failure_type"]) == {"off_topic"} and set(failures["classify_mode"]) == {"llm"}
    # A run the log marks as a success costs no call and stays a success.
    assert len(llm_server.requests) == failures.height == trajectories.filter(~pl.col("success")).height


def test_llm_classify_invalid_answer_is_not_recoverable(llm_server, tmp_path):
    llm_server.brain = lambda r: json.dumps({"failure_type": "bad_kind", "severity": 0.3, "recoverable": True,
                                             "reason": "?"})
    params = make_params(tmp_path, llm_server, classify={"mode": "llm"})
    out = classify(ingest(TAU, limit=5).trajectories, params, _client(llm_server, tmp_path))
    failures = out.filter(pl.col("is_failure"))
    assert not failures["recoverable"].any()
    assert all("llm classification failed" in r for r in failures["classify_reason"])
    # ... and such rows pass the classified gate (they used to fail it: mode llm-invalid was unknown)
    from agenther import gates

    assert set(failures["classify_mode"]) == {"llm-invalid"}
    assert gates.check(out, "classified", params, None)["success"]


def test_llm_extract_keeps_only_achievements_with_real_evidence_steps(llm_server, tmp_path):
    params = make_params(tmp_path, llm_server, extract={"mode": "llm"})
    classified = classify(ingest(TAU, limit=10).trajectories, params)
    rows = {r["id"]: r for r in classified.filter(pl.col("recoverable")).to_dicts()}

    def brain(request):
        text = request["messages"][0]["content"]
        row = next(r for r in rows.values() if r["goal"].strip()[:60] in text)
        tool_step = next(i for i, m in enumerate(row["messages"]) if m["role"] == "tool")
        user_step = next(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
        return json.dumps({"achievements": [
            {"text": "looked something up", "steps": [tool_step], "kind": "information"},
            {"text": "cites a user turn only", "steps": [user_step], "kind": "action"},
            {"text": "cites a step that does not exist", "steps": [9999], "kind": "action"},
        ]})

    llm_server.brain = brain
    out = extract(classified, params, _client(llm_server, tmp_path))
    # The goal is computed from the run whatever the model says: a run whose turns contradict it
    # is rejected in LLM mode too.
    conflicts = out.rejected.filter(pl.col("id").is_in(list(rows)))
    assert out.kept.height + conflicts.height == len(rows) and out.kept.height >= 4
    assert set(conflicts["reason"]) <= {"turn_conflict"}
    for achievements in out.kept["achievements"].to_list():
        assert [a["text"] for a in achievements] == ["looked something up"]


def test_llm_classify_out_of_budget_is_left_undone_not_misjudged(llm_server, tmp_path):
    """classify in LLM mode with a budget for 3 calls: the rest are `llm-budget`, pass the
    classified gate, and extract rejects them as budget_exhausted (left undone in the summary)."""
    from agenther.pipeline import run

    def brain(request):
        return json.dumps({"failure_type": "wrong_result", "severity": 0.3, "recoverable": True, "reason": "llm"})

    llm_server.brain = brain
    params = make_params(tmp_path, llm_server, classify={"mode": "llm"}, ingest={"input": str(TAU), "limit": 20},
                         llm={"budget_tokens": 1})  # the first call spends it; calls in flight finish
    params.llm.concurrency = 1
    summary = run(params, tmp_path / "out")
    classified = pl.read_parquet(tmp_path / "out" / "01_classified.parquet").filter(pl.col("is_failure"))
    modes = classified["classify_mode"].to_list()
    assert modes.count("llm") == 1 and modes.count("llm-budget") == len(modes) - 1 > 5
    rejected = pl.read_parquet(tmp_path / "out" / "02_extract_rejected.parquet")
    undone = rejected.filter(pl.col("reason") == "budget_exhausted")
    assert undone.height == len(modes) - 1
    assert summary["llm"]["budget"]["records_left_undone"]["extract"] == undone.height
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
