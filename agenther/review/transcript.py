"""A hindsight sample turn by turn, exactly as the trainer sees it: role, weight, text or tool call,
and for a rewritten user turn what the user originally said. The review page, `agenther review
sample` and bench/quality.py's review sheet all show samples this way."""

from __future__ import annotations

import json

from agenther.evidence.goal import AchievedGoal, rewrites_of, sample_steps
from agenther.stages.samples import hindsight_messages

SYSTEM_CHARS = 120  # the agent's instructions: the same in every sample, shown as a stub
TOOL_CHARS = 400


def sample_turns(row: dict) -> list[dict]:
    """[{step, role, weight, text, calls, before}] of an accepted relabel's sample, in order. `weight`
    is 1 or 0 on assistant turns (None on others); `before` is the original text of a rewritten turn."""
    goal = AchievedGoal.model_validate_json(row["achieved_goal"])
    rewritten = rewrites_of(row)
    turns = []
    for step, m in zip(sample_steps(row["messages"], goal), hindsight_messages(row), strict=False):
        turns.append({
            "step": step,
            "role": m["role"],
            "weight": m.get("weight") if m["role"] == "assistant" else None,
            "text": m.get("content") or "",
            "calls": [f"{c['name']}({_arguments(c.get('arguments'))})" for c in m.get("tool_calls") or []],
            "before": row["messages"][step].get("content") if step in rewritten else None,
        })
    return turns


def _arguments(arguments: object) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(turns: list[dict]) -> list[str]:
    """The turns as markdown lines: `[step] ROLE (weight)`, then the text or the calls."""
    lines = []
    for t in turns:
        head = f"[{t['step']}] {t['role'].upper()}"
        if t["weight"] is not None:
            head += f" (weight {t['weight']})"
        if t["before"] is not None:
            head += " (rewritten)"
        limit = SYSTEM_CHARS if t["role"] == "system" else TOOL_CHARS if t["role"] == "tool" else 2000
        body = [_cut(t["text"], limit)] if t["text"] else []
        body += [f"CALLS {c}" for c in t["calls"]]
        lines.append(f"- **{head}**: " + " / ".join(body))
        if t["before"] is not None:
            lines.append(f"  - was: {_cut(t['before'], 2000)}")
    return lines
