"""Helpers shared by the adapters: reading records, quarantine, canonical messages.

An adapter turns one file into trajectory dicts (schema.TRAJECTORY columns). A record it
cannot trust is never dropped silently and never crashes the run: it becomes a
`Quarantined` row naming the file, the record and the reason.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agenther.s3 import S3Object
from agenther.schema import ROLES

# A log file: local, or an S3 object streamed from the store (same attributes an adapter uses).
LogFile = Path | S3Object

EXCERPT_CHARS = 200


@dataclass(frozen=True)
class Quarantined:
    source_file: str
    record_pointer: str
    reason: str
    excerpt: str

    def row(self) -> dict[str, str]:
        return {
            "source_file": self.source_file,
            "record_pointer": self.record_pointer,
            "reason": self.reason,
            "excerpt": self.excerpt,
        }


class RecordError(ValueError):
    """A record is malformed; the message names the field. Adapters turn it into a Quarantined row."""


class UnreadableFile(ValueError):
    """A whole JSON file cannot be parsed (not raised for JSONL: bad lines are quarantined one by one)."""


def excerpt(raw: Any) -> str:
    """First characters of the raw record, for a human looking at the quarantine."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not isinstance(raw, str):
        try:
            raw = json.dumps(raw, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            raw = repr(raw)
    return raw[:EXCERPT_CHARS]


def iter_records(path: LogFile) -> Iterator[tuple[str, Any]]:
    """Yield (record_pointer, record) for every record of a file, or (pointer, Quarantined).

    JSONL is read line by line (streaming; a bad line is quarantined and reading goes on).
    A JSON file is loaded whole: a list gives "[i]" pointers, a single object the pointer "".
    An empty file has no records.
    """
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
        return
    data = path.read_bytes()
    if not data.strip():
        return
    try:
        loaded = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values, one per line: a JSONL file named .json
            yield from _iter_jsonl(path)
            return
        raise UnreadableFile(f"{path}: invalid JSON: {exc}") from exc
    if isinstance(loaded, list):
        for i, record in enumerate(loaded):
            yield f"[{i}]", record
    else:
        yield "", loaded


def convert_records(
    path: LogFile, convert: Callable[[Any, LogFile, str], dict], label_pointer: bool = False
) -> Iterator[dict | Quarantined]:
    """Every record of the file through `convert`; a RecordError quarantines that record only.
    `label_pointer`: prefix the reason with the record pointer (for formats whose reasons
    do not name it themselves)."""
    for pointer, record in iter_records(path):
        if isinstance(record, Quarantined):
            yield record
            continue
        try:
            yield convert(record, path, pointer)
        except RecordError as exc:
            where = f"{pointer}: " if label_pointer and pointer else ""
            yield Quarantined(str(path), pointer, f"{where}{exc}", excerpt(record))


def _iter_jsonl(path: LogFile) -> Iterator[tuple[str, Any]]:
    # Bytes, not text mode: one non-UTF-8 line must cost that line only, not the file.
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            pointer = f"line {number}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"{pointer}: not UTF-8 ({exc.reason} at byte {exc.start})"
                yield pointer, Quarantined(str(path), pointer, reason, excerpt(raw))
                continue
            try:
                yield pointer, json.loads(text)
            except json.JSONDecodeError as exc:
                yield (
                    pointer,
                    Quarantined(str(path), pointer, f"{pointer}: invalid JSON: {exc}", excerpt(text)),
                )


def first_record(path: LogFile) -> Any:
    """The first record of a file (None if it has none), reading as little as possible."""
    for _, record in iter_records(path):
        if not isinstance(record, Quarantined):
            return record
    return None


def parse_jsonish(value: Any, field: str) -> Any:
    """Decode a field that may hold JSON or Python-literal text (ToolBench mixes both)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise RecordError(f"{field}: neither JSON nor a Python literal ({type(exc).__name__})") from exc


def get_path(record: Any, dotted: str) -> Any:
    """Follow a dotted path ("data.turns.0.text"); integers index lists. KeyError when absent."""
    node = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def message(
    role: str,
    content: str | None,
    tool_calls: list[dict] | None = None,
    tool_call_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """One canonical message (schema.MESSAGE)."""
    return {
        "role": role,
        "content": content,
        "tool_calls": tool_calls or [],
        "tool_call_id": tool_call_id,
        "name": name,
    }


def tool_call(call_id: str, name: str, arguments: Any) -> dict[str, str]:
    # Arguments stay JSON text; a model's malformed JSON is kept as written (it is evidence).
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "name": name, "arguments": arguments}


def _content_text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # OpenAI content parts: keep the text parts, in order.
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise RecordError(f"{where}: content must be text, got {type_name(value)}")


def _one_call(raw: Any, where: str, default_id: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: tool call is not an object (got {type_name(raw)})")
    fn = raw.get("function", raw)  # OpenAI nests {name, arguments} under "function"
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RecordError(f"{where}: tool call has no function name")
    call_id = raw.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise RecordError(f"{where}: tool call id must be a string, got {type_name(call_id)}")
    return tool_call(call_id or default_id, fn["name"], fn.get("arguments"))


def _sniff_call(text: str | None) -> list[Any] | None:
    """ShareGPT writes a tool call as a turn whose text is JSON {name, arguments} (or a list of them)."""
    if not text or text.lstrip()[:1] not in "{[":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = value if isinstance(value, list) else [value]
    if calls and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls
    ):
        return calls
    return None


class _CallBook:
    """Tracks tool calls so every tool result can point at exactly one call.

    tau-bench logs reuse call ids within a conversation (49 of the 200 shipped records), each
    result right after its call. A reused id is made unique ("<id>_2") and the result that
    answers it follows, so an id -> call lookup downstream is never ambiguous.
    """

    def __init__(self) -> None:
        self.open: list[tuple[str, dict[str, str]]] = []  # (id as logged, call), oldest first
        self.uses: dict[str, int] = {}  # id as logged -> times seen
        self.latest: dict[str, dict[str, str]] = {}  # id as logged -> its latest call

    def add(self, call: dict[str, str]) -> dict[str, str]:
        logged = call["id"]
        self.uses[logged] = self.uses.get(logged, 0) + 1
        if self.uses[logged] > 1:
            call = {**call, "id": f"{logged}_{self.uses[logged]}"}
        self.open.append((logged, call))
        self.latest[logged] = call
        return call

    def answer(self, logged_id: Any, name: Any, at: str) -> dict[str, str]:
        if logged_id is None:
            # Logs without ids (ToolBench, ShareGPT): the oldest open call of that name, else the oldest.
            match = [e for e in self.open if e[1]["name"] == name] or self.open
            if not match:
                raise RecordError(f"{at}: tool result follows no tool call")
            entry = match[0]
        else:
            entry = next((e for e in self.open if e[0] == logged_id), None)
            if entry is None:
                if not isinstance(logged_id, str) or logged_id not in self.latest:
                    raise RecordError(f"{at}: tool_call_id {logged_id!r} matches no earlier tool call")
                return self.latest[logged_id]  # a second result for an answered call
        self.open.remove(entry)
        return entry[1]


def _assistant_calls(
    raw: dict, raw_role: str, content: str | None, at: str, index: int, call_roles: tuple[str, ...]
) -> tuple[list[dict[str, str]], str | None]:
    """The tool calls of an assistant turn (and its content, emptied when the text was the call)."""
    raw_calls = raw.get("tool_calls")
    if raw.get("function_call") is not None:  # legacy OpenAI / ToolBench: one call per turn
        raw_calls = [raw["function_call"]]
    # Only turns with no native call field and a non-OpenAI role name ("gpt", a renamed call
    # role) are sniffed for JSON calls: OpenAI "assistant" text is never reinterpreted.
    native = "tool_calls" in raw or raw.get("function_call") is not None
    if raw_role in call_roles or (not native and raw_role != "assistant"):
        sniffed = _sniff_call(content)
        if raw_role in call_roles and sniffed is None:
            raise RecordError(f"{at}: {raw_role!r} turn is not JSON {{name, arguments}}")
        if sniffed is not None:
            raw_calls, content = sniffed, None
    if raw_calls is None:
        return [], content
    if not isinstance(raw_calls, list):
        raise RecordError(f"{at}: tool_calls must be a list, got {type_name(raw_calls)}")
    calls = []
    for k, rc in enumerate(raw_calls):
        default_id = f"call_{index}" if len(raw_calls) == 1 else f"call_{index}_{k}"  # stable: message index
        calls.append(_one_call(rc, f"{at}.tool_calls[{k}]", default_id))
    return calls, content


def canonical_messages(
    raw_messages: Any,
    where: str,
    roles: dict[str, str] | None = None,
    role_key: str = "role",
    content_key: str = "content",
    call_roles: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Convert chat turns (OpenAI, legacy function_call, ShareGPT) to canonical messages.

    `roles` maps log role names to canonical ones. Turns whose raw role is in `call_roles`
    carry a tool call as JSON text (ShareGPT `function_call`). Every tool message ends up
    pointing at an earlier call. Raises RecordError naming the turn ("traj[3]: message has no role").
    """
    if not isinstance(raw_messages, list):
        raise RecordError(f"{where}: expected a list of messages, got {type_name(raw_messages)}")
    roles = roles or {}
    book = _CallBook()
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_messages):
        at = f"{where}[{i}]"
        if not isinstance(raw, dict):
            raise RecordError(f"{at}: message is not an object (got {type_name(raw)})")
        raw_role = raw.get(role_key)
        if raw_role is None:
            raise RecordError(f"{at}: message has no role ({role_key!r})")
        if not isinstance(raw_role, str):
            raise RecordError(f"{at}: role must be a string, got {type_name(raw_role)}")
        role = roles.get(raw_role, raw_role)
        if role not in ROLES:
            raise RecordError(f"{at}: unknown role {raw_role!r}")
        content = _content_text(raw.get(content_key), at)

        if role == "assistant":
            calls, content = _assistant_calls(raw, raw_role, content, at, i, call_roles)
            out.append(message(role, content, [book.add(c) for c in calls]))
        elif role == "tool":
            name = raw.get("name")
            if name is not None and not isinstance(name, str):
                raise RecordError(f"{at}: name must be a string, got {type_name(name)}")
            call = book.answer(raw.get("tool_call_id"), name, at)
            out.append(message("tool", content, tool_call_id=call["id"], name=name or call["name"]))
        else:
            out.append(message(role, content))
    return out


def first_user_text(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "user" and m["content"]), None)


def last_assistant_text(messages: list[dict]) -> str | None:
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant" and m["content"]), None)


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
