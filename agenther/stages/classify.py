"""Stage 1: is a run a failure, of which kind, how severe, and is it worth relabeling?

Severity direction: 0 = near miss (most of the goal was done), 1 = nothing of the goal
was done. Higher severity means a lower training weight (see package.py).

Rule mode reads each benchmark's own signals first:
- tau-bench: the ground-truth write actions against the write calls the agent executed;
- ToolBench: finish_type (give up) and tool error results;
then text cues (claims of completion with no successful write = hallucination).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import polars as pl

from agenther import schema
from agenther.evidence.render import prompt_budget, render, tool_calls
from agenther.evidence.tools import Tools, is_error
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, LLMs, map_concurrent
from agenther.llm.answers import ClassifyAnswer
from agenther.llm.ask import ask
from agenther.params import Params

_NAMES_ONLY = Tools()

GIVE_UP = re.compile(r"\b(sorry|unable to|couldn't|could not|can't|cannot|not able to|failed to)\b", re.I)
CLAIM_DONE = re.compile(
    r"\b(has been|have been|was|is now|successfully|I have|I've)\s+(successfully\s+)?"
    r"(booked|cancell?ed|updated|modified|changed|upgraded|refunded|sent|issued|added)\b",
    re.I,
)


def is_write(tool_name: str) -> bool:
    """By the tool's name (classify reads no params): agenther.evidence.tools decides."""
    return _NAMES_ONLY.is_write(tool_name)


def canonical_call(name: str, arguments: dict) -> str:
    return f"{name}({json.dumps(arguments, sort_keys=True, separators=(',', ':'))})"


def action_diff(gt_actions: list[dict], messages: list[dict]) -> dict[str, list[str]]:
    """Ground-truth write actions vs the write calls that succeeded, as canonical call strings."""
    expected = Counter(canonical_call(a["name"], a.get("kwargs") or {}) for a in gt_actions if is_write(a["name"]))
    done = Counter(
        canonical_call(c["name"], c["arguments"])
        for c in tool_calls(messages)
        if is_write(c["name"]) and not is_error(c["result"])
    )
    return {
        "matched": sorted((expected & done).elements()),
        "missing": sorted((expected - done).elements()),
        "extra": sorted((done - expected).elements()),
    }


def _name(call: str) -> str:
    return call.split("(", 1)[0]


def action_progress(gt_actions: list[dict], messages: list[dict]) -> float:
    """How much of the expected action sequence (reads and writes) the run performed, in [0, 1].
    An expected call done exactly scores 1; the best same-name call with some arguments right
    scores the share of arguments it got right; a call never made scores 0."""
    if not gt_actions:
        return 0.5  # no ground truth: neither a near miss nor a total miss
    done = [c for c in tool_calls(messages) if not is_error(c["result"])]
    scores = []
    for action in gt_actions:
        kwargs = action.get("kwargs") or {}
        best = 0.0
        for call in (c for c in done if c["name"] == action["name"]):
            keys = set(kwargs) | set(call["arguments"])
            same = sum(kwargs.get(k) == call["arguments"].get(k) for k in keys)
            best = max(best, same / len(keys) if keys else 1.0)
        scores.append(best)
    return sum(scores) / len(scores)


def classify_tau_bench(messages: list[dict], meta: dict, success: bool | None) -> tuple[str, float, str]:
    if success:
        return schema.NOT_A_FAILURE, 0.0, "reward 1.0"
    gt_actions = meta.get("gt_actions") or []
    diff = action_diff(gt_actions, messages)
    matched, missing, extra = diff["matched"], diff["missing"], diff["extra"]
    wrong_args = {_name(c) for c in missing} & {_name(c) for c in extra}
    severity = 1.0 - action_progress(gt_actions, messages)
    summary = f"matched {len(matched)}, missing {missing}, extra {extra}"
    if extra and not wrong_args:
        return "constraint_violation", severity, f"unrequested write actions: {summary}"
    if wrong_args:
        return "wrong_result", severity, f"write actions with wrong arguments: {summary}"
    if missing:
        attempted = {c["name"] for c in tool_calls(messages) if is_error(c["result"])}
        if {_name(c) for c in missing} & attempted:
            return "tool_error", severity, f"required actions failed in the tool: {summary}"
        if _claims_done(messages):
            return "hallucination", severity, f"claims completion without the action: {summary}"
        return "incomplete", severity, f"required actions never executed: {summary}"
    # Every write action matched, yet reward 0: the answer to the user missed required outputs.
    return "wrong_result", min(severity, 0.2), f"actions matched but expected outputs missing: {summary}"


def classify_toolbench(messages: list[dict], meta: dict, success: bool | None, final: str) -> tuple[str, float, str]:
    if success:
        return schema.NOT_A_FAILURE, 0.0, "win"
    calls = [c for c in tool_calls(messages) if c["name"] != "Finish"]
    errors = sum(is_error(c["result"]) for c in calls)
    error_share = errors / len(calls) if calls else 1.0
    severity = round(0.4 + 0.6 * error_share, 4)
    if meta.get("finish_type") == "give_up":
        kind = "tool_error" if error_share >= 0.5 else "incomplete"
        return kind, severity, f"gave up; {errors}/{len(calls)} tool calls failed or returned nothing"
    if GIVE_UP.search(final or ""):
        return "incomplete", severity, "final answer admits the task was not done"
    return "wrong_result", 0.5, "answered, but the answer did not win"


