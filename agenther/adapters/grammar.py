"""What a text-action grammar is (agenther/adapters/grammars.py holds the registry of them).

A `Grammar` turns canonical messages into canonical messages where each assistant turn that holds
an action carries it as a tool call (name, JSON arguments) and the turn that answered it (the
environment's observation) is a `tool` message pointing at that call. Text that does not parse is
left exactly as it was; turns that already hold structured tool calls are never touched. The
final report (`Finish[answer]`, `FINISH([...])`) is a call named "Finish" whose `input` is the
answer: the rest of the pipeline reads it as the agent's report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agenther.adapters.common import message, tool_call

FINISH = "Finish"  # the name every grammar gives the final report


@dataclass(frozen=True)
class Grammar:
    name: str
    parse: Callable[[list[dict]], list[dict]]  # canonical messages -> the same with text actions as calls
    about: str  # one line: what it reads


# -- what line-oriented grammars (http, a user's regex) share ---------------------------------------
TurnParse = Callable[[str, int], tuple[str | None, dict] | None]  # (text, step) -> (content left, call)
Observe = Callable[[str], str | None]  # a user turn's text -> the result it reports, or None


def one_call_per_turn(messages: list[dict], parse_turn: TurnParse, observe: Observe) -> list[dict]:
    """Messages with each assistant text turn that `parse_turn` reads as an action made into that
    call, and the user turn right after it made into its result when `observe` reads one there
    (the final report waits for no result). Everything else is kept as it was."""
    out: list[dict] = []
    waiting: dict | None = None
    for step, msg in enumerate(messages):
        if waiting is not None and msg["role"] == "user" and not msg.get("tool_calls"):
            result = observe(msg.get("content") or "")
            if result is not None:
                out.append(message("tool", result, tool_call_id=waiting["id"], name=waiting["name"]))
                waiting = None
                continue
        waiting = None
        content = msg.get("content")
        parsed = None
        if msg["role"] == "assistant" and not msg.get("tool_calls") and isinstance(content, str):
            parsed = parse_turn(content, step)
        if parsed is None:
            out.append(msg)
            continue
        left, call = parsed
        out.append(message("assistant", left, [call]))
        waiting = call if call["name"] != FINISH else None
    return out


def call(step: int, name: str, arguments: Any) -> dict[str, str]:
    """A parsed call, with the id every grammar gives it: the turn's step."""
    return tool_call(f"text-call-{step}-0", name, arguments)
