"""A user's own text-action grammar, named in params (`ingest.grammars`):

    ingest:
      text_actions: shell          # or auto: detected among the built-ins and these
      grammars:
        shell:
          action: '^\\$ (?P<tool>\\w+) (?P<args>.*)$'  # named groups: tool, args, or any argument name
          observation: '^OUT: '                         # a user turn that starts so is the result (default: the next user turn)
          final: [answer]                               # tools whose call is the final report

`action` is searched in each assistant text turn (multi-line: ^ and $ match at line ends). The
call's name is its `tool` group (or the grammar's `tool`); its arguments are the `args` group
(a JSON object as is, any other text as {"input": text}) and every other named group that matched,
by its name. A call of a tool in `final` (any case) is the final report: a call named "Finish"
whose `input` is its argument. `observation` is matched at the start of the user turn right after
an action: its `result` group, else the text after the match, is the result; a user turn it does
not match is no result. Which tools write or read is `tools` in params (by name and argument
pattern: agenther/evidence/tools.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from agenther.adapters.grammar import FINISH, Grammar, call, one_call_per_turn


def regex_grammar(name: str, spec: dict[str, Any]) -> Grammar:
    """The grammar `spec` (params ingest.grammars.<name>) describes."""
    action = re.compile(spec["action"], re.MULTILINE)
    fixed_tool = spec.get("tool")
    observation = re.compile(spec["observation"]) if spec.get("observation") else None
    finals = {t.lower() for t in spec.get("final") or ()}

    def parse_turn(text: str, step: int) -> tuple[str | None, dict] | None:
        m = action.search(text)
        if m is None:
            return None
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        tool = groups.pop("tool", None) or fixed_tool
        if not tool:
            return None
        arguments = _arguments(groups.pop("args", None))
        arguments |= groups
        left = (text[: m.start()] + text[m.end():]).strip() or None
        if tool.lower() in finals:
            answer = arguments.get("input", next(iter(arguments.values()), ""))
            return left, call(step, FINISH, {"input": answer})
        return left, call(step, tool.strip(), arguments)

    def observe(text: str) -> str | None:
        if observation is None:
            return text
        m = observation.match(text)
        if m is None:
            return None
        found = m.groupdict().get("result")
        return found.strip() if found is not None else text[m.end():].strip()

    return Grammar(name, lambda messages: one_call_per_turn(messages, parse_turn, observe),
                   f"your grammar (ingest.grammars.{name}): {spec['action']}")


def _arguments(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"input": text.strip()}
    return value if isinstance(value, dict) else {"input": value}