def classify_generic(messages: list[dict], success: bool | None, final: str) -> tuple[str, float, str]:
    if success:
        return schema.NOT_A_FAILURE, 0.0, "log marks success"
    calls = [c for c in tool_calls(messages) if c["name"] != "Finish"]  # the final answer is no tool use
    errors = sum(is_error(c["result"]) for c in calls)
    cue_give_up = bool(GIVE_UP.search(final or ""))
    if success is None and not (cue_give_up or (calls and errors == len(calls))):
        return schema.NOT_A_FAILURE, 0.0, "log has no success field and no failure cue"
    if calls and errors / len(calls) >= 0.5:
        return "tool_error", 0.4 + 0.6 * errors / len(calls), f"{errors}/{len(calls)} tool calls failed"
    writes_ok = any(is_write(c["name"]) and not is_error(c["result"]) for c in calls)
    if _claims_done(messages) and not writes_ok:
        return "hallucination", 0.8, "claims completion without a successful action"
    if cue_give_up:
        return "incomplete", 0.6, "final answer admits the task was not done"
    return "wrong_result", 0.5, schema.ONLY_A_FLAG


def _claims_done(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" and CLAIM_DONE.search(m.get("content") or "") for m in messages)


def _recoverable(messages: list[dict]) -> bool:
    """Something verifiable happened: at least one tool call returned a usable result."""
    return any(not is_error(c["result"]) and c["name"] != "Finish"
               for c in tool_calls(messages))


def rule_classify(row: dict) -> tuple[str, float, str]:
    meta = json.loads(row["metadata"] or "{}")
    benchmark = meta.get("benchmark")
    if benchmark == "tau-bench":
        return classify_tau_bench(row["messages"], meta, row["success"])
    if benchmark == "toolbench":
        return classify_toolbench(row["messages"], meta, row["success"], row["final_answer"] or "")
    return classify_generic(row["messages"], row["success"], row["final_answer"] or "")


def classify(trajectories: pl.DataFrame, params: Params, llm: LLMClient | None = None) -> pl.DataFrame:
    """Add the CLASSIFIED columns to every trajectory (successes stay, as not_a_failure)."""
    mode = params.classify.mode
    max_severity = params.classify.max_severity

    def one(row: dict) -> dict:
        kind, severity, reason = rule_classify(row)
        recoverable = _recoverable(row["messages"])
        row_mode = "rule"
        if mode == "llm" and kind != schema.NOT_A_FAILURE and row["success"] is not True:
            said = _llm_classify(row, reason, params, llm)
            if said is None:  # the budget was spent first: left undone; the rules' type and severity stand
                reason = f"{BUDGET_EXHAUSTED}: not classified by the LLM (rules: {reason})"
                recoverable, row_mode = False, "llm-budget"
            else:
                kind, severity, recoverable, reason, row_mode = said
        severity = round(min(1.0, max(0.0, float(severity))), 4)
        is_failure = kind != schema.NOT_A_FAILURE
        recoverable = bool(is_failure and recoverable and severity <= max_severity)
        return {
            "is_failure": is_failure,
            "failure_type": kind,
            "severity": severity,
            "recoverable": recoverable,
            "classify_reason": reason,
            "classify_mode": row_mode,
        }

    # Only the columns the rules read become dicts, and the verdicts are added as columns: turning
    # every row (messages and all) into dicts and back was half of the stage.
    rows = trajectories.select("messages", "metadata", "success", "final_answer").to_dicts()
    verdicts = map_concurrent(one, rows, params.llm.concurrency if mode == "llm" else 1)
    return trajectories.select(list(schema.TRAJECTORY)).cast(schema.TRAJECTORY).hstack(schema.frame(verdicts, ADDED))


ADDED = {k: v for k, v in schema.CLASSIFIED.items() if k not in schema.TRAJECTORY}  # the columns classify adds


def step(batch: pl.DataFrame, params: Params, llms: LLMs | None) -> schema.StageOutput:
    """The stage (agenther/stages/__init__.py): every row kept, with its verdict; nothing rejected."""
    return schema.StageOutput(classify(batch, params, llms.main() if llms is not None else None), None)


def _llm_classify(row: dict, signals: str, params: Params, llm: LLMClient | None) -> tuple | None:
    """(failure_type, severity, recoverable, reason, mode) from the LLM; None if the budget is spent."""
    if llm is None:
        raise ValueError("classify.mode is 'llm' but no LLM is configured")
    asked = ask(
        llm, "classify", ClassifyAnswer, stage="classify", temperatures=[0.0], attempts=2,
        signals=signals, transcript=render(row["messages"], budget_tokens=prompt_budget(params)),
    )
    if asked.budget_exhausted:
        return None
    if asked.answer is None:
        # Not recoverable: extract rejects the record as invalid_llm_answer, it does not vanish.
        return "incomplete", 1.0, False, f"llm classification failed: {asked.error}", "llm-invalid"
    d = asked.answer
    return d.failure_type, d.severity, d.recoverable, d.reason, "llm"
