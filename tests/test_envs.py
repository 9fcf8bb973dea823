"""Replayable environments: tau-bench airline reproduces the shipped log, the replay judge proves
samples, an environment is a plugin, and hindsight tasks replay to their data hash."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, TOOLBENCH, ingest, install_distribution, make_params, write_params

from agenther import envs, schema
from agenther.cli import main
from agenther.envs import Call, open_env
from agenther.envs.proof import REPLAY_MISMATCH, trained_writes
from agenther.envs.state_hash import EntryTexts, Overlay
from agenther.envs.tau_airline import WRITES
from agenther.evidence.goal import AchievedGoal
from agenther.evidence.render import tool_calls
from agenther.params import ParamsError
from agenther.stages.classify import classify
from agenther.stages.extract import extract
from agenther.stages.verify import verify

AIRLINE = "tau-bench-airline"


# -- the environment reproduces the log ----------------------------------------------------------
def test_replay_reproduces_every_recorded_hash_and_every_recorded_reward(capsys):
    # tau-bench's reward: sha256 of the whole data after the task's expected actions; 182 of the
    # shipped log's 200 records carry that hash (5 have no reward info, 13 are scored by outputs).
    assert main(["replay", str(TAU)]) == 0
    out = capsys.readouterr().out
    assert "ground truth: 182 of 182 recorded hashes reproduced" in out
    assert "agent runs: 182 of 182 recorded rewards reproduced" in out


def test_what_the_agent_looked_up_is_the_replayed_state_at_that_moment():
    # Every user and reservation the agents read, replaying their calls in order, is exactly what
    # the log's tool result showed: the data and each write's effect, entry by entry.
    env, compared = open_env(AIRLINE), 0
    lookups = {"get_user_details": ("users", "user_id"), "get_reservation_details": ("reservations", "reservation_id")}
    for row in ingest(TAU).trajectories.iter_rows(named=True):
        env.reset()
        for call in tool_calls(row["messages"]):
            env.result(Call(name=call["name"], kwargs=call["arguments"]))
            if call["name"] in lookups and not call["result"].startswith("Error"):
                section, key = lookups[call["name"]]
                assert json.loads(call["result"]) == env.state.get(section, call["arguments"][key]), row["id"]
                compared += 1
    assert compared > 400


def _reference_digest(data: dict) -> str:
    """tau-bench's hash as its definition reads: sha256 of str() of the whole data made hashable."""
    def h(v):
        if isinstance(v, dict):
            return tuple((k, h(x)) for k, x in sorted(v.items()))
        return tuple(h(x) for x in v) if isinstance(v, list) else v
    return hashlib.sha256(str(h(data)).encode()).hexdigest()


def test_the_digest_is_tau_benchs_hash_of_the_whole_changed_state():
    base = {"flights": {"F1": {"dates": {"d": {"price": 5}}}},  # one entry: the tuple repr "(x,)"
            "reservations": {"R2": {"payment_history": [{"amount": 10}], "note": "it's \"quoted\""},
                             "R5": {"payment_history": [], "price": 1.5}},
            "users": {}}  # an empty map: "()"
    state = Overlay(EntryTexts(base))
    assert state.digest() == _reference_digest(base)
    state.edit("reservations", "R2")["payment_history"].append({"amount": -10.0})
    state.put("reservations", "R1", {"created": "now"})  # a new key sorts before the others
    state.put("users", "u", {"reservations": ["R1"]})
    changed = {"flights": base["flights"], "users": {"u": {"reservations": ["R1"]}},
               "reservations": {"R1": {"created": "now"}, "R5": base["reservations"]["R5"],
                                "R2": {"payment_history": [{"amount": 10}, {"amount": -10.0}],
                                       "note": "it's \"quoted\""}}}
    assert state.digest() == _reference_digest(changed)
    assert base["reservations"]["R2"]["payment_history"] == [{"amount": 10}]  # the base never changes


# -- the replay judge ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relabeled():
    """The shipped log's extracted records (rule mode: no LLM), each with a hindsight prompt."""
    params = make_params(Path(tempfile.mkdtemp()))
    extracted = extract(classify(ingest(TAU).trajectories, params), params).kept
    rows = [r | {"hindsight_prompt": "Please do what the run did.", "relabel_confidence": 0.9, "relabel_attempts": 1,
                 "relabel_rationale": "", "relabel_model": "test"} for r in extracted.to_dicts()]
    return [r for r in rows if trained_writes(AchievedGoal.model_validate_json(r["achieved_goal"]))]


def _replay_only(tmp_path) -> dict:
    return make_params(tmp_path, verify={"judges": ["replay"]})


def _with_goal(row: dict, goal: AchievedGoal) -> dict:
    return row | {"achieved_goal": goal.model_dump_json()}


