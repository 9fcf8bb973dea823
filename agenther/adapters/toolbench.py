"""ToolBench DFS answer files: one record per file, {answer_generation, tree, win, ...}.

`answer_generation.train_messages` holds one training prefix per step; the last one is the
whole conversation the search settled on. Legacy `function_call` turns become structured
tool calls with synthesized ids ("call_<message index>"); `function` turns become tool
results pointing at them. The `Finish` call is kept: it is the agent's last act.

Records with `valid_data: false` have no train_messages; we rebuild the conversation from
the DFS `tree` along the path the search ended on (see `path_from_tree`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

from agenther.adapters.adapter import Adapter, ReadContext
from agenther.adapters.common import (
    LogFile,
    Quarantined,
    RecordError,
    canonical_messages,
    convert_records,
    message,
    parse_jsonish,
    to_json,
    tool_call,
    type_name,
)

FORMAT = "toolbench"
FINISH = "Finish"
ROLES = {"function": "tool"}

# ToolBench's DFS system prompt, as logged in the answer files' train_messages, up to its tool
# list. Used only when rebuilding a conversation from the tree.
SYSTEM_PROMPT = (
    "You are AutoGPT, you can use many tools(functions) to do the following task.\n"
    "First I will give you the task description, and your task start.\n"
    "At each step, you need to give your thought to analyze the status now and what to do next, "
    "with a function call to actually excute your step.\n"
    "After the call, you will get the call result, and you are now in a new state.\n"
    "Then you will analyze your status now, then decide what to do next...\n"
    "After many (Thought-call) pairs, you finally perform the task, then you can give your finial answer.\n"
    "Remember: \n"
    "1.the state change is irreversible, you can't go back to one of the former state, "
    'if you want to restart the task, say "I give up and restart".\n'
    "2.All the thought is short, at most in 5 sentence.\n"
    "3.You can do more then one trys, so if your plan is to continusly try some conditions, "
    "you can do one of the conditions per try.\n"
    "Let's Begin!\n"
    "Task description: You should use functions to help handle the real time user querys. Remember:\n"
    '1.ALWAYS call "Finish" function at the end of the task. And the final answer should contain '
    "enough information to show to the user,If you can't handle the task, or you find that function "
    "calls always fail(the function is not valid now), use function Finish->give_up_and_restart.\n"
    "2.Do not use origin tool names, use only subfunctions' names.\n"
    "You have access of the following tools:\n"
)


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and "answer_generation" in record


def read(path: LogFile, ctx: ReadContext | None = None) -> Iterator[dict | Quarantined]:
    return convert_records(path, convert, repairs=ctx.repairs if ctx else None)


def _flag(value: Any, field: str) -> bool | None:
    """ToolBench booleans are sometimes the strings "True"/"False"."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RecordError(f"{field}: expected a boolean, got {value!r}")


