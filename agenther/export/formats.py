"""Format converters: canonical messages -> one training format each.

Canonical messages (schema.MESSAGE) are {role, content, tool_calls[{id, name, arguments}],
tool_call_id, name}. Every converter keeps tool calls as calls and tool results as results;
nothing is flattened into assistant text.

These are the ANNOTATED rows (sft.jsonl, dpo.jsonl, sharegpt.jsonl): each carries the sample's
`weight` and `metadata` (lineage). Each consumer's own file is derived from them (files.derived):
openai_ft (OpenAI upload), trl (TRL SFT and preference), llamafactory (sharegpt + dataset_info).

- `sft_row`: OpenAI chat messages (+ `tools`), with OpenAI's per-message 0/1 `weight`.
- `dpo_row`: one prompt and a chosen and a rejected continuation (message lists).
- `sharegpt_row`: LLaMA-Factory sharegpt with its default tags.

Choices:
- Tool messages carry only {role, content, tool_call_id}: OpenAI's tool message has no
  `name` (it is recoverable from the call the id points at).
- Assistant turns that only call tools have `content: null`, as the Chat Completions API
  writes them; an assistant turn's text next to its tool calls is kept (OpenAI, TRL).
- ShareGPT cannot hold text and a call in one turn (a function_call value must be pure JSON,
  and two assistant-side turns in a row break the alternation), so such a turn becomes the
  function_call and its text is dropped; `metadata.assistant_text_dropped` counts them.
"""

from __future__ import annotations

import json
from typing import Any

from agenther.export.schemas import validate_sharegpt


def dumps(row: Any) -> str:
    """One canonical JSON line: sorted keys, real UTF-8, no spaces (byte-stable)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# --- OpenAI / TRL messages -------------------------------------------------------------


def openai_message(message: dict) -> dict:
    """A canonical message as a Chat Completions message."""
    role = message["role"]
    content = message.get("content")
    if role == "tool":
        return {"role": "tool", "content": content or "", "tool_call_id": message.get("tool_call_id")}
    if role != "assistant":
        return {"role": role, "content": content or ""}
    calls = message.get("tool_calls") or []
    out: dict = {"role": "assistant", "content": (content or None) if calls else (content or "")}
    if message.get("weight") is not None:  # 0: context only, not trained on (hindsight samples)
        out["weight"] = int(message["weight"])
    if calls:
        out["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": call.get("name"), "arguments": call.get("arguments") or "{}"},
            }
            for call in calls
        ]
    return out


def openai_messages(messages: list[dict]) -> list[dict]:
    return [openai_message(m) for m in messages]


def trains(message: dict) -> bool:
    """An assistant turn to train on: weight 1, or no weight given (an original success trains
    every assistant turn). Weight 0 is context only."""
    return message["role"] == "assistant" and message.get("weight") != 0


def parse_tools(tools_json: str | None) -> list[dict] | None:
    """The trajectory's tool list as OpenAI tool schemas; None when unknown.

    Bare function schemas ({name, parameters}) are wrapped as {"type": "function", "function": ...}.
    Raises ValueError when the text is there but is not a JSON list of objects.
    """
    if tools_json is None or not tools_json.strip():
        return None
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tools is not JSON ({exc})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools is not a JSON list of objects")
    return [
        t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
        for t in tools
    ] or None


def sft_row(messages: list[dict], tools: list[dict] | None, weight: float, metadata: dict) -> dict:
    row: dict = {"messages": openai_messages(messages), "weight": weight, "metadata": metadata}
    if tools:
        row["tools"] = tools
    return row


def dpo_row(
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    tools: list[dict] | None,
    weight: float,
    metadata: dict,
) -> dict:
    """One prompt, a chosen and a rejected continuation (the reference code paired two prompts)."""
    row: dict = {
        "prompt": openai_messages(prompt),
        "chosen": openai_messages(chosen),
        "rejected": openai_messages(rejected),
        "weight": weight,
        "metadata": metadata,
    }
    if tools:
        row["tools"] = tools
    return row


def openai_upload_row(row: dict) -> dict:
    """An SFT row reduced to the keys OpenAI's fine-tuning upload accepts."""
    return {k: v for k, v in row.items() if k in ("messages", "tools", "parallel_tool_calls")}


# --- LLaMA-Factory sharegpt ---------------------------------------------------------------

_SLOT = {"human": 0, "observation": 0, "gpt": 1, "function_call": 1}  # even / odd position