def test_the_runs_own_writes_are_proven_and_a_tampered_write_is_replay_mismatch(relabeled, tmp_path):
    assert len(relabeled) >= 20
    params = _replay_only(tmp_path)
    honest = verify(schema.frame(relabeled, schema.RELABELED), params, None)
    assert honest.kept["verified"].all() and honest.rejected.height == 0
    assert all(j[0]["judge"] == "replay" and j[0]["model"] == f"env:{AIRLINE}" for j in honest.kept["judgements"])

    reservations = sorted({a.arguments["reservation_id"] for r in relabeled
                           for a in AchievedGoal.model_validate_json(r["achieved_goal"]).actions
                           if "reservation_id" in a.arguments})
    tampered, first_steps = [], {}
    for row in relabeled:
        goal = AchievedGoal.model_validate_json(row["achieved_goal"])
        first = trained_writes(goal)[0]
        args = dict(first.arguments)
        if "reservation_id" in args:  # another reservation of the data
            args["reservation_id"] = next(r for r in reservations if r != args["reservation_id"])
        elif "insurance" in args:  # a booking: the other insurance choice
            args["insurance"] = "yes" if args["insurance"] == "no" else "no"
        else:  # a certificate: another amount
            args["amount"] = args["amount"] + 7
        actions = [a.model_copy(update={"arguments": args}) if a is first else a for a in goal.actions]
        tampered.append(_with_goal(row, goal.model_copy(update={"actions": actions})))
        first_steps[row["id"]] = first.call_step
    out = verify(schema.frame(tampered, schema.RELABELED), params, None)
    assert out.rejected.height == len(tampered)
    assert set(out.rejected["reason"]) == {REPLAY_MISMATCH}
    for rejection in out.rejected.iter_rows(named=True):
        assert f"replay: {REPLAY_MISMATCH}: step {first_steps[rejection['id']]} " in rejection["detail"], rejection


def test_a_write_the_sample_does_not_train_on_is_replay_mismatch(relabeled, tmp_path):
    row = relabeled[0]
    goal = AchievedGoal.model_validate_json(row["achieved_goal"])
    step = trained_writes(goal)[0].call_step
    out = verify(schema.frame([_with_goal(row, goal.model_copy(update={
        "train_steps": [s for s in goal.train_steps if s != step]}))], schema.RELABELED), _replay_only(tmp_path), None)
    assert out.rejected["reason"].to_list() == [REPLAY_MISMATCH]
    assert f"step {step} " in out.rejected["detail"][0] and "the sample does not train on it" in out.rejected["detail"][0]


def test_logs_no_environment_replays_are_judged_without_it(tmp_path):
    # ToolBench: no environment; the replay judge does not apply and is not counted
    params = make_params(tmp_path, verify={"judges": ["replay", "grounding"]})
    row = ingest(TOOLBENCH).trajectories.to_dicts()[0]
    goal = AchievedGoal(sample_end=len(row["messages"]), train_steps=[])
    row |= {"is_failure": True, "failure_type": "incomplete", "severity": 0.5, "recoverable": True,
            "classify_reason": "", "classify_mode": "rule", "achievements": [], "extract_mode": "rule",
            "achieved_goal": goal.model_dump_json(), "hindsight_prompt": "Hello.", "relabel_confidence": 0.9,
            "relabel_attempts": 1, "relabel_rationale": "", "relabel_model": "test"}
    out = verify(schema.frame([row], schema.RELABELED), params, None)
    assert [j["judge"] for j in out.kept["judgements"][0]] == ["grounding"] and out.kept["verified"][0]


# -- an environment is a plugin ------------------------------------------------------------------
PLUGIN = '''
import hashlib
from agenther.envs import CallResult, Environment

class Ledger(Environment):
    name = "ledger"
    formats = ("messages",)

    def reset(self):
        self.entries = []

    def result(self, call):
        if call.name != "add":
            return CallResult(ok=False, output="Error: unknown tool")
        self.entries.append(call.kwargs["amount"])
        return CallResult(ok=True, output="added")

    def digest(self):
        return hashlib.sha256(repr(sorted(self.entries)).encode()).hexdigest()
'''


@pytest.fixture
def ledger_plugin(tmp_path, monkeypatch):
    """A user's own simulator, installed as a distribution with an entry point (real metadata)."""
    install_distribution(tmp_path, monkeypatch, "ledger-sim", "1.0", {"ledger_sim": PLUGIN},
                         "[agenther.envs]\nledger = ledger_sim:Ledger\n")
    envs.registered.cache_clear()
    envs.env_class.cache_clear()
    yield
    envs.registered.cache_clear()
    envs.env_class.cache_clear()
    sys.modules.pop("ledger_sim", None)


