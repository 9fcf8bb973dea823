"""A sample proven by replay: its trained writes, run from the initial state, reach the run's state.

A hindsight sample trains on some of the run's writes (the achieved goal's actions at the
assistant steps that train: agenther/evidence/goal.py). Where the run's environment can be
replayed, that claim is checked, not judged: the trained writes, replayed in order from the
state at the sample's opening (the initial state, then the run's own calls before the opening,
where the sample is a window that opens later), must all succeed and reach the same state as the
run's own calls up to the sample's cut. A write left out of the loss (a repeat), a write the run never made, or one whose
arguments differ shows up as another state; the rejection names the first call that differs.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence

from pydantic import BaseModel

from agenther.envs import Call, Environment, choose
from agenther.evidence.goal import AchievedGoal, Action, metadata_of
from agenther.evidence.render import tool_calls
from agenther.params import Params

REPLAY_MISMATCH = "replay_mismatch"


class Proof(BaseModel):
    ok: bool
    reason: str


def env_for(row: dict, params: Params) -> str | None:
    """The environment that replays `row` (params replay.env), or None."""
    return choose(row.get("source_format"), metadata_of(row), params.replay.env)


def trained_writes(goal: AchievedGoal) -> list[Action]:
    """The goal's writes at the assistant steps the sample trains on, in order."""
    train = set(goal.train_steps)
    return [a for a in goal.actions if a.call_step in train]


def as_calls(actions: Sequence[Action]) -> list[Call]:
    return [Call(name=a.tool, kwargs=a.arguments) for a in actions]


def run_calls(messages: list[dict], end: int) -> list[tuple[int, Call]]:
    """(step, call) of every tool call the run made before `end`, in order."""
    return [(c["step"], Call(name=c["name"], kwargs=c["arguments"])) for c in tool_calls(messages) if c["step"] < end]


def prove(messages: list[dict], goal: AchievedGoal, env: Environment) -> Proof:
    """Whether the sample's trained writes reproduce the run's state at the sample's cut; if not, the
    first call that differs (and the first trained write that fails on replay, if one does)."""
    trained = trained_writes(goal)
    before = [call for _, call in run_calls(messages, goal.start)]  # what the run did before the opening
    mine = env.replay([*before, *as_calls(trained)])
    results = mine.results[len(before):]
    failed = next(((a, r) for a, r in zip(trained, results, strict=True) if not r.ok), None)
    run = run_calls(messages, goal.sample_end)
    if failed is None and mine.digest == env.replay([call for _, call in run]).digest:
        return Proof(ok=True, reason=f"{len(trained)} trained write(s) replayed from the initial state reach the "
                                     f"run's state at the sample's cut (digest {mine.digest[:12]})")
    reason = f"{REPLAY_MISMATCH}: {_first_difference(trained, [c for c in changes(env, run) if c[0] >= goal.start])}"
    if failed is not None:
        action, result = failed
        reason += f"; step {action.call_step} {action.tool} fails on replay: {result.output[:200]}"
    return Proof(ok=False, reason=reason)


def changes(env: Environment, calls: Sequence[tuple[int, Call]]) -> list[tuple[int, Call]]:
    """The calls that changed the state, replayed one by one from the initial state."""
    env.reset()
    before, out = env.digest(), []
    for step, call in calls:
        env.result(call)
        after = env.digest()
        if after != before:
            out.append((step, call))
        before = after
    return out


def _first_difference(trained: list[Action], run: list[tuple[int, Call]]) -> str:
    """The first place where the trained writes and the run's state-changing calls part, aligned as a diff."""
    mine = [(a.tool, _canonical(a.arguments)) for a in trained]
    theirs = [(c.name, _canonical(c.kwargs)) for _, c in run]
    for op, i, _, j, _ in difflib.SequenceMatcher(a=mine, b=theirs, autojunk=False).get_opcodes():
        if op == "insert":
            step, call = run[j]
            return f"step {step} {_call(call.name, call.kwargs)}: the run made this write before the cut, the sample does not train on it"
        if op == "delete":
            return f"step {trained[i].call_step} {_call(trained[i].tool, trained[i].arguments)}: the run's calls up to the cut make no such change"
        if op == "replace":
            step, call = run[j]
            return (f"step {trained[i].call_step} {_call(trained[i].tool, trained[i].arguments)} differs from the run's "
                    f"step {step} {_call(call.name, call.kwargs)}")
    return "the same writes reach another state"


def _canonical(kwargs: dict) -> str:
    return json.dumps(kwargs, sort_keys=True)


def _call(name: str, kwargs: dict) -> str:
    text = _canonical(kwargs)
    return f"{name}({text if len(text) <= 160 else text[:159] + '…'})"
