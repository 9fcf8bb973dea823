"""The package stage (conftest.package: export_samples, as every run writes the exports): hindsight
samples, successes, dedup, weights and preference pairs, on real tau-bench runs.

Inputs are built from data/raw/tau-bench/gpt-4o-airline.json (50 airline tasks x 4 trials)
by a small converter below, so these tests do not depend on the ingest stage.
"""

from __future__ import annotations

import copy
import json
import random
from functools import cache
from pathlib import Path

import polars as pl
import pytest
from conftest import opening_rewritten, package

from agenther import schema
from agenther.export.dedup import dedup_prompts, jaccard, normalize_prompt, shingles
from agenther.stages.samples import sample_weight

ROOT = Path(__file__).resolve().parents[1]
TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
if not TAU.exists():  # a checkout without data/raw: the shared copy
    TAU = Path("/work/shared/data/tau-bench/gpt-4o-airline.json")

LINEAGE = {
    "params_hash": "0123456789ab",
    "models": {"relabel": "local/qwen2.5-coder-0.5b", "judges": ["rules", "local/qwen2.5-coder-0.5b"]},
    "prompt_hashes": {"relabel": "aaaaaaaaaaaa", "judge_trajectory": "bbbbbbbbbbbb"},
    "agenther_version": "0.1.0",
}
PARAMS = {"weight_alpha": 0.5, "min_weight": 0.2, "include_successes": True, "near_dup_threshold": 0.9}


# --- building inputs from the real log ------------------------------------------------------


@cache
def tau_records() -> list[dict]:
    return json.loads(TAU.read_text())


def tau_id(index: int) -> str:
    return f"tau-bench/gpt-4o-airline/[{index}]"


def canonical(message: dict) -> dict:
    calls = [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in message.get("tool_calls") or []
    ]
    return {
        "role": message["role"],
        "content": message.get("content"),
        "tool_calls": calls or None,
        "tool_call_id": message.get("tool_call_id"),
        "name": message.get("name"),
    }


def tools_json(records: list[dict]) -> str:
    """A tool list for the tools these runs called (the tau-bench log does not ship the schemas)."""
    keys: dict[str, set] = {}
    for rec in records:
        for m in rec["traj"]:
            for c in m.get("tool_calls") or []:
                keys.setdefault(c["function"]["name"], set()).update(json.loads(c["function"]["arguments"]))
    return json.dumps(
        [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": f"airline tool {name}",
                    "parameters": {
                        "type": "object",
                        "properties": {k: {"type": "string"} for k in sorted(ks)},
                    },
                },
            }
            for name, ks in sorted(keys.items())
        ]
    )


def classified_row(index: int, tools: str | None = None) -> dict:
    rec = tau_records()[index]
    messages = [canonical(m) for m in rec["traj"]]
    success = rec["reward"] == 1.0
    return {
        "id": tau_id(index),
        "source_format": "tau-bench",
        "source_file": str(TAU),
        "record_pointer": f"[{index}]",
        "task_key": str(rec["task_id"]),
        "goal": next(m["content"] for m in messages if m["role"] == "user"),
        "messages": messages,
        "tools": tools,
        "final_answer": None,
        "success": success,
        "reward": float(rec["reward"]),
        "metadata": "{}",
        "is_failure": not success,
        "failure_type": "not_a_failure" if success else "wrong_result",
        "severity": 0.0 if success else 0.5,
        "recoverable": not success,
        "classify_reason": "test",
        "classify_mode": "rule",
    }


def hindsight_prompt(row: dict) -> str:
    """A distinct, plausible prompt per run (what the relabeler would write is not under test here)."""
    names = ", ".join(sorted({c["name"] for m in row["messages"] for c in m["tool_calls"] or []}))
    return f"Run {row['record_pointer']} of task {row['task_key']}: as a customer, have the agent {names}."


