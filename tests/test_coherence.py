"""A hindsight sample is one coherent conversation: every trained turn follows from the goal and what
the user said before it. The coherence judge's rules, each shown to fail on a sample built to break
it; the planner that makes samples coherent by rewriting the user side; and whole runs with the
careful scripted relabeler, read turn by turn with checks of this file's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, write_params
from synthetic import GOAL, downgrade

from agenther.cli import main
from agenther.evidence import coherence
from agenther.evidence.conversation import hindsight_goal
from agenther.evidence.goal import AchievedGoal, NoGoal, sample_steps
from agenther.stages.classify import classify


def codes(row: dict, goal: AchievedGoal = GOAL, rewrites: dict | None = None) -> list[str]:
    turns = coherence.sample_turns(row["messages"], sample_steps(row["messages"], goal), goal, rewrites or {})
    return [d.code for d in coherence.defects(turns, goal, row)]


def test_a_coherent_sample_has_no_defect():
    assert codes(downgrade()) == []


@pytest.mark.parametrize("changes,code", [
    ({"step4": "Could you please provide your reservation ID?"}, "asks_given_value"),
    ({"step8": "Done: ABC123 is now in economy. Would you like me to cancel your other reservation too?"},
     "speaks_other_action"),
    ({"step5": "Yes, please. Though I don't remember my reservation ID."}, "denies_given_value"),
    ({"step5": "Yes, please. And can you add two checked bags to it?"}, "asks_unmade_change"),
    ({"step5": "Yes, please. My other reservation is XYZ789."}, "names_unused_value"),
    ({"step1": "Hi, I'd like my reservation ABC123 in business class please. My user id is sara_lee_1."},
     "other_enum_value"),
])
def test_each_rule_can_fail(changes, code):
    assert code in codes(downgrade(**changes))


def test_an_id_a_trained_call_uses_must_come_from_the_user_or_a_tool():
    row = downgrade()
    call = row["messages"][6]["tool_calls"][0]
    call["arguments"] = call["arguments"].replace("credit_card_1", "credit_card_9")
    assert "unsourced_argument" in codes(row)
    # the same call in a turn that does not train (a dead end) is context: no defect
    assert "unsourced_argument" not in codes(row, GOAL.model_copy(update={"train_steps": [2, 4, 8]}))


def test_a_wish_no_call_or_result_meets_is_unmet_whoever_wrote_it():
    opening = "Hi, please downgrade ABC123 from business to economy, with an aisle seat. My user id is sara_lee_1."
    assert codes(downgrade(), rewrites={1: opening}) == ["unmet_requirement"]  # the relabeler's wish
    assert codes(downgrade(step1=opening)) == ["unmet_requirement"]  # the user's own, left unmet
    # the agent saying it is done is not a call or result that does it
    claimed = downgrade(step1=opening, step8="Done: ABC123 is now in economy, with an aisle seat.")
    assert codes(claimed) == ["unmet_requirement"]
    # a wish the run's results bear on (prices) is met
    cheapest = "Hi, please downgrade ABC123 from business to the cheapest economy fare. My user id is sara_lee_1."
    assert codes(downgrade(step1=cheapest)) == []


def test_the_assistant_asking_for_a_value_it_was_not_given_is_fine():
    row = downgrade(step1="Hi, I'd like to downgrade a reservation from business to economy.",
                    step2="Sure. Could you please provide your reservation ID?",
                    step3="It's ABC123.")
    # (the run is different now: no lookup at 2; the sample is 1..5, the question is answered at 3)
    row["messages"][3] = {"role": "user", "content": "It's ABC123."}
    goal = GOAL.model_copy(update={"sample_end": 5, "actions": [], "train_steps": [2, 4]})
    assert "asks_given_value" not in codes(row, goal)


# -- the planner ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tau_failures() -> dict[str, dict]:
    from conftest import ingest, make_params

    params = make_params(Path("/tmp/agenther-test-coherence"))
    classified = classify(ingest(TAU).trajectories, params)
    return {r["id"].rsplit("/", 1)[1]: r for r in classified.filter(pl.col("is_failure")).to_dicts()}


def test_a_request_given_later_stays_later(tau_failures):
    # task 14 trial 1 (issue 18): the user gives the user and reservation IDs in turn 3, where the
    # agent asks for them; an opening that named them would make that question ask for what it was told
    goal = hindsight_goal(tau_failures["task14-trial1"])
    assert isinstance(goal, AchievedGoal)
    opening = next((e for e in goal.edits if e.opening), None)
    if opening is not None:
        asked_later = [m["content"] for m in tau_failures["task14-trial1"]["messages"][goal.start + 1: goal.sample_end]
                       if m["role"] == "user"]
        for held in opening.hold:
            assert any(held in text for text in asked_later)
        assert not set(opening.name) & set(opening.hold)


def test_a_turn_asking_for_another_change_is_rewritten_or_left_out(tau_failures):
    # task 10 trial 0: the user asks to remove a passenger, then to cancel; the agent refuses both and
    # later books a flight. The sample opens after the refusals (the agent's words cannot change).
    row = tau_failures["task10-trial0"]
    goal = hindsight_goal(row)
    assert isinstance(goal, AchievedGoal) and [a.tool for a in goal.actions] == ["book_reservation"]
    steps = sample_steps(row["messages"], goal)
    kept_text = " ".join((row["messages"][s]["content"] or "") for s in steps
                         if s not in {e.step for e in goal.edits} and row["messages"][s]["role"] != "system")
    assert "cancel" not in kept_text.lower() and "remove" not in kept_text.lower()


def test_the_yield_of_the_shipped_log(tau_failures):
    # issue 18: at least 70 of the 116 failures reach relabeling (29 before the whole user side was relabeled)
    goals = [hindsight_goal(r) for r in tau_failures.values() if r["recoverable"]]
    assert len(tau_failures) == 116
    assert sum(isinstance(g, AchievedGoal) for g in goals) >= 70
    assert all(isinstance(g, AchievedGoal | NoGoal) for g in goals)


# -- whole runs with the careful relabeler, read turn by turn -------------------------------------------
ID = r"\b(?=\w*\d)(?=\w*[A-Za-z])\w{5,}\b"  # H9ZU1C, mia_kim_4397
ASKS_FOR_ID = re.compile(r"(provide|share|give me|what is|what's|tell me|need)[^.?!]{0,40}\b(user|reservation) id", re.I)
DENIES_ID = re.compile(r"(don't|do not|can't|cannot)\s+(remember|recall|have|know|find)[^.?!]{0,30}\b(user|reservation) id",
                       re.I)
DEMO = ("task10-trial0", "task14-trial1", "task4-trial0", "task32-trial1")  # issue 18's four samples


def _independent_defects(sample: dict) -> list[str]:
    """This test's own reading of an exported sample: an asked-for ID the user gave, a user denying
    an ID given earlier, a rewrite that lost a value the agent then used."""
    found, said = [], ""
    messages = sample["messages"]
    for i, m in enumerate(messages):
        text = m.get("content") or ""
        if m["role"] == "user":
            if DENIES_ID.search(text) and re.search(ID, said) and said.strip():
                kind = DENIES_ID.search(text).group(3).lower()
                given = [v for v in re.findall(ID, said) if (kind == "user") == ("_" in v)]
                if given:
                    found.append(f"user denies a {kind} id after giving {given[0]}: {text[:80]}")
            said += " " + text
        elif m["role"] == "assistant" and m.get("weight") == 1 and ASKS_FOR_ID.search(text):
            kind = ASKS_FOR_ID.search(text).group(2).lower()
            given = [v for v in re.findall(ID, said) if (kind == "user") == ("_" in v) and len(v) >= 6]
            if given:
                found.append(f"trained turn {i} asks for the {kind} id after {given[0]} was given: {text[:80]}")
    used = " ".join(c["function"]["arguments"] for m in messages for c in m.get("tool_calls") or [])
    for r in sample["metadata"]["rewrites"]:
        lost = [v for v in re.findall(ID, r["before"]) if v in used and v not in r["after"]]
        if lost:
            found.append(f"rewrite of step {r['step']} lost {lost}")
    return found


def _only_rule_edits(before: str, after: str, goal: AchievedGoal) -> bool:
    """`after` is `before` less some whole sentences, with parenthesized details added and enum
    values swapped for values the goal's writes used."""
    said = re.sub(r" \([^()]*\)$", "", after)  # the added details
    used = set(re.findall(r"[a-z0-9]+", goal.model_dump_json().lower()))
    original = set(re.findall(r"[a-z0-9']+", before.lower()))
    new_words = set(re.findall(r"[a-z0-9']+", said.lower())) - original
    kept = [s for s in re.split(r"(?<=[.!?])\s+", said) if s.strip()]
    return bool(kept) and new_words <= used and len(said) <= len(" ".join(before.split())) + 20