def _count(value: Any, field: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise RecordError(f"{field}: expected an integer, got {type_name(value)}")


def convert(record: Any, path: LogFile, pointer: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"record is not an object (got {type_name(record)})")
    gen = parse_jsonish(record.get("answer_generation"), "answer_generation")
    if not isinstance(gen, dict):
        raise RecordError(f"answer_generation: expected an object, got {type_name(gen)}")
    query = gen.get("query")
    if not isinstance(query, str) or not query.strip():
        raise RecordError("answer_generation.query: missing or not text")
    functions = parse_jsonish(gen.get("function") or [], "answer_generation.function")
    tools = _tool_schemas(functions)
    win = _flag(record.get("win"), "win")
    valid = _flag(gen.get("valid_data"), "answer_generation.valid_data")

    prefixes = parse_jsonish(gen.get("train_messages") or [], "answer_generation.train_messages")
    if not isinstance(prefixes, list):
        raise RecordError(f"answer_generation.train_messages: expected a list, got {type_name(prefixes)}")
    from_tree = not prefixes
    if from_tree:
        messages = messages_from_tree(record.get("tree"), query, functions)
    else:
        n = len(prefixes) - 1
        messages = canonical_messages(prefixes[-1], f"answer_generation.train_messages[{n}]", ROLES)

    metadata = {
        "benchmark": FORMAT,
        "finish_type": gen.get("finish_type"),
        "valid_data": valid,
        "query_count": _count(gen.get("query_count"), "answer_generation.query_count"),
        "total_tokens": _count(gen.get("total_tokens"), "answer_generation.total_tokens"),
        "win": win,
        "reconstructed_from_tree": from_tree,
    }
    return {
        "id": f"{FORMAT}/{path.parent.name}/{path.stem}",
        "source_format": FORMAT,
        "source_file": str(path),
        "record_pointer": pointer,
        "task_key": f"{FORMAT}/{hashlib.sha1(query.encode()).hexdigest()[:12]}",
        "goal": query,
        "messages": messages,
        "tools": to_json(tools),
        "final_answer": _final_answer(messages, gen.get("final_answer")),
        "success": win,
        "reward": None if win is None else float(win),
        "metadata": to_json(metadata),
    }


def _tool_schemas(functions: Any) -> list[dict]:
    if not isinstance(functions, list):
        raise RecordError(f"answer_generation.function: expected a list, got {type_name(functions)}")
    schemas = []
    for i, fn in enumerate(functions):
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(f"answer_generation.function[{i}]: no function name")
        schema = {
            "name": fn["name"],
            "description": fn.get("description", ""),
            "parameters": fn.get("parameters"),
        }
        schemas.append({"type": "function", "function": schema})
    return schemas


def _final_answer(messages: list[dict], logged: Any) -> str | None:
    """The `final_answer` argument of the last Finish call, else of the logged Finish arguments.

    A give-up (return_type give_up_and_restart) has no final answer: null, not the last thought.
    """
    finish = next((c for m in reversed(messages) for c in m["tool_calls"] if c["name"] == FINISH), None)
    if finish is not None:
        try:
            args = parse_jsonish(finish["arguments"], "Finish arguments")
        except RecordError:
            args = None  # the model's own malformed JSON: fall back to the logged field
        if isinstance(args, dict) and isinstance(args.get("final_answer"), str):
            return args["final_answer"]
    if isinstance(logged, str) and logged.strip():
        args = parse_jsonish(logged, "answer_generation.final_answer")
        if isinstance(args, dict) and isinstance(args.get("final_answer"), str):
            return args["final_answer"]
    return None


# --- rebuilding a conversation from the DFS tree -------------------------------------------


def _children(node: dict) -> list:
    children = node.get("children") or []
    return children if isinstance(children, list) else []


def path_from_tree(tree: Any) -> list[dict]:
    """The root-to-node path where the depth-first search stopped.

    DFS numbers each state it expands (`expand_num`, on "Action Input" nodes), so the node with
    the largest number is the last state the search reached: the run as it actually ended, not
    an abandoned branch. Ties (or no numbers at all) go to the deepest node, first in tree order.
    On the shipped valid records this path reproduces train_messages call for call.
    """
    tree = parse_jsonish(tree, "tree")
    root = tree.get("tree", tree) if isinstance(tree, dict) else None
    if not isinstance(root, dict) or "node_type" not in root:
        raise RecordError("tree: no DFS tree (train_messages empty too)")
    best: tuple[int, int] = (-1, -1)
    best_path: list[dict] = []
    stack: list[list[dict]] = [[root]]
    while stack:  # iterative pre-order: trees can be deeper than Python's recursion limit
        path = stack.pop()
        node = path[-1]
        try:
            expand = int(float(node.get("expand_num", 0)))
        except (TypeError, ValueError):
            expand = 0
        if (expand, len(path)) > best:
            best, best_path = (expand, len(path)), path
        stack.extend(path + [c] for c in reversed(_children(node)) if isinstance(c, dict))
    if len(best_path) < 2:
        raise RecordError("tree: the search expanded no node")
    return best_path


def messages_from_tree(tree: Any, query: str, functions: Any) -> list[dict]:
    """System + user turns built from the query, then one assistant turn per Thought/Action/Action
    Input triple along `path_from_tree`, each followed by its observation as a tool turn.

    ToolBench's "previous attempts failed" diversity prompts are not stored in the tree, so they
    are absent here; the system prompt lists tool names only (tool descriptions are not stored).
    """
    tool_names: list[str] = []
    for fn in functions if isinstance(functions, list) else []:
        found = re.search(r'subfunction for tool "([^"]+)"', str(fn.get("description", "")))
        if found and found.group(1) not in tool_names:
            tool_names.append(found.group(1))
    listing = "".join(f"{i}.{name}\n" for i, name in enumerate(tool_names, start=1))
    messages = [message("system", SYSTEM_PROMPT + listing), message("user", f"\n{query}\nBegin!\n")]

    thought: str | None = None
    action: str | None = None
    for depth, node in enumerate(path_from_tree(tree)[1:], start=1):  # the root is the empty start
        kind, text = node.get("node_type"), node.get("description")
        if kind == "Thought":
            if thought is not None:  # two thoughts in a row: the first stands alone
                messages.append(message("assistant", thought))
            thought = text
        elif kind == "Action":
            action = text
        elif kind == "Action Input":
            if not action:
                raise RecordError(f"tree: Action Input at depth {depth} has no Action before it")
            call = tool_call(f"call_{len(messages)}", action, text)
            messages.append(message("assistant", thought or None, [call]))
            # No result turn after Finish, as in train_messages: the run is over.
            if action != FINISH and node.get("observation") is not None:
                messages.append(
                    message("tool", str(node["observation"]), tool_call_id=call["id"], name=action)
                )
            thought = action = None
        else:
            raise RecordError(f"tree: unknown node_type {kind!r} at depth {depth}")
    if thought is not None:
        messages.append(message("assistant", thought))
    return messages


ADAPTER = Adapter(
    name=FORMAT, looks_like=lambda record, ctx: looks_like(record), read=read,
    expects="toolbench (answer_generation)", failure_signals=True,  # finish_type, give-ups
)