def verified_row(
    row: dict,
    prompt: str | None = None,
    confidence: float = 0.8,
    severity: float | None = None,
    verified: bool = True,
) -> dict:
    return opening_rewritten(row, hindsight_prompt(row) if prompt is None else prompt) | {
        "severity": row["severity"] if severity is None else severity,
        "achievements": [],
        "extract_mode": "rule",
        "relabel_confidence": confidence,
        "relabel_rationale": "test",
        "relabel_model": "local/qwen2.5-coder-0.5b",
        "judgements": [
            {
                "judge": "grounding",
                "model": "rules",
                "accept": True,
                "confidence": 1.0,
                "reason": "all facts occur",
            },
            {
                "judge": "trajectory",
                "model": "local",
                "accept": True,
                "confidence": 0.9,
                "reason": "satisfied",
            },
        ],
        "verified": verified,
    }


def tau_inputs(tasks: range = range(20), with_tools: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(verified, classified) for every trial of `tasks`: all failures relabeled and accepted."""
    indices = [i for i, r in enumerate(tau_records()) if int(r["task_id"]) in tasks]
    tools = tools_json([tau_records()[i] for i in indices]) if with_tools else None
    rows = [classified_row(i, tools) for i in indices]
    verified = [verified_row(r) for r in rows if r["is_failure"]]
    return schema.frame(verified, schema.VERIFIED), schema.frame(rows, schema.CLASSIFIED)


def frames(rows: list[dict], verified: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    return schema.frame(verified, schema.VERIFIED), schema.frame(rows, schema.CLASSIFIED)


def calls_of(messages: list[dict]) -> set[tuple[str, str]]:
    """Tool-call evidence of exported (OpenAI-format) messages."""
    return {
        (c["function"]["name"], json.dumps(json.loads(c["function"]["arguments"]), sort_keys=True))
        for m in messages
        if m["role"] == "assistant"
        for c in m.get("tool_calls") or []
    }


@pytest.fixture(scope="module")
def packaged():
    verified, classified = tau_inputs()
    return package(verified, classified, PARAMS, LINEAGE), classified


# --- natural preference pairs -------------------------------------------------------------


def test_natural_pairs_come_from_tasks_with_a_success_and_a_failure(packaged):
    result, classified = packaged
    rows = {r["id"]: r for r in classified.to_dicts()}
    natural = [r for r in result.dpo if r["metadata"]["kind"] == "natural"]
    assert natural, "tau-bench tasks 0-19 have successes and failures side by side"
    for row in natural:
        chosen, rejected = rows[row["metadata"]["chosen_id"]], rows[row["metadata"]["rejected_id"]]
        assert chosen["success"] is True and rejected["is_failure"] is True
        assert chosen["task_key"] == rejected["task_key"] == row["metadata"]["task_key"]
        # the chosen side IS the success's continuation after the prompt, not the failure's
        n = len(row["prompt"])
        assert [m["content"] for m in row["prompt"]] == [m["content"] for m in chosen["messages"][:n]]
        assert [m["content"] for m in row["chosen"]] == [
            m["content"] for m in chosen["messages"][n : n + len(row["chosen"])]
        ]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert len(row["chosen"]) == len(row["rejected"]) == 1  # the step where the runs diverge
        assert row["prompt"][-1]["role"] in ("user", "tool")
        assert row["weight"] == 1.0

    tasks_with_pairs = {r["metadata"]["task_key"] for r in natural}
    by_task = classified.group_by("task_key").agg(
        pl.col("success").any().alias("s"), pl.col("is_failure").any().alias("f")
    )
    mixed = set(by_task.filter(pl.col("s") & pl.col("f"))["task_key"].to_list())
    assert (
        tasks_with_pairs == mixed
    )  # every mixed task gives pairs; all-fail (0) / all-success (12) tasks none
    assert "0" not in tasks_with_pairs and "12" not in tasks_with_pairs
    # task 1: one success ([51]) and three failures -> three pairs, all chosen from [51]
    task1 = [r for r in natural if r["metadata"]["task_key"] == "1"]
    assert {r["metadata"]["chosen_id"] for r in task1} == {tau_id(51)}
    assert {r["metadata"]["rejected_id"] for r in task1} == {tau_id(1), tau_id(101), tau_id(151)}
    assert result.counts["dpo_natural"] == len(natural)


def test_natural_pairs_are_capped_per_task():
    verified, classified = tau_inputs(range(10))
    capped = package(verified, classified, PARAMS | {"max_pairs_per_task": 1}, LINEAGE)
    per_task: dict[str, int] = {}
    for r in capped.dpo:
        if r["metadata"]["kind"] == "natural":
            per_task[r["metadata"]["task_key"]] = per_task.get(r["metadata"]["task_key"], 0) + 1
    assert per_task and max(per_task.values()) == 1


def test_shared_prefix_is_cut_to_end_on_a_tool_turn_and_ignores_call_ids():
    success = classified_row(51)  # task 1, reward 1.0
    msgs = success["messages"]
    j = next(i for i, m in enumerate(msgs) if m["tool_calls"] and msgs[i + 2]["role"] == "assistant")
    # the same opening (with other call ids, as in any rerun), then a different answer
    prefix = copy.deepcopy(msgs[: j + 2])
    for m in prefix:
        for c in m["tool_calls"] or []:
            c["id"] = "rerun_" + c["id"]
        if m["tool_call_id"]:
            m["tool_call_id"] = "rerun_" + m["tool_call_id"]
    wrong = {
        "role": "assistant",
        "content": "I cannot help with that.",
        "tool_calls": None,
        "tool_call_id": None,
        "name": None,
    }
    failure = classified_row(1) | {"messages": [*prefix, wrong], "task_key": "1"}
    result = package(*frames([success, failure], []), PARAMS, LINEAGE)
    (row,) = [r for r in result.dpo if r["metadata"]["kind"] == "natural"]
    assert row["metadata"]["prompt_shared"] is True
    assert len(row["prompt"]) == j + 2 and row["prompt"][-1]["role"] == "tool"
    assert row["prompt"][-1]["tool_call_id"] == msgs[j]["tool_calls"][0]["id"]  # the success's ids
    assert row["rejected"] == [{"role": "assistant", "content": "I cannot help with that."}]
    assert row["chosen"][0]["content"] == msgs[j + 2]["content"]


# --- hindsight preference pairs -----------------------------------------------------------


def _role_texts(messages: list[dict]) -> list[tuple]:
    return [(m["role"], m.get("content"), json.dumps(m.get("tool_calls"), sort_keys=True)) for m in messages]


def test_hindsight_pair_is_one_step_against_a_run_that_lacks_its_evidence(packaged):
    result, classified = packaged
    rows = {r["id"]: r for r in classified.to_dicts()}
    pairs = [r for r in result.dpo if r["metadata"]["kind"] == "hindsight"]
    assert pairs
    sft = {r["metadata"]["trajectory_id"]: r for r in result.sft if r["metadata"]["kind"] == "hindsight"}
    for row in pairs:
        meta = row["metadata"]
        chosen_src, rejected_src = rows[meta["chosen_id"]], rows[meta["rejected_id"]]
        assert meta["chosen_id"] != meta["rejected_id"] and chosen_src["task_key"] == rejected_src["task_key"]
        assert meta["pair_level"] == "step"
        # the rejected run lacks a call the relabeled sample made
        sample = sft[meta["chosen_id"]]["messages"]
        assert calls_of(sample) - calls_of(canonical_openai(rejected_src["messages"]))
        # the prompt is the hindsight sample up to the step: its system turn and the hindsight prompt first
        assert [m["role"] for m in row["prompt"][:2]] == ["system", "user"]
        assert row["prompt"][1]["content"] == hindsight_prompt(chosen_src)
        assert _role_texts(row["prompt"]) == _role_texts(sample[: len(row["prompt"])])
        # one assistant turn each, a turn the sample trains on, and they differ in what they do
        assert len(row["chosen"]) == len(row["rejected"]) == 1
        (chosen,), (rejected,) = row["chosen"], row["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant" and chosen.get("weight") == 1
        assert _role_texts([chosen]) == _role_texts([sample[len(row["prompt"])]])
        assert calls_of([chosen]) != calls_of([rejected]) or bool(chosen.get("tool_calls")) != bool(
            rejected.get("tool_calls"))
        # the step is one the relabel rests on: the chosen turn makes a call the rejected run never made
        assert calls_of([chosen]) - calls_of(canonical_openai(rejected_src["messages"]))


def canonical_openai(messages: list[dict]) -> list[dict]:
    """Canonical messages with calls in the exported (OpenAI) shape, for calls_of."""
    return [{"role": m["role"], "tool_calls": [{"function": {"name": c["name"], "arguments": c["arguments"]}}
                                                for c in m.get("tool_calls") or []]} for m in messages]


def test_trajectory_level_pairs_are_an_option():
    verified, classified = tau_inputs(range(10))
    whole = package(verified, classified, PARAMS | {"dpo_pairs": "trajectory"}, LINEAGE)
    hindsight = [r for r in whole.dpo if r["metadata"]["kind"] == "hindsight"]
    assert hindsight and all(r["metadata"]["pair_level"] == "trajectory" for r in whole.dpo)
    for row in hindsight:  # the old shape: [system, hindsight prompt] and whole continuations
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert any(len(r["chosen"]) > 1 and any(m["role"] in ("user", "tool") for m in r["chosen"]) for r in whole.dpo)
    with pytest.raises(ValueError, match="dpo_pairs"):
        package(verified, classified, PARAMS | {"dpo_pairs": "episode"}, LINEAGE)


def test_no_hindsight_pair_without_a_differing_run():
    lone = classified_row(0)  # task 0, and no other trial of it in the input
    result = package(*frames([lone], [verified_row(lone)]), PARAMS, LINEAGE)
    assert result.counts["hindsight_samples"] == 1
    assert result.counts["dpo_hindsight"] == 0 and result.counts["dpo_hindsight_unpaired"] == 1
    assert not result.dpo


# --- hindsight and success samples --------------------------------------------------------


def test_hindsight_sample_rewrites_only_the_turns_the_relabeler_wrote(packaged):
    result, classified = packaged
    rows = {r["id"]: r for r in classified.to_dicts()}
    sample = next(r for r in result.sft if r["metadata"]["trajectory_id"] == tau_id(2))  # task 2, failed
    original = rows[tau_id(2)]["messages"]
    messages = sample["messages"]
    assert messages[0] == {"role": "system", "content": original[0]["content"]}
    assert messages[1] == {"role": "user", "content": hindsight_prompt(rows[tau_id(2)])}
    assert sample["metadata"]["rewrites"] == [{"step": 1, "before": original[1]["content"],
                                               "after": hindsight_prompt(rows[tau_id(2)])}]
    later_users = [m["content"] for m in messages[2:] if m["role"] == "user"]
    assert later_users == [m["content"] for m in original[2 : len(messages)] if m["role"] == "user"]
    assert messages[-1]["role"] == "assistant" and original[-1]["role"] != "assistant"
    # tool calls stay calls (with their ids), results stay tool messages
    calls = [c for m in messages for c in m.get("tool_calls") or []]
    assert calls and [c["id"] for c in calls] == [
        c["id"] for m in original[: len(messages)] for c in m["tool_calls"] or []
    ]
    assert all(c["type"] == "function" and json.loads(c["function"]["arguments"]) is not None for c in calls)
    assert [m["tool_call_id"] for m in messages if m["role"] == "tool"] == [
        m["tool_call_id"] for m in original[: len(messages)] if m["role"] == "tool"
    ]
    meta = sample["metadata"]
    assert meta["kind"] == "hindsight" and meta["original_goal"] == original[1]["content"]
    assert meta["params_hash"] == LINEAGE["params_hash"] and meta["models"] == LINEAGE["models"]
    assert [j["judge"] for j in meta["judges"]] == ["grounding", "trajectory"]


def test_successes_join_with_their_original_prompt_unless_disabled(packaged):
    result, classified = packaged
    successes = classified.filter(pl.col("success"))
    kinds = [r["metadata"]["kind"] for r in result.sft]
    assert kinds.count("success") == successes.height == result.counts["success_samples"]
    s = next(r for r in result.sft if r["metadata"]["kind"] == "success")
    assert s["weight"] == 1.0 and s["messages"][1]["content"] == s["metadata"]["original_goal"]
    verified, classified = tau_inputs(range(3))
    off = package(verified, classified, PARAMS | {"include_successes": False}, LINEAGE)
    assert all(r["metadata"]["kind"] == "hindsight" for r in off.sft + off.sharegpt)
    assert off.counts["success_samples"] == 0


# --- dedup ----------------------------------------------------------------------------------


BOOK = (
    "Book a one-way economy flight from JFK to SEA on May 20 for user mia_li_3668, paying with certificates."
)


def test_exact_and_near_duplicate_user_sides_keep_one_deterministic_survivor():
    # the four failed trials of task 0, each with trial 0's conversation: their user sides differ only
    # in the opening each is relabeled with
    conversation = classified_row(0)["messages"]
    rows = [classified_row(i) | {"messages": conversation} for i in (0, 50, 100, 150)]
    prompts = {
        0: (BOOK, 0.7),
        50: (
            "  book a ONE-WAY economy flight from JFK to SEA on May 20 for user mia_li_3668 paying with "
            "certificates!!",
            0.9,
        ),  # exact duplicate after normalisation, higher confidence
        100: (BOOK + " Thanks", 0.8),  # near duplicate: one more word
        150: ("Look up the profile of user mia_li_3668 and list her saved payment methods.", 0.6),
    }
    verified = [
        verified_row(
            r,
            prompt=prompts[int(r["record_pointer"][1:-1])][0],
            confidence=prompts[int(r["record_pointer"][1:-1])][1],
        )
        for r in rows
    ]
    results = []
    for seed in (0, 1, 2):  # any input order gives the same survivors
        shuffled = random.Random(seed).sample(verified, len(verified))
        results.append(package(*frames(rows, shuffled), PARAMS, LINEAGE))
    result = results[0]
    kept = sorted(r["metadata"]["trajectory_id"] for r in result.sft if r["metadata"]["kind"] == "hindsight")
    assert kept == [tau_id(150), tau_id(50)]
    rejected = {r["id"]: r for r in result.rejections.to_dicts()}
    assert rejected[tau_id(0)]["reason"] == "duplicate_prompt" and tau_id(50) in rejected[tau_id(0)]["detail"]
    assert (
        rejected[tau_id(100)]["reason"] == "near_duplicate_prompt"
        and tau_id(50) in rejected[tau_id(100)]["detail"]
    )
    assert {r["stage"] for r in rejected.values()} == {"package"}
    assert result.counts["duplicates"] == 1 and result.counts["near_duplicates"] == 1
    assert result.counts["accepted_in"] == result.counts["hindsight_samples"] + result.rejections.height
    for other in results[1:]:
        assert other.sft == result.sft and other.rejections.equals(result.rejections)


def test_equal_confidence_duplicates_keep_the_smaller_id():
    result = dedup_prompts([("b", "Same prompt here.", 0.8), ("a", "same prompt  here", 0.8)], 0.9)
    assert result.kept == ["a"] and result.dropped[0].id == "b" and result.dropped[0].kept_id == "a"


def test_dedup_building_blocks():
    assert normalize_prompt("  Book it,  NOW!\n") == "book it now"
    assert shingles("a b c d") == {("a", "b", "c"), ("b", "c", "d")}
    assert shingles("two words") == {("two", "words")}
    assert jaccard(shingles(BOOK), shingles(BOOK + " thanks")) >= 0.9
    assert jaccard(shingles(BOOK), shingles("Cancel reservation ABC123 for user noah_muller_9847.")) == 0.0
    # a different number is a different prompt, not a near duplicate
    assert dedup_prompts(
        [("a", "Cancel reservation ABC123 today", 1.0), ("b", "Cancel reservation XYZ789 today", 1.0)], 0.9
    ).kept == ["a", "b"]


# --- weights ----------------------------------------------------------------------------------


def test_weights_fall_as_severity_rises():
    rows = [classified_row(i) for i in (0, 50, 100, 150)]
    severities = {0: 0.0, 50: 0.4, 100: 1.0, 150: None}
    verified = [verified_row(r, severity=severities[int(r["record_pointer"][1:-1])]) for r in rows]
    verified[3]["severity"] = None  # unknown severity counts as the worst
    result = package(*frames(rows, verified), PARAMS, LINEAGE)
    weight = {r["metadata"]["trajectory_id"]: r["weight"] for r in result.sft}
    assert weight[tau_id(0)] == 1.0  # severity 0 = near miss = full weight
    assert weight[tau_id(50)] == pytest.approx(0.8)
    assert weight[tau_id(100)] == pytest.approx(0.5)
    assert weight[tau_id(150)] == pytest.approx(0.5)
    assert weight[tau_id(0)] > weight[tau_id(50)] > weight[tau_id(100)]
    assert {r["metadata"]["trajectory_id"]: r["weight"] for r in result.sharegpt} == weight
    assert sample_weight(1.0, 1.0, 0.2) == 0.2  # the floor
    assert sample_weight(0.0, 1.0, 0.2) == 1.0
    for r in result.dpo:  # a hindsight pair weighs what its sample weighs
        assert r["weight"] == weight[r["metadata"]["chosen_id"]]


# --- rejections and reconciliation --------------------------------------------------------


def test_unexportable_relabel_becomes_a_rejection_not_a_broken_row():
    good, bad, unaccepted = classified_row(2), classified_row(152), classified_row(52)  # failures of task 2
    broken = copy.deepcopy(bad["messages"])
    first_tool = next(m for m in broken if m["role"] == "tool")
    first_tool["tool_call_id"] = "call_that_never_happened"
    bad = bad | {"messages": broken}
    blank = classified_row(3)
    verified = [
        verified_row(good),
        verified_row(bad),
        verified_row(unaccepted, verified=False),
        verified_row(blank, prompt="  "),
    ]
    result = package(*frames([good, bad, unaccepted, blank], verified), PARAMS, LINEAGE)
    assert result.counts["accepted_in"] == 3  # verified == False is not an accepted relabel
    by_id = {r["id"]: r for r in result.rejections.to_dicts()}
    assert len(by_id) == 2
    rej, empty = by_id[tau_id(152)], by_id[tau_id(3)]
    assert (
        rej["id"] == tau_id(152)
        and rej["reason"] == "unexportable"
        and "call_that_never_happened" in rej["detail"]
    )
    assert empty["id"] == tau_id(3) and empty["reason"] == "unexportable"
    exported = {r["metadata"]["trajectory_id"] for r in result.sft + result.sharegpt}
    assert tau_id(152) not in exported and tau_id(3) not in exported and tau_id(2) in exported
    assert result.counts["accepted_in"] == result.counts["hindsight_samples"] + result.rejections.height
    schema.validate_columns(result.rejections, schema.REJECTION, "rejections")