@pytest.mark.slow
def test_a_careful_relabeler_run_over_the_shipped_log_is_coherent_turn_by_turn(tmp_path, llm_server):
    params = write_params(tmp_path / "params.yaml", llm_server, llm={"concurrency": 4},
                          gates={"acceptance_rate": [0.0, 1.0]})
    assert main(["run", "--input", str(TAU), "--out", str(tmp_path / "out"), "--params", str(params)]) == 0
    out = tmp_path / "out"
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    hindsight = [s for s in sft if s["metadata"]["kind"] == "hindsight"]
    assert len(hindsight) >= 25
    defects = {s["metadata"]["trajectory_id"]: _independent_defects(s) for s in hindsight}
    assert not any(defects.values()), {k: v for k, v in defects.items() if v}
    summary = json.loads((out / "summary.json").read_text())
    rewritten = sum(len(s["metadata"]["rewrites"]) for s in hindsight)
    assert rewritten > 0 and summary["stages"]["package"]["rewritten_turns"] == rewritten
    assert f"{rewritten} user turns" in (out / "dataset_card.md").read_text()
    # issue 18's four samples: each coherent now, or rejected with its reason
    rejected = pl.read_parquet(out / "rejected.parquet")
    for short in DEMO:
        trajectory = f"tau-bench/gpt-4o-airline/{short}"
        why = rejected.filter(pl.col("id") == trajectory)
        assert trajectory in defects or why.height == 1, short
        assert why.height == 0 or why["reason"][0] and why["detail"][0]
    # where no model was asked, rules only took whole sentences away, swapped an enum value for the
    # one the run used, or added details in parentheses: every other word is the user's own
    relabeled = pl.read_parquet(out / "03_relabeled.parquet")
    ruled = relabeled.filter(pl.col("relabel_model") == "rules")
    assert ruled.height and (ruled["relabel_attempts"] == 0).all()
    for row in ruled.to_dicts():
        goal = AchievedGoal.model_validate_json(row["achieved_goal"])
        for r in json.loads(row["rewrites"]):
            if r["step"] != goal.start:
                assert _only_rule_edits(r["before"], r["after"], goal), r
    assert len(llm_server.prompts_of("relabel")) < relabeled.height


@pytest.mark.parametrize("said,by_rules", [
    ("Yes, please proceed with canceling the current booking. Thanks for the breakdown!", False),  # an answer
    ("Let's proceed with the cancellation and use my certificates first for payment.", False),  # goes on
    ("Alright, thanks. Can you now add 2 checked bags to my reservation YAX4DR?", True),
])
def test_an_opening_taken_from_the_middle_of_a_run_is_written_by_rules_only_when_it_can_open(said, by_rules):
    from agenther.evidence.edits import rule_written
    from agenther.evidence.goal import TurnEdit
    from agenther.evidence.tools import Tools

    edit = TurnEdit(step=5, opening=True, name=["reservation id YAX4DR"])
    text = rule_written(edit, said, mid_conversation=True, tools=Tools.of(None), known=[])
    assert (text is not None) == by_rules, text
    if by_rules:
        assert text.startswith("Can you add 2 checked bags") and "thanks" not in text.lower()
