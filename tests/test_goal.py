"""Hindsight samples that are right by construction, on real records of the shipped logs:
the achieved goal computed from what the run did, the sample cut to what proves it, coverage
both ways over the user side, no sample that trains on a broken rule, and per-message weights in
the exports."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, TOOLBENCH, ingest, make_params, opening_rewritten, write_params
from llm_server import careful_except, turns_of
from synthetic import GOAL, downgrade

from agenther import schema
from agenther.cli import main
from agenther.evidence import coverage
from agenther.evidence.conversation import hindsight_goal
from agenther.evidence.goal import AchievedGoal, NoGoal, TurnEdit, sample_steps
from agenther.evidence.tools import Tools, is_error
from agenther.llm import LLMClient
from agenther.llm.answers import RelabelAnswer
from agenther.params import load_params
from agenther.stages import relabel
from agenther.stages.classify import classify
from agenther.stages.extract import extract
from agenther.stages.verify import verify

REACT = Path(__file__).parent / "fixtures" / "react_webshop.jsonl"
TASK47 = "tau-bench/gpt-4o-airline/task47-trial0"  # cancelled MZDDS4, which the policy forbids
WRONG_FLIGHTS = "tau-bench/gpt-4o-airline/task0-trial2"  # booked, with other flights than the task's
TWO_CANCELS = "tau-bench/gpt-4o-airline/task28-trial1"  # cancelled 8C8K4E and LU15PA
REFUSED_ONE = "tau-bench/gpt-4o-airline/task27-trial3"  # refused to cancel IFOYYZ, cancelled NQNU5R
QUESTION = "tau-bench/gpt-4o-airline/task14-trial3"  # looked up YAX4DR, reported its flights


@cache
def tau_classified() -> pl.DataFrame:
    params = rules()
    return classify(ingest(TAU).trajectories, params)


def tau_row(trajectory_id: str) -> dict:
    return tau_classified().filter(pl.col("id") == trajectory_id).to_dicts()[0]


@cache
def tau_extracted() -> pl.DataFrame:
    params = rules()
    return extract(tau_classified(), params).kept


def goal_of(row: dict) -> AchievedGoal:
    goal = hindsight_goal(row, rules())
    assert isinstance(goal, AchievedGoal), goal
    return goal


def rules(**sections: dict) -> dict:
    """Params for the rule-mode stages and checks called here: they ask no LLM, so no response cache
    (no folder shared between tests or runs)."""
    return load_params(None, {"llm": {"cache_dir": None}} | sections)


def misses(request: str, goal: AchievedGoal, row: dict) -> list[tuple[str, str]]:
    """coverage.misses of a user side that is `request` alone (the opening, rewritten)."""
    return coverage.misses([(goal.start, request)], goal, row, rewritten=[goal.start])


# -- tools and errors -------------------------------------------------------------------------------
def test_airline_schemas_tell_writes_from_reads():
    tools = Tools.of(tau_row(TASK47)["tools"])
    writes = {n for n in tools.schemas if tools.kind(n) == "write"}
    assert writes == {"book_reservation", "cancel_reservation", "send_certificate", "update_reservation_baggages",
                      "update_reservation_flights", "update_reservation_passengers"}
    assert tools.kind("transfer_to_human_agents") == "handoff"
    assert tools.kind("think") == tools.kind("calculate") == tools.kind("search_direct_flight") == "read"


def test_params_override_a_tool_kind():
    params = rules(tools={"writes": ["think"], "reads": ["cancel_reservation"]})
    tools = Tools.of(tau_row(TASK47)["tools"], params)
    assert tools.kind("think") == "write" and tools.kind("cancel_reservation") == "read"


@pytest.mark.parametrize("result", [
    '{"error": "", "response": "{\\"status\\":\\"401\\",\\"msg\\":\\"Authentication required\\"}"}',
    "Error: reservation not found", "HTTP 503 Service Unavailable", "", "   ", None, "[]", "{}",
    '{"message": "Item not found"}', '{"status_code": 404, "detail": "missing"}', "Request failed: timed out",
    '{"error": "No such function name: authenticate", "response": ""}',
])
def test_error_results_are_errors(result):
    assert is_error(result)


@pytest.mark.parametrize("result", [
    '{"reservation_id": "MZDDS4", "status": "cancelled"}', "available", "1305.0",
    '{"error": "", "response": "[{\\"title\\": \\"Le Monde\\"}]"}',
    "Flight HAT050 departs at 06:00; note: seats not found in row 12 are sold as a block of 3 " * 3,
])
def test_real_results_are_not_errors(result):
    assert not is_error(result)


def test_an_error_result_never_becomes_an_achievement():
    """The ToolBench record whose news API answered 401 Authentication required."""
    params = rules()
    rows = classify(ingest(TOOLBENCH).trajectories, params).to_dicts()
    row = next(r for r in rows if "69_ChatGPT_DFS_woFilter_w2" in r["id"])
    step_401 = next(i for i, m in enumerate(row["messages"]) if "Authentication required" in (m["content"] or ""))
    goal = hindsight_goal(row, params)
    if isinstance(goal, AchievedGoal):
        assert step_401 not in goal.evidence_steps()
        assert all(a.result_step != step_401 for a in goal.actions)
    kept = extract(classify(ingest(TOOLBENCH).trajectories, params), params).kept
    for r in kept.filter(pl.col("id") == row["id"]).to_dicts():
        assert all(step_401 not in a["steps"] for a in r["achievements"])


# -- the rule the agent broke ----------------------------------------------------------------------
def test_a_forbidden_write_is_no_achievement_and_no_sample_contains_it():
    row = tau_row(TASK47)
    cancel_step = next(i for i, m in enumerate(row["messages"])
                       for c in m["tool_calls"] or [] if c["name"] == "cancel_reservation")
    goal = hindsight_goal(row, rules())
    if isinstance(goal, AchievedGoal):  # before the violation, or opening after it: never holding it
        assert cancel_step not in sample_steps(row["messages"], goal)
        assert all(a.call_step != cancel_step for a in goal.actions)
    else:
        assert goal.reason in ("turn_conflict", "no_evidenced_achievement")


def test_task47_yields_no_sample_that_trains_on_the_cancellation_whatever_the_relabeler_says(tmp_path, llm_server):
    records = [r for r in json.loads(TAU.read_text()) if r["task_id"] in (0, 47)]
    path = tmp_path / "tasks" / "gpt-4o-airline.json"  # the shipped file's name: the same record ids
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    # A relabeler that always asks for exactly the violation, and judges that accept everything.
    llm_server.brain = careful_except("relabel", lambda r: json.dumps({"turns": [
        {"turn": t.number, "text": "Please cancel my reservation MZDDS4 because my plans changed."}
        for t in turns_of(r)], "confidence": 1.0}))
    assert _run(tmp_path, llm_server, path) == 0
    sft = _lines(tmp_path / "out" / "sft.jsonl")
    for row in sft:
        if row["metadata"]["kind"] == "hindsight":
            calls = [c["function"]["name"] for m in row["messages"] for c in m.get("tool_calls") or []]
            assert "cancel_reservation" not in calls, row["metadata"]["trajectory_id"]
    rejected = pl.read_parquet(tmp_path / "out" / "rejected.parquet")
    assert TASK47 in rejected["id"].to_list()


def test_a_wrong_flight_booking_is_still_a_hindsight_goal():
    goal = goal_of(tau_row(WRONG_FLIGHTS))
    assert [a.tool for a in goal.actions] == ["book_reservation"]
    assert not any(e.reason == "not_allowed" for e in goal.excluded)


# -- coverage both ways ----------------------------------------------------------------------------
def test_coverage_rejects_a_prompt_that_omits_a_write_and_accepts_one_that_covers_them():
    row = tau_row(TWO_CANCELS)
    goal = goal_of(row)
    assert sorted(a.arguments["reservation_id"] for a in goal.actions if a.tool == "cancel_reservation")[:2] == [
        "8C8K4E", "LU15PA"]
    ids = [a.arguments["reservation_id"] for a in goal.actions]
    both = f"Please cancel my reservations {', '.join(ids[:-1])} and {ids[-1]}."
    assert misses(both, goal, row) == []
    one = f"Please cancel my reservation {ids[0]}."
    found = misses(one, goal, row)
    assert found and {code for code, _ in found} == {"unrequested_action"}
    assert any(ids[-1] in detail for _, detail in found)


def test_coverage_rejects_a_prompt_that_asks_for_more_than_the_sample_does():
    row = tau_row(TWO_CANCELS)
    goal = goal_of(row)
    ids = " and ".join(a.arguments["reservation_id"] for a in goal.actions)
    found = misses(f"Please cancel my reservations {ids}, and add two checked bags to them.", goal, row)
    assert ("unmet_requirement" in {code for code, _ in found}
            and any("update_reservation_baggages" in d for _, d in found))
    found = misses(f"Please cancel my reservations {ids} and Z9Z9Z9.", goal, row)
    assert any(code == "unmet_requirement" and "Z9Z9Z9" in detail for code, detail in found)


def test_coverage_rejects_a_prompt_naming_an_entity_no_write_acts_on():
    # task 27 trial 3: the agent looked up IFOYYZ, refused to cancel it (basic economy) and
    # cancelled NQNU5R; "cancel IFOYYZ and NQNU5R" asks for a cancellation the sample lacks
    row = tau_row(REFUSED_ONE)
    goal = goal_of(row)
    assert [a.arguments["reservation_id"] for a in goal.actions] == ["NQNU5R"]
    found = misses("Please cancel my reservations IFOYYZ and NQNU5R.", goal, row)
    assert [code for code, _ in found] == ["unmet_requirement"] and "IFOYYZ" in found[0][1]
    assert misses("Please cancel my reservation NQNU5R.", goal, row) == []


def test_a_question_names_what_the_agent_looked_up_or_reported():
    # task 14 trial 3: no write in the sample; the agent looked up reservation YAX4DR and reported
    # its flights. A question naming what it looked up (or reported) covers the goal; one naming
    # nothing it looked up or reported may ask for anything.
    row = tau_row(QUESTION)
    goal = goal_of(row)
    assert not goal.actions and goal.facts
    looked_up = [r for f in goal.facts for r in f.reads if r.tool == "get_reservation_details"]
    assert looked_up and looked_up[0].arguments["reservation_id"] == "YAX4DR"
    assert misses("What are the flights on my reservation YAX4DR?", goal, row) == []
    found = misses("What are my options for getting home on the same day?", goal, row)
    assert [code for code, _ in found] == ["unmet_requirement"] and "looked up or reported" in found[0][1]


@pytest.mark.parametrize("opening,reason", [
    ("Hi, please downgrade my reservation ABC123 from business to economy class. My user id is sara_lee_1.", None),
    ("Downgrade ABC123 from business to economy class for me, user sara_lee_1.", None),
    ("Could you downgrade your reservation ABC123 from business to economy?", "not_a_request"),  # the agent's voice
    ("The user downgraded reservation ABC123 from business to economy.", "not_a_request"),  # about the run
    ("I'm sorry, I don't have reservation ABC123 with me, sara_lee_1.", "not_a_request"),  # asks nothing
    ("Hi, please downgrade my reservation from business to economy. My user id is sara_lee_1.",
     "unrequested_action"),  # ABC123, the reservation the write acts on, goes unnamed
    ("Hi, please downgrade my reservation ABC123 from business to economy class and cancel XYZ789. My user id "
     "is sara_lee_1.", "unmet_requirement"),
])
def test_the_relabel_gate_wants_the_users_own_request(opening, reason):
    row = downgrade(step1="Hi, I need help with a reservation.") | {"goal": "Hi, I need help with a reservation."}
    goal = GOAL.model_copy(update={"edits": [TurnEdit(step=1, opening=True, ask=["update_reservation_flights"])]})
    row |= {"achieved_goal": goal.model_dump_json()}
    answer = RelabelAnswer(turns=[{"turn": 1, "text": opening}], confidence=0.9)
    verdict, _ = relabel.gate(answer, row, rules(), goal.edits, {})
    assert (verdict and verdict[0]) == reason, verdict


def test_coverage_wants_a_booking_named_with_its_flights_and_dates():
    row = tau_row(WRONG_FLIGHTS)
    goal = goal_of(row)
    vague = "Please book me a one-way economy flight from JFK to SEA."
    assert any(code == "unrequested_action" for code, _ in misses(vague, goal, row))


# -- the sample is what the run proves -------------------------------------------------------------
NEGATED = re.compile(r"\b(don't|do not|no|not|without)\b")
REQUEST_WORDS = {  # an independent lexicon: a user turn with these words asks for that write
    "cancel_reservation": ("cancel",),
    "book_reservation": ("book a", "book me", "book the", "reserve"),
    "update_reservation_baggages": ("bag",),
    "send_certificate": ("compensation", "compensate"),  # not "certificate": users pay with them
}


def test_no_user_turn_kept_in_a_sample_asks_for_something_the_sample_does_not_do():
    """A user turn the plan keeps as it is never asks for a write the goal lacks; one that does is
    planned for a rewrite that no longer asks for it."""
    extracted = tau_extracted()
    assert extracted.height >= 60
    multi_turn = 0
    for row in extracted.to_dicts():
        goal = AchievedGoal.model_validate_json(row["achieved_goal"])
        done = {a.tool for a in goal.actions}
        edits = {e.step: e for e in goal.edits}
        users = [s for s in sample_steps(row["messages"], goal) if row["messages"][s]["role"] == "user"]
        multi_turn += len(users) > 1
        for step in users:
            for sentence in re.split(r"(?<=[.!?])\s+", row["messages"][step]["content"].lower()):
                if NEGATED.search(sentence):
                    continue  # "I don't want to include insurance or baggage" asks for nothing
                for tool, cues in REQUEST_WORDS.items():
                    if tool not in done and any(cue in sentence for cue in cues) and step not in edits:
                        raise AssertionError((row["id"], step, tool, sentence))
        assert goal.sample_end <= len(row["messages"])
        assert row["messages"][goal.sample_end - 1]["role"] == "assistant"
        for a in goal.actions:  # the sample holds every write it trains on
            assert a.call_step < goal.sample_end and a.call_step in goal.train_steps
    assert multi_turn >= 10


def _left_out_or_rewritten(row: dict, step: int, words: str) -> None:
    """The turn at `step` is outside the sample, or planned for a rewrite that no longer asks for `words`."""
    goal = hindsight_goal(row, rules())
    if isinstance(goal, NoGoal) or step not in sample_steps(row["messages"], goal):
        return
    edit = next(e for e in goal.edits if e.step == step)
    assert any(w in " ".join(edit.unask).replace("_", " ") for w in words.split()), edit


def test_a_user_turn_asking_for_another_change_is_left_out_or_rewritten():
    row = tau_row("tau-bench/gpt-4o-airline/task23-trial0")
    asks = next(i for i, m in enumerate(row["messages"])
                if m["role"] == "user" and "change my flight" in (m["content"] or ""))
    _left_out_or_rewritten(row, asks, "update_reservation_flights change")


def test_a_user_turn_asking_in_words_for_a_change_no_write_makes_is_left_out_or_rewritten():
    # task 5 trial 0: the agent only looked things up; "I'd like to modify the reservation with ID
    # UM3OG5" names no tool, but asks for a change the sample never makes
    row = tau_row("tau-bench/gpt-4o-airline/task5-trial0")
    asks = next(i for i, m in enumerate(row["messages"])
                if m["role"] == "user" and "like to modify the reservation" in (m["content"] or ""))
    goal = hindsight_goal(row, rules())
    assert isinstance(goal, AchievedGoal)
    if not any(a.tool.startswith("update_") for a in goal.actions):  # else a write of the goal answers it
        _left_out_or_rewritten(row, asks, "modify")
    # a change spoken of, not asked for, asks nothing: task 27 trial 3 ("due to a change of plan")
    # keeps its cancellation (test_coverage_rejects_a_prompt_naming_an_entity_no_write_acts_on)


def test_failed_and_repeated_calls_stay_as_context_with_weight_zero():
    params = rules()
    zero_weighted = 0
    for row in tau_extracted().to_dicts():
        goal = AchievedGoal.model_validate_json(row["achieved_goal"])
        for i, m in enumerate(row["messages"][: goal.sample_end]):
            if m["role"] != "assistant" or not m["tool_calls"]:
                continue
            results = [r for r in row["messages"] if r["role"] == "tool"
                       and r["tool_call_id"] in {c["id"] for c in m["tool_calls"]}]
            if results and all(is_error(r["content"]) for r in results):
                assert i not in goal.train_steps, (row["id"], i)
                zero_weighted += 1
        assert {a.call_step for a in goal.actions} <= set(goal.train_steps)
    assert params and zero_weighted >= 1


# -- exports and plain-text logs -------------------------------------------------------------------
def test_per_message_weights_appear_in_the_exports(tmp_path, llm_server):
    records = json.loads(TAU.read_text())
    path = tmp_path / "tau.json"
    path.write_text(json.dumps(records[:120]))
    assert _run(tmp_path, llm_server, path) == 0
    sft = [r for r in _lines(tmp_path / "out" / "sft.jsonl") if r["metadata"]["kind"] == "hindsight"]
    sharegpt = {r["metadata"]["sample_id"]: r for r in _lines(tmp_path / "out" / "sharegpt.jsonl")}
    assert sft
    weights = [m["weight"] for r in sft for m in r["messages"] if m["role"] == "assistant"]
    assert set(weights) == {0, 1} and all(
        "weight" not in m for r in sft for m in r["messages"] if m["role"] != "assistant")
    for r in sft:
        turns = sharegpt[r["metadata"]["sample_id"]]
        assert len(turns["metadata"]["turn_weights"]) == len(turns["conversations"])
        trained = [t for t, w in zip(turns["conversations"], turns["metadata"]["turn_weights"], strict=True) if w]
        assert all(t["from"] in ("gpt", "function_call") for t in trained)
    card = (tmp_path / "out" / "dataset_card.md").read_text()
    assert "weight" in card and "sample_end" not in card


def test_a_react_text_log_yields_a_rule_mode_candidate(tmp_path):
    mapping = {"id_path": "id", "goal_path": "goal", "success_path": "success", "reward_path": "reward"}
    params = make_params(tmp_path, ingest={"messages": mapping})
    trajectories = ingest(REACT, fmt="messages", mapping=mapping).trajectories
    kept = extract(classify(trajectories, params), params).kept
    assert params.extract.mode == "rule" and kept.height >= 1
    actions = [a for r in kept.to_dicts() for a in r["achievements"] if a["kind"] == "action"]
    assert actions, "a parsed text action that succeeded is an achievement in rule mode"


# -- helpers ------------------------------------------------------------------------------------------
def _run(tmp_path: Path, server, path: Path) -> int:
    # the scripted judges accept every covered prompt: the rubber-stamp alarm would fire
    params_file = write_params(tmp_path / "params.yaml", server, llm={"concurrency": 4},
                               gates={"acceptance_rate": [0.0, 1.0]})
    return main(["run", "--input", str(path), "--format", "tau-bench", "--out", str(tmp_path / "out"),
                 "--params", str(params_file)])


def _lines(path: Path) -> list[dict]:
    """A JSONL export's rows; none when the file is not there (a file with no rows is not written)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_odd_records_give_a_goal_or_a_reason_never_a_traceback():
    base = tau_row(TWO_CANCELS)
    odd_calls = [dict(m, tool_calls=[dict(c, arguments='["8C8K4E"]') for c in m["tool_calls"]])
                 if m["tool_calls"] else m for m in base["messages"]]
    variants = [
        base | {"metadata": '{"gt_actions": [1, null, {"name": null}, {"name": "cancel_reservation", "kwargs": 3}]}'},
        base | {"metadata": "not json", "tools": "[oops"},
        base | {"messages": odd_calls},
        base | {"messages": [m for m in base["messages"] if m["role"] != "user"]},
        base | {"messages": [m | {"content": None} for m in base["messages"]]},
    ]
    kept = []
    for row in variants:
        goal = hindsight_goal(row, rules())
        assert isinstance(goal, AchievedGoal | NoGoal)
        if isinstance(goal, NoGoal):
            assert goal.reason and goal.detail
        else:
            kept.append((row, goal))
    assert kept, "no variant kept a goal: the coverage check of an odd record never ran"
    for row, goal in kept:
        # the request names one of the run's five cancellations: the others are reported, in words
        found = misses("Please cancel 8C8K4E.", goal, row)
        assert len(found) >= len(goal.actions) - 1 and all(isinstance(r, str) and d for r, d in found)


