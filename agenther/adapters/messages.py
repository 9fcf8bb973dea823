"""Generic chat logs: a JSON array / JSONL of records holding a list of turns.

Where each field lives is configured by `MessagesMapping` (params.yaml `ingest.messages`).
Two turn styles are understood: OpenAI ({role, content, tool_calls, tool_call_id, name}) and
ShareGPT ({from, value}, with `function_call` turns holding JSON {name, arguments} and
`observation` turns holding tool results). Actions written as text (ReAct "Action: search[...]" +
"Observation: ...", HTTP-style "GET url" lines, a user's regex) become tool calls too, read by
the log's grammar (agenther/adapters/grammars.py, chosen by ingest).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from agenther.adapters.adapter import Adapter, ReadContext
from agenther.adapters.common import (
    LogFile,
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
    given: frozenset[str] = frozenset()  # the keys the user mapped (they always win over detection)
    detected: dict[str, str] = field(default_factory=dict)  # field -> path found by `detect`
    # path -> records in which it resolved, and records read: a path that resolves nowhere is a mistake
    resolved: Counter = field(default_factory=Counter, compare=False, repr=False)

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> MessagesMapping:
        """Build from params.yaml `ingest.messages`; missing keys keep their defaults."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)} - {"given", "detected", "resolved"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"ingest.messages: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        if params.get("roles") is None:
            params.pop("roles", None)
        elif not isinstance(params["roles"], dict):
            raise ValueError("ingest.messages.roles must map log role names to system/user/assistant/tool")
        return cls(**params, given=frozenset(params))

    def checked_paths(self) -> dict[str, str]:
        """field -> path, for the paths the user gave or detection found (and where the turns are)."""
        return {f: getattr(self, f) for f in ("messages_path", *PATH_FIELDS)
                if getattr(self, f) and (f in self.given or f in self.detected)}


# Where chat logs usually keep each field, in order of preference (a field the user maps is never guessed).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "messages_path": ("messages", "conversations", "trajectory", "history", "turns", "dialog", "chat"),
    "id_path": ("id", "run_id", "trajectory_id", "uid", "_id"),
    "goal_path": ("goal", "instruction", "question", "task", "query", "prompt"),
    "success_path": ("success", "solved", "is_success", "resolved", "passed", "label", "correct"),
    "reward_path": ("reward", "score"),
    "tools_path": ("tools", "functions", "tool_schemas", "available_tools"),
}
PATH_FIELDS = ("id_path", "goal_path", "success_path", "reward_path", "task_path", "tools_path")


def _fits(field_name: str, value: Any) -> bool:
    if field_name == "messages_path":
        return isinstance(value, list) and bool(value) and all(isinstance(t, dict) for t in value)
    if field_name == "id_path":
        return isinstance(value, str | int) and not isinstance(value, bool)
    if field_name == "goal_path":
        return isinstance(value, str) and bool(value.strip())
    if field_name == "success_path":
        return isinstance(value, bool)
    if field_name == "tools_path":
        return _tool_schemas(value)
    return isinstance(value, int | float) and not isinstance(value, bool)  # reward


def _tool_schemas(value: Any) -> bool:
    """A list of OpenAI tool schemas ({"type": "function", "function": {"name": ...}} or bare
    {"name": ...}), or JSON text of one (a column written by a dataframe)."""
    if isinstance(value, str) and value.lstrip()[:1] == "[":
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return False
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, dict) and isinstance(t.get("function", t), dict)
        and isinstance(t.get("function", t).get("name"), str) for t in value)


def detect(records: list[Any], mapping: MessagesMapping) -> MessagesMapping:
    """`mapping` with the fields the user did not map taken from the usual places: a key whose values
    fit the field in at least half of `records` (a sample from the start of the logs)."""
    objects = [r for r in records if isinstance(r, dict)]
    found: dict[str, str] = {}
    for field_name, names in CANDIDATES.items():
        if field_name in mapping.given:
            continue
        for name in names:
            if sum(_fits(field_name, r.get(name)) for r in objects) * 2 >= len(objects) > 0:
                found[field_name] = name
                break
    changes: dict[str, Any] = {k: v for k, v in found.items() if not (k == "messages_path" and v == mapping.messages_path)}
    turns = [t for r in objects for t in (r.get(found.get("messages_path", mapping.messages_path)) or [])[:3]
             if isinstance(t, dict)]
    if turns and not {"role_key", "content_key"} & mapping.given and all("from" in t and "value" in t for t in turns):
        changes |= {"role_key": "from", "content_key": "value"}  # ShareGPT turns
    return replace(mapping, **changes, detected={k: v for k, v in changes.items() if k in CANDIDATES})


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


