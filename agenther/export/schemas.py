"""What each training export must look like, checked row by row before a row is written.

- SFT: OpenAI chat fine-tuning JSONL (`messages`, optional `tools`), tool calls kept as
  `tool_calls` [{id, type: "function", function: {name, arguments: JSON text}}] and tool
  results as `tool` messages whose `tool_call_id` answers a call made just before.
- DPO: TRL's conversational preference type: ONE `prompt` (list of messages) and a
  `chosen` and a `rejected` continuation (lists of messages starting with an assistant turn).
- ShareGPT: LLaMA-Factory's default sharegpt columns and tags (`conversations` of
  {from: human|gpt|function_call|observation, value}, `system`, `tools`), with the rule its
  SharegptDatasetConverter enforces: human/observation at even positions, gpt/function_call
  at odd positions, an even number of turns (it drops any other example with a warning).

Rows also carry our own `weight` and `metadata` keys; trainers ignore extra columns, and
`exports.openai_upload_row` strips them for OpenAI's stricter upload check.

Each validator raises ValueError naming the first problem found.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import jsonschema

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names

TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": NAME_PATTERN},
                "arguments": {"type": "string"},
            },
        },
    },
}

# One schema per role: a discriminated union gives clearer errors than jsonschema's oneOf.
MESSAGE_SCHEMAS: dict[str, dict] = {
    "system": {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {"const": "system"},
            "content": {"type": "string"},
            "name": {"type": "string"},
        },
    },
    "user": {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {"role": {"const": "user"}, "content": {"type": "string"}, "name": {"type": "string"}},
    },
    "assistant": {
        "type": "object",
        "required": ["role", "content"],  # content may be null when the turn only calls tools
        "additionalProperties": False,
        "properties": {
            "role": {"const": "assistant"},
            "content": {"type": ["string", "null"]},
            "tool_calls": {"type": "array", "minItems": 1, "items": TOOL_CALL},
            "weight": {"enum": [0, 1]},  # OpenAI's per-message switch; we do not emit it
        },
    },
    "tool": {
        "type": "object",
        "required": ["role", "content", "tool_call_id"],
        "additionalProperties": False,
        "properties": {
            "role": {"const": "tool"},
            "content": {"type": "string"},
            "tool_call_id": {"type": "string", "minLength": 1},
        },
    },
}

TOOL_SCHEMA = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": NAME_PATTERN},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": {"type": ["boolean", "null"]},
            },
        },
    },
}

_TOOLS = {"type": "array", "items": TOOL_SCHEMA}
_MESSAGE_LIST = {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"]}}
_EXTRAS = {"weight": {"type": "number", "minimum": 0}, "metadata": {"type": "object"}}

SFT_SCHEMA = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        "messages": _MESSAGE_LIST,
        "tools": _TOOLS,
        "parallel_tool_calls": {"type": "boolean"},
        **_EXTRAS,
    },
}

DPO_SCHEMA = {
    "type": "object",
    "required": ["prompt", "chosen", "rejected"],
    "additionalProperties": False,
    "properties": {
        "prompt": _MESSAGE_LIST,
        "chosen": _MESSAGE_LIST,
        "rejected": _MESSAGE_LIST,
        "tools": _TOOLS,
        **_EXTRAS,
    },
}

SHAREGPT_TAGS = ("human", "gpt", "function_call", "observation", "system")  # system: first turn only
SHAREGPT_SCHEMA = {
    "type": "object",
    "required": ["conversations", "system"],
    "additionalProperties": False,  # keys LLaMA-Factory would not read (role/content, messages) are errors
    "properties": {
        "conversations": {
            "type": "array",
            "minItems": 2,
            "items": {
                "type": "object",
                "required": ["from", "value"],
                "additionalProperties": False,
                "properties": {"from": {"enum": list(SHAREGPT_TAGS)}, "value": {"type": "string"}},
            },
        },
        "system": {"type": "string"},
        "tools": {"type": "string"},
        **_EXTRAS,
    },
}


_VALIDATORS: dict[int, jsonschema.Draft202012Validator] = {}  # id of a schema above -> its validator


def _validator(schema: dict) -> jsonschema.Draft202012Validator:
    # Built once per schema (the schemas are this module's constants, so their ids stay theirs):
    # building one per row and per message was a tenth of the package stage.
    validator = _VALIDATORS.get(id(schema))
    if validator is None:
        validator = _VALIDATORS[id(schema)] = jsonschema.Draft202012Validator(schema)
    return validator


def _check(instance: Any, schema: dict, where: str) -> None:
    tools = None
    if isinstance(instance, dict) and "tools" in instance and schema.get("properties", {}).get("tools") is _TOOLS:
        # A run's tool list is the same on each of its rows (tau-bench: 14 schemas on every row):
        # checked once per distinct list (agenther.export.schemas._check_tools), not once per row.
        tools, instance = instance["tools"], {k: v for k, v in instance.items() if k != "tools"}
        schema = _tools_apart(schema)
    _raise_first(_validator(schema).iter_errors(instance), where)
    if tools is not None:
        _check_tools(tools, where)


def _raise_first(errors: Iterable[jsonschema.ValidationError], where: str) -> None:
    ordered = sorted(errors, key=lambda e: list(e.path))
    if ordered:
        err = ordered[0]
        path = "/".join(str(p) for p in err.path)
        raise ValueError(f"{where}{'/' + path if path else ''}: {err.message}")


_TOOLS_APART: dict[int, dict] = {}  # id of a row schema -> the same with `tools` only an array
_TOOLS_CHECKED: dict[str, str | None] = {}  # canonical JSON of a tool list -> its first problem, or None


def _tools_apart(schema: dict) -> dict:
    apart = _TOOLS_APART.get(id(schema))
    if apart is None:
        apart = _TOOLS_APART[id(schema)] = {**schema, "properties": {**schema["properties"], "tools": {"type": "array"}}}
    return apart


def _check_tools(tools: Any, where: str) -> None:
    key = json.dumps(tools, sort_keys=True, default=str)
    if key not in _TOOLS_CHECKED:
        if len(_TOOLS_CHECKED) >= 4096:  # logs with a tool list per record: memory stays bounded
            _TOOLS_CHECKED.clear()
        try:
            _raise_first(_validator(_TOOLS).iter_errors(tools), "tools")
            _TOOLS_CHECKED[key] = None
        except ValueError as exc:
            _TOOLS_CHECKED[key] = str(exc)
    problem = _TOOLS_CHECKED[key]
    if problem is not None:
        raise ValueError(f"{where}/{problem}")


def _check_messages(messages: list[dict], where: str) -> None:
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in MESSAGE_SCHEMAS:
            raise ValueError(f"{where}/{i}: unknown role {role!r}")
        _check(message, MESSAGE_SCHEMAS[role], f"{where}/{i}")
        if role == "assistant" and message.get("content") is None and not message.get("tool_calls"):
            raise ValueError(f"{where}/{i}: assistant turn has neither content nor tool_calls")
        for call in message.get("tool_calls") or []:
            try:
                json.loads(call["function"]["arguments"])
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}/{i}: tool call {call['id']} arguments are not JSON ({exc})"
                ) from None


def _check_tool_flow(messages: list[dict], where: str) -> None:
    """The Chat Completions rule: tool results answer the calls of the assistant turn just
    before them, each call once; an assistant turn's calls are all answered before the next
    non-tool turn (the very last turn may be an unanswered call: the sample ends there)."""
    pending: list[str] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message["tool_call_id"]
            if call_id not in pending:
                raise ValueError(f"{where}/{i}: tool result {call_id!r} answers no pending tool call")
            pending.remove(call_id)
            continue
        if pending:
            raise ValueError(f"{where}/{i}: tool call(s) {pending} have no result before this {role} turn")
        if role == "assistant":
            pending = [c["id"] for c in message.get("tool_calls") or []]


def validate_sft(row: dict) -> None:
    """An OpenAI chat fine-tuning row that ends on an assistant turn."""
    _check(row, SFT_SCHEMA, "sft")
    messages = row["messages"]
    _check_messages(messages, "sft/messages")
    _check_tool_flow(messages, "sft/messages")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"sft/messages: must end on an assistant turn, ends on {messages[-1]['role']!r}")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("sft/messages: no user turn")


def validate_dpo(row: dict) -> None:
    """A TRL conversational preference row: one prompt, a chosen and a rejected continuation."""
    _check(row, DPO_SCHEMA, "dpo")
    for key in ("prompt", "chosen", "rejected"):
        _check_messages(row[key], f"dpo/{key}")
    # TRL renders the prompt with a generation prompt: it must end where the model speaks next
    # (recent TRL accepts a last prompt role of user or tool).
    last = row["prompt"][-1]["role"]
    if last not in ("user", "tool"):
        raise ValueError(f"dpo/prompt: must end on a user or tool turn, ends on {last!r}")
    if not any(m["role"] == "user" for m in row["prompt"]):
        raise ValueError("dpo/prompt: no user turn")
    for key in ("chosen", "rejected"):
        side = row[key]
        if side[0]["role"] != "assistant" or side[-1]["role"] != "assistant":
            raise ValueError(
                f"dpo/{key}: must start and end on an assistant turn "
                f"(starts {side[0]['role']!r}, ends {side[-1]['role']!r})"
            )
        _check_tool_flow(row["prompt"] + side, f"dpo/prompt+{key}")
    if row["chosen"] == row["rejected"]:
        raise ValueError("dpo: chosen and rejected are identical")


def validate_sharegpt(row: dict) -> None:
    """A LLaMA-Factory sharegpt row (default tags) that its converter and formatters accept."""
    _check(row, SHAREGPT_SCHEMA, "sharegpt")
    turns = row["conversations"]
    # LLaMA-Factory (data/converter.py, SharegptDatasetConverter): a leading system turn is
    # taken as the system prompt; then even positions must be human/observation and odd
    # positions gpt/function_call; a non-ranking example needs an even count.
    if turns and turns[0]["from"] == "system":
        turns = turns[1:]
    accept = (("human", "observation"), ("gpt", "function_call"))
    for i, turn in enumerate(turns):
        if turn["from"] not in accept[i % 2]:
            parity = "even" if i % 2 == 0 else "odd"
            raise ValueError(
                f"sharegpt/conversations/{i}: {turn['from']!r} at an {parity} position "
                f"(expected one of {accept[i % 2]})"
            )
    if len(turns) % 2 != 0 or not turns:
        raise ValueError(
            f"sharegpt/conversations: {len(turns)} turns; LLaMA-Factory needs an even, non-zero count"
        )
    # LLaMA-Factory's FunctionFormatter json.loads a function_call value and reads name and
    # arguments of each call; ToolFormatter json.loads `tools` and reads parameters.properties.
    for i, turn in enumerate(turns):
        if turn["from"] == "function_call":
            _check_function_call(turn["value"], f"sharegpt/conversations/{i}")
    if "tools" in row:
        _check_sharegpt_tools(row["tools"])


def _check_function_call(value: str, where: str) -> None:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"{where}: function_call value is not JSON") from None
    for call in calls if isinstance(calls, list) else [calls]:
        if not (
            isinstance(call, dict)
            and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments"), dict)
        ):
            raise ValueError(f"{where}: each function call needs a string name and an object of arguments")


def _check_sharegpt_tools(text: str) -> None:
    try:
        tools = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("sharegpt/tools: not JSON") from None
    if not isinstance(tools, list):
        raise ValueError("sharegpt/tools: not a JSON list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        params = fn.get("parameters") if isinstance(fn, dict) else None
        if not (
            isinstance(fn, dict)
            and isinstance(fn.get("name"), str)
            and isinstance(params, dict)
            and isinstance(params.get("properties"), dict)
        ):
            raise ValueError(f"sharegpt/tools/{i}: needs a name and parameters.properties")