def _call_value(calls: list[dict]) -> str:
    """function_call value: {"name", "arguments": object}, or a JSON list of them when parallel."""
    objs = []
    for call in calls:
        try:
            args = json.loads(call.get("arguments") or "{}")
        except json.JSONDecodeError:
            raise ValueError(f"tool call {call.get('id')} arguments are not JSON") from None
        if not isinstance(args, dict):
            raise ValueError(f"tool call {call.get('id')} arguments are not a JSON object")
        objs.append({"name": call.get("name"), "arguments": args})
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


def sharegpt_tools(tools: list[dict] | None) -> str | None:
    """LLaMA-Factory reads bare function schemas (older versions only those) and indexes
    parameters.properties, so each tool is unwrapped and given empty properties if it has none."""
    if not tools:
        return None
    bare = []
    for tool in tools:
        fn = dict(tool["function"]) if tool.get("type") == "function" else dict(tool)
        params = dict(fn.get("parameters") or {"type": "object"})
        params.setdefault("properties", {})
        fn["parameters"] = params
        bare.append(fn)
    return json.dumps(bare, ensure_ascii=False)


def sharegpt_row(messages: list[dict], tools: list[dict] | None, weight: float, metadata: dict) -> dict:
    """Canonical messages as a LLaMA-Factory sharegpt row; ValueError if they cannot alternate.

    Leading system turns -> `system`; user -> human; assistant text -> gpt; assistant tool calls
    -> function_call; consecutive tool results -> one observation (a JSON list when several).
    Repairs that keep the meaning: consecutive user turns or assistant texts are joined with a
    blank line; an assistant text followed by an assistant call keeps the call.
    """
    start = 0
    system_parts = []
    while start < len(messages) and messages[start]["role"] == "system":
        system_parts.append(messages[start].get("content") or "")
        start += 1
    turns: list[list] = []  # [tag, value, weight]: weight of a model turn (None: not given)
    dropped_text = 0
    pending_results: list[str] = []

    def flush_results() -> None:
        if pending_results:
            value = (
                pending_results[0]
                if len(pending_results) == 1
                else json.dumps(pending_results, ensure_ascii=False)
            )
            turns.append(["observation", value, None])
            pending_results.clear()

    for message in messages[start:]:
        role = message["role"]
        if role == "tool":
            pending_results.append(message.get("content") or "")
            continue
        flush_results()
        if role == "user":
            turns.append(["human", message.get("content") or "", None])
        elif role == "assistant" and message.get("tool_calls"):
            dropped_text += bool((message.get("content") or "").strip())
            turns.append(["function_call", _call_value(message["tool_calls"]), message.get("weight")])
        elif role == "assistant":
            turns.append(["gpt", message.get("content") or "", message.get("weight")])
        else:
            raise ValueError(f"a {role} turn after the conversation started has no sharegpt equivalent")
    flush_results()

    merged: list[list] = []
    for tag, value, w in turns:
        prev = merged[-1] if merged else None
        if prev is None or _SLOT[prev[0]] != _SLOT[tag]:
            merged.append([tag, value, w])
            continue
        if prev[0] == tag and tag in ("human", "gpt"):
            prev[1] = f"{prev[1]}\n\n{value}"
        elif prev[0] == "gpt" and tag == "function_call":
            dropped_text += bool(prev[1].strip())
            prev[:] = [tag, value, w]  # the call replaces the text, with its weight
            continue
        elif prev[0] == tag == "function_call":  # two call turns without results between: one parallel call
            calls = [json.loads(prev[1]), json.loads(value)]
            flat = [c for part in calls for c in (part if isinstance(part, list) else [part])]
            prev[1] = json.dumps(flat, ensure_ascii=False)
        else:
            raise ValueError(f"{prev[0]} followed by {tag} cannot be made to alternate")
        if w is not None:  # a merged model turn trains only if all of its parts do
            prev[2] = w if prev[2] is None else min(prev[2], w)

    extra = {"assistant_text_dropped": dropped_text}
    if any(w is not None for _, _, w in merged):
        # One 0/1 per `conversations` entry: 1 = a model turn to train on (LLaMA-Factory reads no
        # per-turn weight: see the dataset card for how to apply it).
        extra["turn_weights"] = [int(w if w is not None else tag in ("gpt", "function_call"))
                                 if tag in ("gpt", "function_call") else 0 for tag, _, w in merged]
    row: dict = {
        "conversations": [{"from": tag, "value": value} for tag, value, _ in merged],
        "system": "\n\n".join(system_parts),
        "weight": weight,
        "metadata": metadata | extra,
    }
    tools_text = sharegpt_tools(tools)
    if tools_text is not None:
        row["tools"] = tools_text
    validate_sharegpt(row)
    return row
