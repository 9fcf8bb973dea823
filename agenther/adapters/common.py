"""Helpers shared by the adapters: reading records, quarantine, canonical messages.

An adapter turns one file into trajectory dicts (schema.TRAJECTORY columns). A record it
cannot trust is never dropped silently and never crashes the run: it becomes a
`Quarantined` row naming the file, the record and the reason.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agenther.s3 import S3Object
from agenther.schema import ROLES


@dataclass(frozen=True)
class LogPart:
    """Lines [first_line, ...) of a local JSONL file, the bytes [start, end) (both at a line's start):
    a part of one big log that ingest reads apart from the others (agenther/stages/ingest.py). It
    quacks like the file (str() is the file's path, so rows and quarantine name the file, and
    record pointers keep their line numbers)."""
    path: Path
    start: int
    end: int
    first_line: int

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def suffix(self) -> str:
        return self.path.suffix

    @property
    def parent(self) -> Path:
        return self.path.parent

    @property
    def size(self) -> int:  # bytes, as S3Object.size
        return self.end - self.start

    def open(self, mode: str = "rb") -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"{self.path}: log parts are read as bytes (mode 'rb'), not {mode!r}")
        return io.BufferedReader(_Window(self.path.open("rb"), self.start, self.end), buffer_size=1 << 20)

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            return fh.read()


class _Window(io.RawIOBase):
    """Bytes [start, end) of an open file, as a raw stream."""

    def __init__(self, fh: io.BufferedReader, start: int, end: int):
        fh.seek(start)
        self._fh, self._left = fh, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._fh.readinto(memoryview(buffer)[: min(len(buffer), self._left)])
        self._left -= n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


# A log file: local, or an S3 object streamed from the store, or a part of a big local JSONL file
# (same attributes an adapter uses).
LogFile = Path | S3Object | LogPart

EXCERPT_CHARS = 200
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in decoded text: only a lone one survives json.loads
# A \\uD800-\\uDFFF escape in raw JSON that is not one half of a pair: json.loads turns it into a
# lone surrogate, which no UTF-8 writer (Parquet, the terminal) accepts.
LONE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                         rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def has_lone_escape(raw: bytes) -> bool:
    # The regex scan costs a third of reading a tau-bench line; a surrogate escape of any kind is rare.
    return (b"\\ud" in raw or b"\\uD" in raw) and LONE_ESCAPE.search(raw) is not None


@dataclass(frozen=True)
class Quarantined:
    source_file: str
    record_pointer: str
    reason: str
    excerpt: str

    def row(self) -> dict[str, str]:
        # A record is often quarantined for what it holds: a lone surrogate in its reason or
        # excerpt must not fail the quarantine table's own write.
        return {
            "source_file": printable(self.source_file),
            "record_pointer": printable(self.record_pointer),
            "reason": printable(self.reason),
            "excerpt": printable(self.excerpt),
        }


def printable(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate becomes its escape text ("\\ud800")."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if LONE_SURROGATE.search(text) else text


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
        except (TypeError, ValueError, RecursionError):
            raw = f"<{type(raw).__name__}>"  # repr() of a record too deep for json.dumps is as deep
    return printable(raw[:EXCERPT_CHARS])


# Each log file's own reading problems: records whose lone surrogates were repaired (by pointer).
Repairs = list[str]


def iter_records(path: LogFile, repairs: Repairs | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (record_pointer, record) for every record of a file, or (pointer, Quarantined).

    JSONL is read line by line (streaming; a bad line is quarantined and reading goes on).
    A JSON file is loaded whole: a list gives "[i]" pointers, a single object the pointer "".
    An empty file has no records. No record stops the reading of the others: one nested too deep
    for the decoder, or holding a number it refuses, is quarantined; a lone surrogate escape
    ("\\ud800", valid JSON that no UTF-8 writer takes) is repaired to its escape text, and the
    record's pointer appended to `repairs`.
    """
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, repairs)
        return
    data = path.read_bytes()
    if not data.strip():
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values, one per line: a JSONL file named .json
            yield from _iter_jsonl(path, repairs)
            return
        raise UnreadableFile(f"{path}: invalid JSON: {exc}") from exc
    except (RecursionError, ValueError):
        # One record the decoder refuses (nested too deep, a 5,000-digit number): the others
        # are read one by one, that one is quarantined.
        yield from _iter_json_values(path, text, repairs)
        return
    mend = has_lone_escape(data)
    for pointer, record in ([(f"[{i}]", r) for i, r in enumerate(loaded)] if isinstance(loaded, list)
                            else [("", loaded)]):
        yield pointer, (_mended(path, pointer, record, repairs) if mend else record)


