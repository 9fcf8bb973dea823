"""Stage 2: what a failed run actually achieved, each achievement pointing at its evidence.

Evidence is what the trajectory shows (tool calls and their results, the answer given),
never the original goal. Rule mode lists the tool calls that succeeded; LLM mode asks
the model and keeps only achievements whose cited steps exist and carry evidence.
"""

from __future__ import annotations

import json

import polars as pl

from agenther import schema
from agenther.ask import ask
from agenther.classify import GIVE_UP, has_payload, is_error, is_write
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, map_concurrent
from agenther.render import prompt_budget, render, tool_calls

STAGE = "extract"
ARG_CHARS = 160

LLM_SCHEMA = {
    "type": "object",
    "properties": {
        "achievements": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "steps": {"type": "array", "items": {"type": "integer"}},
                    "kind": {"type": "string", "enum": ["action", "information", "answer"]},
                },
                "required": ["text", "steps", "kind"],
            },
        }
    },
    "required": ["achievements"],
}


def rule_achievements(messages: list[dict]) -> list[dict]:
    achievements = []
    for call in tool_calls(messages):
        if call["name"] == "Finish" or is_error(call["result"]) or not has_payload(call["result"]):
            continue
        args = json.dumps(call["arguments"], sort_keys=True, ensure_ascii=False)
        if len(args) > ARG_CHARS:
            args = args[:ARG_CHARS] + "…"
        steps = [call["step"], call["result_step"]]
        if is_write(call["name"]):
            achievements.append({"text": f"{call['name']} succeeded with {args}", "steps": steps, "kind": "action"})
        else:
            achievements.append({"text": f"{call['name']} returned data for {args}", "steps": steps,
                                 "kind": "information"})
    last = _last_answer(messages)
    if last is not None and not GIVE_UP.search(messages[last]["content"]):
        text = messages[last]["content"].strip().replace("\n", " ")
        achievements.append({"text": f"told the user: {text[:200]}", "steps": [last], "kind": "answer"})
    return achievements


def _last_answer(messages: list[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "assistant" and (m.get("content") or "").strip() and not m.get("tool_calls"):
            return i
    return None


def valid_steps(steps: list, messages: list[dict]) -> list[int]:
    """Cited steps that exist and can carry evidence (tool calls, tool results, assistant answers)."""
    ok = {s for s in steps if isinstance(s, int) and not isinstance(s, bool) and 0 <= s < len(messages)}
    return sorted(s for s in ok if messages[s]["role"] in ("assistant", "tool"))


def extract(classified: pl.DataFrame, params: dict, llm: LLMClient | None = None) -> schema.StageOutput:
    """Candidates are the failures; a failure without an evidenced achievement is rejected."""
    mode = params["extract"]["mode"]
    failures = classified.filter(pl.col("is_failure")).to_dicts()

    def one(row: dict) -> tuple[dict | None, dict | None]:
        if row["classify_mode"] == "llm-budget":  # classify never got an answer for it
            return None, schema.rejection(row["id"], STAGE, BUDGET_EXHAUSTED, row["classify_reason"])
        if not row["recoverable"]:
            return None, schema.rejection(row["id"], STAGE, "not_recoverable",
                                          f"{row['failure_type']} (severity {row['severity']}): {row['classify_reason']}")
        if mode == "llm":
            if llm is None:
                raise ValueError("extract.mode is 'llm' but no LLM is configured")
            asked = ask(llm, "extract", LLM_SCHEMA, stage=STAGE, temperatures=[0.0, 0.3], attempts=2,
                        transcript=render(row["messages"], budget_tokens=prompt_budget(params)))
            if asked.data is None:
                reason = BUDGET_EXHAUSTED if asked.budget_exhausted else "invalid_llm_answer"
                return None, schema.rejection(row["id"], STAGE, reason, asked.error or "")
            found = []
            for a in asked.data["achievements"]:
                steps = valid_steps(a.get("steps") or [], row["messages"])
                if steps and isinstance(a.get("text"), str) and a["text"].strip():
                    found.append({"text": a["text"].strip(), "steps": steps, "kind": a.get("kind") or "action"})
        else:
            found = rule_achievements(row["messages"])
        if not found:
            return None, schema.rejection(row["id"], STAGE, "no_evidenced_achievement",
                                          "no achievement with evidence in the trajectory")
        return row | {"achievements": found, "extract_mode": mode}, None

    results = map_concurrent(one, failures, int(params["llm"]["concurrency"]) if mode == "llm" else 1)
    kept = [k for k, _ in results if k is not None]
    rejected = [r for _, r in results if r is not None]
    return schema.StageOutput(schema.frame(kept, schema.EXTRACTED), schema.frame(rejected, schema.REJECTION))