@pytest.mark.parametrize("answer,accepted", [
    ({"violations": ["cancelled without the user's explicit confirmation"], "allowed": False, "confidence": 0.9},
     False),
    ({"violations": [], "allowed": True, "confidence": 0.9}, True),
])
def test_without_ground_truth_the_policy_judge_reads_the_rules_and_the_writes(tmp_path, llm_server, answer, accepted):
    row = tau_row(TWO_CANCELS) | {"metadata": "{}"}  # no ground truth: the policy judge must ask
    goal = goal_of(row)
    ids = ", ".join(a.arguments["reservation_id"] for a in goal.actions)
    llm_server.brain = careful_except("judge_policy", lambda r: json.dumps(answer))
    params = make_params(tmp_path, llm_server, verify={"judges": ["coverage", "policy"]})
    relabeled = opening_rewritten(row | {"achievements": [], "extract_mode": "rule"},
                                  f"Please cancel my reservations {ids}.", goal.model_dump_json())
    client = LLMClient(model="openai/local", api_base=llm_server.api_base, api_key="x", cache_dir=tmp_path / "c")
    out = verify(schema.frame([relabeled], schema.RELABELED), params, client)
    policy = next(j for j in out.kept["judgements"].to_list()[0] if j["judge"] == "policy")
    assert policy["accept"] is accepted and out.kept["verified"].to_list() == [accepted]
    asked = llm_server.prompts_of("judge_policy")
    assert len(asked) == 1
    text = asked[0]["messages"][0]["content"]
    assert "# Airline Agent Policy" in text and "cancel reservation" in text  # the rules and the writes
    if not accepted:
        assert "policy_violation" in policy["reason"] and out.rejected["reason"].to_list() == ["rejected_by_policy"]


def test_a_value_is_said_only_as_a_whole_word_as_the_regex_defines_it():
    """goal._said (a find loop) against the definition it replaced: re's (?<!\\w)value(?!\\w), on
    random texts over word characters of several scripts, digits, "_", spaces and punctuation."""
    import random
    import re

    from agenther.evidence.goal import _said

    def by_regex(value: str, low_text: str) -> bool:
        v = value.lower()
        return len(v) >= 2 and re.search(rf"(?<![\w]){re.escape(v)}(?![\w])", low_text) is not None

    alphabet = "ab_1 -.é²٣\u00a0x/#"
    rng = random.Random(13)
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        assert _said(value, text) == by_regex(value, text), (value, text)
    assert _said("HAT041", "flight hat041, then hat0412") and not _said("HAT041", "flight hat0412")
