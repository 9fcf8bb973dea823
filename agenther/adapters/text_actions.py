"""Tool calls written as text by ReAct-style agents (WebShop, HotpotQA, LangChain) made structured.

`parse_text_actions` reads canonical messages; an assistant turn with no structured tool calls
whose text holds an action gets `tool_calls`, and its observation becomes a `tool` message.
Recognized, after an "Action:" line (optionally numbered, "Action 2:", any case):

- bracket   `search[blue shoes]`              -> {"input": "blue shoes"}
- call      `get_weather(city="Paris", n=2)`  -> {"city": "Paris", "n": 2};  `search("x")` -> {"input": "x"}
- bare name `lookup_order` + "Action Input: {...}" (LangChain) -> that object, a non-object -> {"input": value}
- JSON      `{"name": ..., "arguments": ...}` / `{"action": ..., "action_input": ...}` (also in a
            ```json fence); a turn that is nothing but such JSON needs no "Action:" line, nor does a
            turn that is one bracket action and nothing else (`click[Buy Now]`).

The observation is the next user turn starting "Observation:" ("Observation 1:", any case; in the
`react` grammar, a run where no user turn has that prefix takes the user turn right after each
action as it is), or an "Observation:" block later in the same assistant text (each Thought/Action/Observation cycle
then becomes its own assistant + tool pair). Finish[answer] (any case) and a JSON "Final Answer"
action stay calls, named "Finish"; a LangChain "Final Answer: ..." line stays text. Text around
an action (the Thought) stays the turn's content (None if empty). A turn with anything
unparseable after an "Action:" line, or an observation with no action to answer, is left
exactly as it was; so are turns that already hold structured tool calls, and user turns
other than an observation right after a parsed action.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from typing import Any

from agenther.adapters.common import message
from agenther.adapters.grammar import Grammar

# A line opening a ReAct block: "Thought:", "Action 2:", "Action Input:", "Observation 1:", "Final Answer:".
MARKER = re.compile(
    r"^[ \t]*(?P<kind>thought|action[ \t]+input|action|observation|final[ \t]+answer)(?:[ \t]*\d+)?[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
OBSERVATION = re.compile(r"\A\s*observation(?:[ \t]*\d+)?[ \t]*:", re.IGNORECASE)
NAME = r"(?P<name>[A-Za-z_][\w\-]*(?:\.[A-Za-z_][\w\-]*)*)"  # search, web.search, add-to-cart
BRACKET_CALL = re.compile(NAME + r"[ \t]*\[(?P<args>.*)\]", re.DOTALL)  # search[blue shoes]
PAREN_CALL = re.compile(NAME + r"[ \t]*\((?P<args>.*)\)", re.DOTALL)  # get_weather(city="Paris")
BARE_NAME = re.compile(NAME)  # lookup_order (arguments on an "Action Input:" line)
FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(?P<body>.*?)```", re.DOTALL)
KEY_VALUE = re.compile(r"\s*(?P<key>[A-Za-z_]\w*)\s*=\s*(?P<value>\"[^\"]*\"|'[^']*'|[^,]*)(?:,|\Z)")

NAME_KEYS = ("name", "action", "tool")
ARG_KEYS = ("arguments", "action_input", "tool_input", "parameters", "args")
FINISH_NAMES = {"finish", "final answer", "final_answer"}
_DECODER = json.JSONDecoder()


def parse_text_actions(messages: list[dict], plain_observations: bool = False) -> list[dict]:
    """Canonical messages with text actions made into tool calls and their observations into
    tool messages. Messages already holding tool calls, and text that does not parse, are kept as is.
    `plain_observations`: the user turn right after an action is its observation even without an
    "Observation:" prefix (logs whose environment replies in the next turn as it is); the final
    report then waits for none."""
    out: list[dict] = []
    waiting: list[dict] = []  # calls of the last parsed turn still waiting for an observation
    for step, msg in enumerate(messages):
        if waiting and msg["role"] == "user" and not msg.get("tool_calls"):
            text = msg.get("content") or ""
            observed = OBSERVATION.match(text)
            if observed or plain_observations:
                call = waiting.pop(0)
                content = text[observed.end() :].strip() if observed else text.strip()
                out.append(message("tool", content, tool_call_id=call["id"], name=call["name"]))
                continue
        waiting = []
        parsed = None
        if msg["role"] == "assistant" and not msg.get("tool_calls") and isinstance(msg.get("content"), str):
            parsed = _parse_turn(msg["content"], step)
        if parsed is None:
            out.append(msg)
        else:
            turns, waiting = parsed
            if plain_observations:
                waiting = [c for c in waiting if c["name"] != "Finish"]
            out.extend(turns)
    return out


def parse_react(messages: list[dict]) -> list[dict]:
    """The `react` grammar: observations are "Observation:" turns, or, in a run where no user turn
    has that prefix, the user turn right after each action as it is."""
    prefixed = any(m["role"] == "user" and OBSERVATION.match(m.get("content") or "") for m in messages)
    return parse_text_actions(messages, plain_observations=not prefixed)


class _Segment:
    """One Thought/Action/Observation cycle of an assistant text."""

    def __init__(self) -> None:
        self.prose: list[str] = []  # text that is not an action, in order (the Thought)
        self.calls: list[dict] = []  # {"id", "name", "args"}; args None until an Action Input
        self.observations: list[str] = []

    def messages(self) -> list[dict]:
        content = "".join(self.prose).strip() or None
        if not self.calls:
            return [message("assistant", content)] if content else []
        calls = [_tool_call(c) for c in self.calls]
        turns = [message("assistant", content, calls)]
        for call, seen in zip(calls, self.observations, strict=False):
            turns.append(message("tool", seen, tool_call_id=call["id"], name=call["name"]))
        return turns


def _parse_turn(text: str, step: int) -> tuple[list[dict], list[dict]] | None:
    """(messages replacing the turn, calls left waiting for an observation), or None if no action parses."""
    blocks = _blocks(text)
    if not any(kind == "action" for kind, _, _ in blocks):
        found = _whole_json_calls(text) or _bare_call(text)
        if found is None:
            return None
        calls = [_tool_call({"id": f"text-call-{step}-{k}", "name": n, "args": a}) for k, (n, a) in enumerate(found)]
        return [message("assistant", None, calls)], list(calls)

    turns: list[dict] = []
    seg = _Segment()
    k = 0
    for kind, raw, body in blocks:
        if seg.observations and kind != "observation":  # the cycle is over: a new one starts
            turns += seg.messages()
            seg = _Segment()
        if kind == "action":
            parsed = _parse_action(body)
            if parsed is None:
                return None
            found, rest = parsed
            for name, args in found:
                seg.calls.append({"id": f"text-call-{step}-{k}", "name": name, "args": args})
                k += 1
            seg.prose.append(rest)
        elif kind == "action input":
            last = seg.calls[-1] if seg.calls else None
            if last is None or last["args"] is not None:
                return None  # an Action Input that no bare action name asked for
            last["args"] = _input_args(body)
        elif kind == "observation":
            if len(seg.observations) >= len(seg.calls):
                return None  # an observation with no action to answer
            seg.observations.append(body.strip())
        else:  # leading text, Thought, Final Answer
            seg.prose.append(raw)
    last = seg.messages()
    waiting = last[0]["tool_calls"][len(seg.observations) :] if seg.calls else []
    return turns + last, waiting


def _blocks(text: str) -> list[tuple[str | None, str, str]]:
    """(kind, raw text, text after the marker) for the text before the first marker (kind None)
    and each marked block; kinds are lower-case with single spaces ("action input")."""
    starts = list(MARKER.finditer(text))
    blocks: list[tuple[str | None, str, str]] = [(None, text[: starts[0].start()] if starts else text, "")]
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        kind = " ".join(m["kind"].lower().split())
        blocks.append((kind, text[m.start() : end], text[m.end() : end]))
    return blocks


def _parse_action(body: str) -> tuple[list[tuple[str, Any]], str] | None:
    """([(name, args)], leftover text) for the text after "Action:", or None."""
    body = body.strip()
    fenced = FENCE.match(body)
    if fenced:
        found = _whole_json_calls(fenced["body"])
        return (found, body[fenced.end() :]) if found else None
    if body[:1] in ("{", "["):
        try:
            value, end = _DECODER.raw_decode(body)
        except (ValueError, RecursionError):
            return None
        found = _json_calls(value)
        return (found, body[end:]) if found else None
    if BARE_NAME.fullmatch(body):
        return [(_name(body), None)], ""
    first, _, rest = body.partition("\n")
    for text, left in ((body, ""), (first.rstrip(), rest)):  # the call may be followed by more text
        if m := BRACKET_CALL.fullmatch(text):
            return [(_name(m["name"]), {"input": m["args"]})], left
        if m := PAREN_CALL.fullmatch(text):
            return [(_name(m["name"]), _paren_args(m["args"]))], left
    return None


def _bare_call(text: str) -> list[tuple[str, Any]] | None:
    """A turn that is one bracket action and nothing else ("click[Buy Now]"): agents prompted
    with "Action:" often drop the prefix."""
    text = text.strip()
    m = BRACKET_CALL.fullmatch(text) if "\n" not in text else None
    return [(_name(m["name"]), {"input": m["args"]})] if m else None


def _whole_json_calls(text: str) -> list[tuple[str, Any]] | None:
    """Calls from a text that is only JSON (or a ```json fence around it): a call object or a list of them."""
    text = text.strip()
    fenced = FENCE.fullmatch(text)
    if fenced:
        text = fenced["body"].strip()
    if text[:1] not in ("{", "["):
        return None
    try:
        return _json_calls(json.loads(text))
    except (ValueError, RecursionError):
        return None


def _json_calls(value: Any) -> list[tuple[str, Any]] | None:
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = next((item[k] for k in NAME_KEYS if k in item), None)
        arg_key = next((k for k in ARG_KEYS if k in item), None)
        if not isinstance(name, str) or not name.strip() or arg_key is None:
            return None
        args = item[arg_key]
        if isinstance(args, str) and isinstance(decoded := _json_value(args), dict):
            args = decoded  # OpenAI style: an object as JSON text
        found.append((_name(name), args if isinstance(args, dict) else {"input": args}))
    return found or None


def _input_args(text: str) -> dict:
    """An Action Input: a JSON object as is, other JSON as {"input": value}, plain text as {"input": text}."""
    value = _json_value(text)
    return value if isinstance(value, dict) else {"input": value}


def _json_value(text: str) -> Any:
    """The JSON value the text (or a ```json fence in it) holds, else the text itself, stripped."""
    text = text.strip()
    fenced = FENCE.fullmatch(text)
    if fenced:
        text = fenced["body"].strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _paren_args(text: str) -> dict:
    """f(...) arguments: keywords become an object; one positional argument becomes {"input": value}."""
    text = text.strip()
    if not text:
        return {}
    try:
        with warnings.catch_warnings():  # "invalid escape sequence" in a quoted argument
            warnings.simplefilter("ignore")
            tree = ast.parse(f"f({text})", mode="eval").body
        if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "f":
            args = {k.arg: _literal(k.value) for k in tree.keywords if k.arg is not None}
            if len(args) == len(tree.keywords) and not any(isinstance(a, ast.Starred) for a in tree.args):
                positional = [_literal(a) for a in tree.args]
                if positional:
                    args["input"] = positional[0] if len(positional) == 1 else positional
                json.dumps(args)  # arguments must be JSON (no sets, bytes, tuple keys)
                return args
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        pass
    return _key_values(text) or {"input": text}


def _key_values(text: str) -> dict | None:
    """k=v pairs with unquoted values (search(query=blue shoes, page=2)), if that is all the text holds."""
    pairs, pos = {}, 0
    while pos < len(text):
        m = KEY_VALUE.match(text, pos)
        if m is None or m.end() == pos:
            return None
        pairs[m["key"]] = m["value"].strip().strip("\"'")
        pos = m.end()
    return pairs or None


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return ast.unparse(node)  # a bare word (city=Paris) or an expression: kept as its text


def _name(name: str) -> str:
    name = name.strip()
    return "Finish" if name.lower() in FINISH_NAMES else name


def _tool_call(call: dict) -> dict[str, str]:
    args = {} if call["args"] is None else call["args"]
    return {"id": call["id"], "name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)}


GRAMMAR = Grammar("react", parse_react, "ReAct: Action: verb[argument] (also verb(args), JSON calls, "
                                        "Action Input:), observations in Observation: lines or the next turn, "
                                        "Finish[answer] the final report")