def _iter_json_values(path: LogFile, text: str, repairs: Repairs | None) -> Iterator[tuple[str, Any]]:
    """The records of a JSON file (an array, or one value) decoded one at a time."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    array = text.startswith("[", pos)
    if array:
        pos = _skip_space(text, pos + 1)
    i = 0
    while pos < len(text) and not (array and text[pos] == "]"):
        pointer = f"[{i}]" if array else ""
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UnreadableFile(f"{path}: invalid JSON: {exc}") from exc
        except (RecursionError, ValueError) as exc:
            end = _value_end(text, pos)
            yield pointer, Quarantined(str(path), pointer, f"{pointer or 'record'}: {_refused(exc)}",
                                       excerpt(text[pos:end]))
        else:
            yield pointer, _mended(path, pointer, record, repairs)
        pos = _skip_space(text, end)
        if not array:
            break
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        i += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value starting at `pos` ends, by counting brackets outside strings: no
    recursion, so a value of any depth is skipped whole."""
    depth, in_string, i = 0, False, pos
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth <= 0:
                return i + 1
        elif depth == 0 and ch == ",":
            return i
        i += 1
    return len(text)


def _refused(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply for the JSON decoder (RecursionError)"
    return f"a value the JSON decoder refuses: {exc}"


def _mended(path: LogFile, pointer: str, record: Any, repairs: Repairs | None) -> Any:
    """The record with every lone surrogate replaced by its escape text ("\\ud800", 6 characters):
    lossless, the log's own spelling; the pointer is appended to `repairs`. Unchanged otherwise
    (the raw text's escapes may all have been pairs)."""
    if isinstance(record, Quarantined):
        return record
    try:
        text = json.dumps(record, ensure_ascii=False)
    except (RecursionError, ValueError) as exc:
        return Quarantined(str(path), pointer, f"{pointer or 'record'}: {_refused(exc)}", "")
    if not LONE_SURROGATE.search(text):
        return record
    if repairs is not None:
        repairs.append(f"{path} {pointer}".strip())
    return json.loads(LONE_SURROGATE.sub(lambda m: f"\\\\u{ord(m.group()):04x}", text))


def convert_records(
    path: LogFile, convert: Callable[[Any, LogFile, str], dict], label_pointer: bool = False,
    repairs: Repairs | None = None,
) -> Iterator[dict | Quarantined]:
    """Every record of the file through `convert`; a record it fails on is quarantined, that
    record only. A RecordError says what is wrong with the record; anything else an adapter
    raises on one record (a type it did not expect, a value too deep or too big) is quarantined
    with the exception's name: no record ends the run. `label_pointer`: prefix the reason with
    the record pointer (for formats whose reasons do not name it themselves)."""
    for pointer, record in iter_records(path, repairs):
        if isinstance(record, Quarantined):
            yield record
            continue
        where = f"{pointer}: " if label_pointer and pointer else ""
        try:
            row = convert(record, path, pointer)
        except RecordError as exc:
            row = Quarantined(str(path), pointer, f"{where}{exc}", excerpt(record))
        except Exception as exc:  # noqa: BLE001 - see the docstring: one record never ends the run
            row = Quarantined(str(path), pointer, f"{where}cannot be read ({type(exc).__name__}: {exc})"[:500],
                              excerpt(record))
        yield row


def _iter_jsonl(path: LogFile, repairs: Repairs | None = None) -> Iterator[tuple[str, Any]]:
    # Bytes, not text mode: one non-UTF-8 line must cost that line only, not the file.
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=path.first_line if isinstance(path, LogPart) else 1):
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
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield pointer, Quarantined(str(path), pointer, f"{pointer}: invalid JSON: {exc}", excerpt(text))
                continue
            except (RecursionError, ValueError) as exc:
                yield pointer, Quarantined(str(path), pointer, f"{pointer}: {_refused(exc)}", excerpt(text))
                continue
            yield pointer, (_mended(path, pointer, record, repairs) if has_lone_escape(raw) else record)


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
