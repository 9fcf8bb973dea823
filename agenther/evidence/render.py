"""Trajectories as text for prompts: numbered steps, compacted to fit a context budget.

Compaction never drops the steps that carry evidence (the steps achievements point
at, and every user turn in a multi-turn log); it trims long tool results first, then
elides the other steps from the middle.
"""

from __future__ import annotations

import json

from agenther.params import Params

CHARS_PER_TOKEN = 3.5  # a rough, conservative estimate for English + JSON text
SYSTEM_CHARS = 300  # long system prompts (tau-bench's policy) are cut: they are not evidence
RESULT_CHARS = 700


def defuse(text: str) -> str:
    """Log text must not close the <<< ... >>> data block the prompt templates put it in."""
    return text.replace("<<<", "‹‹‹").replace(">>>", "›››")


def render_step(index: int, message: dict, limit: int | None = None) -> str:
    role = message["role"]
    content = defuse((message.get("content") or "").strip())
    parts = []
    if role == "tool":
        head = f"[{index}] TOOL RESULT {message.get('name') or ''}".rstrip() + ":"
        parts.append(f"{head} {_cut(content, limit)}")
    else:
        if content:
            cut = SYSTEM_CHARS if role == "system" else limit
            parts.append(f"[{index}] {role.upper()}: {_cut(content, cut)}")
        for call in message.get("tool_calls") or []:
            parts.append(f"[{index}] ASSISTANT CALLS {call['name']}({defuse(_compact_json(call.get('arguments')))})")
    return "\n".join(parts)


def render(
    messages: list[dict],
    keep: set[int] | None = None,
    budget_tokens: int = 2500,
    roles: tuple[str, ...] = ("system", "user", "assistant", "tool"),
) -> str:
    """Numbered transcript of `messages` within about `budget_tokens`.

    `keep`: step indexes that must survive compaction. User turns always survive.
    `roles`: which turns to show at all (a judge may see only tool calls and results).
    """
    keep = set(keep or ()) | {i for i, m in enumerate(messages) if m["role"] == "user"}
    visible = [i for i, m in enumerate(messages) if m["role"] in roles or _is_call(m, roles)]
    budget_chars = int(budget_tokens * CHARS_PER_TOKEN)
    for limit in (RESULT_CHARS, 300, 120):
        lines = {i: _visible_step(i, messages[i], roles, limit) for i in visible}
        if sum(len(v) + 1 for v in lines.values()) <= budget_chars:
            return "\n".join(v for v in lines.values() if v)
    # Still too long: drop unkept steps from the middle outwards until it fits.
    order = sorted((i for i in visible if i not in keep), key=lambda i: abs(i - len(messages) / 2))
    dropped: set[int] = set()
    total = sum(len(v) + 1 for v in lines.values())
    for i in order:
        if total <= budget_chars:
            break
        dropped.add(i)
        total -= len(lines[i]) + 1
    out, gap = [], 0
    for i in visible:
        if i in dropped:
            gap += 1
            continue
        if gap:
            out.append(f"[... {gap} step(s) omitted ...]")
            gap = 0
        if lines[i]:
            out.append(lines[i])
    if gap:
        out.append(f"[... {gap} step(s) omitted ...]")
    return "\n".join(out)


def _is_call(message: dict, roles: tuple[str, ...]) -> bool:
    # In an evidence-only view (tools but no assistant), assistant turns still show their calls.
    return message["role"] == "assistant" and bool(message.get("tool_calls")) and "tool" in roles


def _visible_step(index: int, message: dict, roles: tuple[str, ...], limit: int) -> str:
    if message["role"] == "assistant" and "assistant" not in roles:
        # Evidence-only view: the calls, without the assistant's own words.
        message = {**message, "content": None}
    return render_step(index, message, limit)


def _cut(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return text[:limit] + f" …[{len(text) - limit} chars cut]"


def _compact_json(arguments: str | None) -> str:
    if not arguments:
        return ""
    try:
        return json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)
    except (json.JSONDecodeError, TypeError):
        return arguments


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1


def tool_calls(messages: list[dict]) -> list[dict]:
    """Every assistant tool call with its step, its result step and result text (if any)."""
    results = {m.get("tool_call_id"): (i, m) for i, m in enumerate(messages) if m["role"] == "tool"}
    calls = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        for call in m.get("tool_calls") or []:
            step, result = results.get(call.get("id"), (None, None))
            try:
                args = json.loads(call.get("arguments") or "{}")
            except json.JSONDecodeError:
                args = {"_raw": call.get("arguments")}
            if not isinstance(args, dict):  # a JSON list or scalar: the one input
                args = {"input": args}
            calls.append(
                {
                    "step": i,
                    "name": call["name"],
                    "arguments": args,
                    "result_step": step,
                    "result": (result.get("content") or "") if result else None,
                }
            )
    return calls


def prompt_budget(params: Params) -> int:
    """Tokens left for the transcript once the template and the answer have their room."""
    return max(512, params.llm.context_tokens - params.llm.max_tokens - 600)
