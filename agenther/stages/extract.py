"""Stage 2: what a failed run actually achieved, computed from what it did (agenther.evidence.goal).

The achieved goal is the run's successful writes (not errors, not writes the agent was not
allowed to make) and the facts it reported, each pointing at its steps, with the sample that
proves it. Rule mode lists the goal's actions and facts as achievements; LLM mode lets the model
describe them (an answer that breaks its contract, agenther/llm/answers.py, is `invalid_llm_answer`;
achievements whose cited steps do not exist or carry no evidence are dropped), and
for a run with no structured evidence its described achievements become the goal's facts. A
failure with no goal, or whose turns contradict its goal, is rejected with the reason.
"""

from __future__ import annotations

import polars as pl

from agenther import schema
from agenther.evidence.conversation import goal_from_facts, hindsight_goal
from agenther.evidence.goal import Fact, NoGoal, goal_achievements
from agenther.evidence.render import prompt_budget, render, tool_calls
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, LLMs, map_concurrent
from agenther.llm.answers import INVALID_LLM_ANSWER, ExtractAnswer
from agenther.llm.ask import ask
from agenther.params import Params

STAGE = "extract"

def valid_steps(steps: list[int], messages: list[dict]) -> list[int]:
    """Cited steps that exist and can carry evidence (tool calls, tool results, assistant answers)."""
    ok = {s for s in steps if 0 <= s < len(messages)}
    return sorted(s for s in ok if messages[s]["role"] in ("assistant", "tool"))


def extract(classified: pl.DataFrame, params: Params, llm: LLMClient | None = None) -> schema.StageOutput:
    """Candidates are the failures; a failure without an evidenced achievement is rejected."""
    mode = params.extract.mode
    failed = classified.filter(pl.col("is_failure"))
    failures = failed.to_dicts()

    def one(row: dict) -> tuple[dict | None, dict | None]:
        if row["classify_mode"] == "llm-budget":  # classify never got an answer for it
            return None, schema.rejection(row["id"], STAGE, BUDGET_EXHAUSTED, row["classify_reason"])
        if row["classify_mode"] == "llm-invalid":  # classify's answers broke their contract
            return None, schema.rejection(row["id"], STAGE, INVALID_LLM_ANSWER, row["classify_reason"])
        if not row["recoverable"]:
            return None, schema.rejection(row["id"], STAGE, "not_recoverable", _why_not_recoverable(row, params))
        goal = hindsight_goal(row, params)
        found = goal_achievements(goal) if not isinstance(goal, NoGoal) else []
        if mode == "llm":
            if llm is None:
                raise ValueError("extract.mode is 'llm' but no LLM is configured")
            asked = ask(llm, "extract", ExtractAnswer, stage=STAGE, temperatures=[0.0, 0.3], attempts=2,
                        transcript=render(row["messages"], budget_tokens=prompt_budget(params)))
            if asked.answer is None:
                reason = BUDGET_EXHAUSTED if asked.budget_exhausted else INVALID_LLM_ANSWER
                return None, schema.rejection(row["id"], STAGE, reason, asked.error or "")
            found = []
            for a in asked.answer.achievements:
                steps = valid_steps(a.steps, row["messages"])
                if steps and a.text.strip():
                    found.append({"text": a.text.strip(), "steps": steps, "kind": a.kind})
            if isinstance(goal, NoGoal) and goal.reason == "no_evidenced_achievement":
                # No structured evidence: what the model saw becomes facts (never actions: a write
                # is an achievement only when the run's own calls show it).
                goal = goal_from_facts(row, params, [Fact(text=a["text"], values=[], steps=a["steps"])
                                                     for a in found if a["kind"] != "action"])
        if isinstance(goal, NoGoal):
            return None, schema.rejection(row["id"], STAGE, goal.reason, goal.detail)
        if not found:
            return None, schema.rejection(row["id"], STAGE, "no_evidenced_achievement",
                                          "no achievement with evidence in the trajectory")
        return {"achievements": found, "extract_mode": mode, "achieved_goal": goal.model_dump_json()}, None

    results = map_concurrent(one, failures, params.llm.concurrency if mode == "llm" else 1)
    # The kept rows are the input's rows plus the added columns: not rebuilt from dicts (messages and
    # all), which took as long as the rules.
    added = [k for k, _ in results if k is not None]
    kept = (failed.select(list(schema.CLASSIFIED)).cast(schema.CLASSIFIED)
            .filter(pl.Series([k is not None for k, _ in results], dtype=pl.Boolean)).hstack(schema.frame(added, ADDED)))
    rejected = [r for _, r in results if r is not None]
    return schema.StageOutput(kept, schema.frame(rejected, schema.REJECTION))


ADDED = {k: v for k, v in schema.EXTRACTED.items() if k not in schema.CLASSIFIED}  # the columns extract adds


def step(batch: pl.DataFrame, params: Params, llms: LLMs | None) -> schema.StageOutput:
    """The stage (agenther/stages/__init__.py)."""
    return extract(batch, params, llms.main() if llms is not None else None)


def _why_not_recoverable(row: dict, params: Params) -> str:
    """The rejection's detail: what is missing, and what would help."""
    said = f"{row['failure_type']} (severity {row['severity']}): {row['classify_reason']}"
    if row["severity"] > params.classify.max_severity:
        return f"severity above classify.max_severity = {params.classify.max_severity} ({said})"
    if not tool_calls(row["messages"]):
        return (f"no tool calls or parsable actions in this run ({said}): relabeling needs actions it can see; "
                "actions written as text need their grammar (ingest.text_actions, ingest.grammars), else "
                "extract.mode: llm (and classify.mode: llm), see README")
    return f"no tool call returned a usable result ({said})"