def test_a_users_simulator_plugs_in_by_entry_point(ledger_plugin, tmp_path):
    assert {"ledger", AIRLINE} <= set(envs.registered())
    assert envs.choose("messages", {}, "auto") == "ledger"  # its format
    assert envs.choose("tau-bench", {"domain": "airline"}, "auto") == AIRLINE  # the built-in, the same way
    assert envs.choose("tau-bench", {"domain": "retail"}, "auto") is None  # no environment replays it
    assert envs.choose("tau-bench", {"domain": "airline"}, "none") is None
    ledger = open_env("ledger")
    assert ledger.replay([Call(name="add", kwargs={"amount": 2}), Call(name="add", kwargs={"amount": 1})]).digest \
        == ledger.replay([Call(name="add", kwargs={"amount": 1}), Call(name="add", kwargs={"amount": 2})]).digest
    assert not ledger.replay([Call(name="pay", kwargs={})]).results[0].ok


def test_an_unknown_environment_stops_the_run_before_any_record(tmp_path, capsys):
    with pytest.raises(ParamsError, match=r"replay\.env: Input should be auto, none or an installed environment "
                                          r"\(tau-bench-airline\), got 'no-such-sim'"):
        make_params(tmp_path, replay={"env": "no-such-sim"})
    path = write_params(tmp_path / "params.yaml", replay={"env": "no-such-sim"})
    assert main(["run", "--input", str(TAU), "--limit", "2", "--out", str(tmp_path / "out"), "--params", str(path)]) == 2
    assert "replay.env" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- hindsight tasks -----------------------------------------------------------------------------
@pytest.mark.slow
def _changed_before_opening(sample: dict) -> bool:
    """Did the source run make a successful write before the sample's opening (metadata.rewrites and the
    trajectory say where the sample opens)? Read from the shipped log itself."""
    trajectory = sample["metadata"]["trajectory_id"]
    record = next(r for r in json.loads(TAU.read_text()) if trajectory.endswith(f"task{r['task_id']}-trial{r['trial']}"))
    opening = next(m["content"] for m in sample["messages"] if m["role"] == "user")
    rewrites = {r["after"]: r["before"] for r in sample["metadata"]["rewrites"]}
    original = rewrites.get(opening, opening)
    start = next(i for i, m in enumerate(record["traj"]) if m["role"] == "user" and m["content"] == original)
    env = open_env(AIRLINE)
    before = [Call(name=c["function"]["name"], kwargs=json.loads(c["function"]["arguments"]))
              for m in record["traj"][:start] for c in m.get("tool_calls") or []]
    return env.replay(before).digest != env.replay([]).digest


def test_every_exported_task_replays_to_its_data_hash_and_holds_its_samples_trained_writes(tmp_path, llm_server):
    params = write_params(tmp_path / "params.yaml", llm_server.api_base, cache=tmp_path / "cache")
    out = tmp_path / "out"
    assert main(["run", "--input", str(TAU), "--limit", "100", "--out", str(out), "--params", str(params)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tasks = [json.loads(line) for line in (out / "tasks" / f"{AIRLINE}.jsonl").read_text().splitlines()]
    samples = {s["metadata"]["sample_id"]: s for s in map(json.loads, (out / "sft.jsonl").read_text().splitlines())
               if s["metadata"]["kind"] == "hindsight"}
    # every sample, but those whose window opens after the run changed the state, and nothing else
    opens_later = {s for s, row in samples.items() if _changed_before_opening(row)}
    assert tasks and sorted(t["sample_id"] for t in tasks) == sorted(set(samples) - opens_later)
    package = summary["stages"]["package"]
    assert package["hindsight_tasks"] == len(tasks) == summary["exports"]["rows"][f"tasks/{AIRLINE}.jsonl"]
    assert package["hindsight_tasks_skipped"] == len(opens_later)
    assert f"Hindsight tasks with a verifiable reward (`tasks/`): {len(tasks)}" in (out / "dataset_card.md").read_text()
    env = open_env(AIRLINE)
    for task in tasks:
        replay = env.replay([Call(**a) for a in task["actions"]])
        assert all(r.ok for r in replay.results) and replay.digest == task["data_hash"], task["sample_id"]
        # the writes the exported sample trains on (weight 1), in order, are the task's actions
        sample = samples[task["sample_id"]]
        trained = [{"name": c["function"]["name"], "kwargs": json.loads(c["function"]["arguments"])}
                   for m in sample["messages"] if m["role"] == "assistant" and m.get("weight") == 1
                   for c in m.get("tool_calls") or [] if c["function"]["name"] in WRITES]
        assert task["actions"] == trained, task["sample_id"]
        said = [m["content"] for m in sample["messages"] if m["role"] == "user"]  # the whole user side, in order
        assert task["instruction"].startswith(("You open with: " + said[0]) if len(said) > 1 else said[0])
        assert all(text in task["instruction"] for text in said)
        assert set(task) >= {"user_id", "actions", "instruction", "outputs"}  # tau-bench's Task
    verified = pl.read_parquet(out / "04_verified.parquet")
    assert summary["stages"]["verify"]["judges"]["replay"]["accepted"] == verified.height
