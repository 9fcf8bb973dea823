"""Generic chat logs: a JSON array / JSONL of records holding a list of turns.

Where each field lives is configured by `MessagesMapping` (params.yaml `ingest.messages`).
Two turn styles are understood: OpenAI ({role, content, tool_calls, tool_call_id, name}) and
ShareGPT ({from, value}, with `function_call` turns holding JSON {name, arguments} and
`observation` turns holding tool results). Actions written as text by ReAct-style agents
("Action: search[...]" + "Observation: ...") become tool calls too (see text_actions.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agenther.adapters.common import (
    Quarantined,
    RecordError,
    canonical_messages,
    convert_records,
    first_user_text,
    get_path,
    last_assistant_text,
    to_json,
    type_name,
)
from agenther.adapters.text_actions import parse_text_actions

FORMAT = "messages"


def _default_roles() -> dict[str, str]:
    return {
        "human": "user",
        "gpt": "assistant",
        "function_call": "assistant",
        "observation": "tool",
        "function": "tool",
    }


@dataclass
class MessagesMapping:
    messages_path: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    id_path: str | None = None
    goal_path: str | None = None
    success_path: str | None = None
    reward_path: str | None = None
    task_path: str | None = None
    tools_path: str | None = None
    success_threshold: float = 1.0
    roles: dict[str, str] = field(default_factory=_default_roles)

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> MessagesMapping:
        """Build from params.yaml `ingest.messages`; missing keys keep their defaults."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"ingest.messages: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        if params.get("roles") is None:
            params.pop("roles", None)
        elif not isinstance(params["roles"], dict):
            raise ValueError("ingest.messages.roles must map log role names to system/user/assistant/tool")
        return cls(**params)


def looks_like(record: Any, mapping: MessagesMapping) -> bool:
    if not isinstance(record, dict):
        return False
    return any(_has(record, p) for p in (mapping.messages_path, "messages", "conversations"))


def _has(record: Any, dotted: str) -> bool:
    try:
        get_path(record, dotted)
    except KeyError:
        return False
    return True


def _optional(record: Any, dotted: str | None) -> Any:
    if dotted is None:
        return None
    try:
        return get_path(record, dotted)
    except KeyError:
        return None  # the log does not say


def read(path: Path, mapping: MessagesMapping | None = None) -> Iterator[dict | Quarantined]:
    mapping = mapping or MessagesMapping()
    return convert_records(path, lambda record, p, pointer: convert(record, p, pointer, mapping), label_pointer=True)


def _turns(record: dict, mapping: MessagesMapping) -> tuple[Any, str, str, str]:
    """(turns, where, role_key, content_key). Falls back to the two common layouts when the
    configured path is absent, so a ShareGPT file works without configuration."""
    if _has(record, mapping.messages_path):
        path = mapping.messages_path
        return get_path(record, path), path, mapping.role_key, mapping.content_key
    if "conversations" in record:
        return record["conversations"], "conversations", "from", "value"
    if "messages" in record:
        return record["messages"], "messages", "role", "content"
    raise RecordError(f"no list of turns at {mapping.messages_path!r} (nor 'messages'/'conversations')")


def convert(record: Any, path: Path, pointer: str, mapping: MessagesMapping) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"record is not an object (got {type_name(record)})")
    turns, where, role_key, content_key = _turns(record, mapping)
    messages = parse_text_actions(
        canonical_messages(turns, where, mapping.roles, role_key, content_key, call_roles=("function_call",))
    )

    goal = _optional(record, mapping.goal_path)
    if goal is None:
        goal = first_user_text(messages)
    if not isinstance(goal, str) or not goal:
        raise RecordError("no goal: no user turn with text and goal_path not set or absent")

    reward = _optional(record, mapping.reward_path)
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)):
        raise RecordError(f"{mapping.reward_path}: expected a number, got {type_name(reward)}")
    success = _optional(record, mapping.success_path)
    if success is not None and not isinstance(success, bool):
        raise RecordError(f"{mapping.success_path}: expected true/false, got {type_name(success)}")
    if success is None and reward is not None:
        success = float(reward) >= mapping.success_threshold

    stem = path.stem
    record_id = _optional(record, mapping.id_path)
    # The id keeps the "<format>/<file stem>/<pointer>" shape; "line 7" loses its space.
    local = str(record_id) if record_id is not None else pointer.replace(" ", "") or "0"
    task = _optional(record, mapping.task_path)
    task_key = str(task) if task is not None else hashlib.sha1(goal.encode()).hexdigest()[:12]

    return {
        "id": f"{FORMAT}/{stem}/{local}",
        "source_format": FORMAT,
        "source_file": str(path),
        "record_pointer": pointer,
        "task_key": f"{FORMAT}/{task_key}",
        "goal": goal,
        "messages": messages,
        "tools": _tools(record, mapping.tools_path),
        "final_answer": _final_answer(messages),
        "success": success,
        "reward": None if reward is None else float(reward),
        "metadata": to_json({"benchmark": None, "style": "openai" if role_key == "role" else "sharegpt"}),
    }


def _final_answer(messages: list[dict]) -> str | None:
    """The answer of the last text action Finish[answer] (parse_text_actions writes {"input": ...}),
    else the last assistant text."""
    for m in reversed(messages):
        if m["role"] != "assistant":
            continue
        finish = next((c for c in reversed(m["tool_calls"]) if c["name"] == "Finish"), None)
        if finish is not None:
            try:
                answer = json.loads(finish["arguments"]).get("input")
            except (ValueError, RecursionError, AttributeError):
                answer = None
            if isinstance(answer, str) and answer.strip():
                return answer
        if m["content"]:
            break
    return last_assistant_text(messages)


def _tools(record: dict, tools_path: str | None) -> str | None:
    """Tool schemas at tools_path (strict), else an OpenAI-style top-level "tools" list if present."""
    if tools_path is None:
        value = record.get("tools")
        return to_json(value) if isinstance(value, list) else None
    value = _optional(record, tools_path)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{tools_path}: not JSON ({exc.msg})") from exc
    if not isinstance(value, list):
        raise RecordError(f"{tools_path}: expected a list of tool schemas, got {type_name(value)}")
    return to_json(value)