def _optional(record: Any, dotted: str | None, resolved: Counter | None = None) -> Any:
    if dotted is None:
        return None
    try:
        value = get_path(record, dotted)
    except KeyError:
        return None  # the log does not say
    if resolved is not None:
        resolved[f"path {dotted}"] += 1
    return value


def read(path: LogFile, ctx: ReadContext | None = None) -> Iterator[dict | Quarantined]:
    """Trajectory rows of a chat-log file, with `ctx`'s mapping; its grammar (if any) makes the text
    actions of assistant turns into tool calls (agenther/adapters/grammars.py)."""
    ctx = ctx or ReadContext(MessagesMapping())
    parse = ctx.grammar.parse if ctx.grammar is not None else None
    return convert_records(path, lambda record, p, pointer: convert(record, p, pointer, ctx.mapping, parse),
                           label_pointer=True, repairs=ctx.repairs)


def turns_of(record: Any, mapping: MessagesMapping) -> list[dict] | None:
    """A record's turns as canonical messages (before any grammar), or None if it has none that
    read: what grammar detection looks at."""
    if not isinstance(record, dict):
        return None
    try:
        turns, where, role_key, content_key = _turns(record, mapping)
        return canonical_messages(turns, where, mapping.roles, role_key, content_key, call_roles=("function_call",))
    except RecordError:
        return None


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


def convert(record: Any, path: LogFile, pointer: str, mapping: MessagesMapping,
            parse: Callable[[list[dict]], list[dict]] | None = None) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"record is not an object (got {type_name(record)})")
    seen = mapping.resolved
    seen["records"] += 1
    seen.update(f"key {k}" for k in list(record)[:50])  # the keys records have, for a mistake's message
    turns, where, role_key, content_key = _turns(record, mapping)
    seen[f"path {where}"] += 1
    tally: Counter = Counter()  # the other paths, counted over the records that become trajectories
    messages = canonical_messages(turns, where, mapping.roles, role_key, content_key, call_roles=("function_call",))
    if parse is not None:
        messages = parse(messages)

    goal = _optional(record, mapping.goal_path, tally)
    if goal is None:
        goal = first_user_text(messages)
    if not isinstance(goal, str) or not goal:
        raise RecordError("no goal: no user turn with text and goal_path not set or absent")

    reward = _optional(record, mapping.reward_path, tally)
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)):
        raise RecordError(f"{mapping.reward_path}: expected a number, got {type_name(reward)}")
    success = _optional(record, mapping.success_path, tally)
    if success is not None and not isinstance(success, bool):
        raise RecordError(f"{mapping.success_path}: expected true/false, got {type_name(success)}")
    if success is None and reward is not None:
        success = float(reward) >= mapping.success_threshold

    stem = path.stem
    record_id = _optional(record, mapping.id_path, tally)
    # The id keeps the "<format>/<file stem>/<pointer>" shape; "line 7" loses its space.
    local = str(record_id) if record_id is not None else pointer.replace(" ", "") or "0"
    task = _optional(record, mapping.task_path, tally)
    task_key = str(task) if task is not None else hashlib.sha1(goal.encode()).hexdigest()[:12]

    row = {
        "id": f"{FORMAT}/{stem}/{local}",
        "source_format": FORMAT,
        "source_file": str(path),
        "record_pointer": pointer,
        "task_key": f"{FORMAT}/{task_key}",
        "goal": goal,
        "messages": messages,
        "tools": _tools(record, mapping.tools_path, tally),
        "final_answer": _final_answer(messages),
        "success": success,
        "reward": None if reward is None else float(reward),
        "metadata": to_json({"benchmark": None, "style": "openai" if role_key == "role" else "sharegpt"}),
    }
    seen["converted"] += 1
    seen.update(tally)
    return row


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


def _tools(record: dict, tools_path: str | None, tally: Counter | None = None) -> str | None:
    """Tool schemas at tools_path (strict), else an OpenAI-style top-level "tools" list if present."""
    if tools_path is None:
        value = record.get("tools")
        return to_json(value) if isinstance(value, list) else None
    value = _optional(record, tools_path, tally)
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


ADAPTER = Adapter(
    name=FORMAT, looks_like=lambda record, ctx: looks_like(record, ctx.mapping), read=read,
    expects="chat turns at ingest.messages.messages_path, 'messages' or 'conversations'",
    generic=True, catch_all=".jsonl",  # JSONL is chat logs unless a line says otherwise
)
