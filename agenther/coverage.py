"""The coverage judge (deterministic): the hindsight prompt and the sample cover each other.

Both ways:
- every write the sample trains on is asked for: the prompt names the action (tools.Tools.requested)
  and each of its identifying values (IDs, flight numbers, dates, names, amounts, enum choices)
  appears in the prompt or in the user's own turns inside the sample (they are part of the
  request the model sees); a miss is `unrequested_action`;
- every requirement of the prompt is met by the sample: each detail it names (grounding.facts)
  occurs in the sample, it asks for no write the sample does not contain, and it asks for no
  other value of an enum parameter than the one the sample's write used; a miss is
  `unmet_requirement`.
It needs no LLM, so it runs before the LLM judges (and inside the relabel gate, where a miss is
fed back to the relabeler as the reason of its retry).
"""

from __future__ import annotations

import re

from agenther.goal import AchievedGoal, identifying_values
from agenther.grounding import ISO_DATE, MONTHS, ungrounded
from agenther.render import tool_calls
from agenther.tools import Tools, words

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def misses(prompt: str, goal: AchievedGoal, row: dict, params: dict | None = None) -> list[tuple[str, str]]:
    """(reason, detail) of every way the prompt and the sample fail to cover each other."""
    messages = row["messages"][: goal.sample_end]
    tools = Tools.of(row.get("tools"), params)
    known = tools.write_names(c["name"] for c in tool_calls(row["messages"]))
    done = {a.tool for a in goal.actions}
    request = "\n".join([prompt, *goal.user_words])
    found: list[tuple[str, str]] = []
    for a in goal.actions:
        if not tools.requested(a.tool, prompt, known):
            found.append(("unrequested_action", f"the prompt does not ask for {a.tool} (step {a.call_step})"))
            continue
        missing = [v for v in _required(a.arguments) if not asked(v, request)]
        if missing:
            found.append(("unrequested_action",
                          f"{a.tool} (step {a.call_step}) uses {', '.join(map(repr, missing))}, which the request "
                          "does not name"))
    for w in known:
        if w not in done and tools.requested(w, prompt, known):
            found.append(("unmet_requirement", f"the prompt asks for {w}, which the sample does not do"))
    wrong = _other_enum_values(prompt, goal, tools)
    found += [("unmet_requirement", w) for w in wrong]
    absent = ungrounded(prompt, messages)
    if absent:
        found.append(("unmet_requirement", "the sample never mentions " + ", ".join(absent)))
    return found


def _required(arguments: dict) -> list[str]:
    """The identifying values a request must name: not zeros, not yes/no flags."""
    return [v for v in identifying_values(arguments) if v not in ("0", "") and v.lower() not in ("no", "yes", "none")]


def asked(value: str, text: str) -> bool:
    """Does `text` name `value` (a date in any usual spelling, a small number as a word, an enum
    choice with spaces for underscores)?"""
    low = text.lower()
    if ISO_DATE.fullmatch(value):
        year, month, day = value.split("-")
        name = MONTHS[int(month) - 1]
        spoken = rf"\b{name[:3]}[a-z]*\.?\s+{int(day)}(st|nd|rd|th)?\b|\b{int(day)}(st|nd|rd|th)?\s+(of\s+)?{name[:3]}"
        return value in low or re.search(spoken, low) is not None or f"{int(month)}/{int(day)}" in low
    if value.isdigit() and int(value) < len(NUMBER_WORDS) and re.search(rf"\b{NUMBER_WORDS[int(value)]}\b", low):
        return True
    phrase = " ".join(words(value)) if not re.search(r"\d", value) else value.lower()
    if not phrase:
        return True
    haystack = " ".join(words(low)) if phrase != value.lower() else low
    return re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", haystack) is not None


def _other_enum_values(prompt: str, goal: AchievedGoal, tools: Tools) -> list[str]:
    low = " ".join(words(prompt))
    out = []
    for a in goal.actions:
        props = ((tools.schemas.get(a.tool) or {}).get("parameters") or {}).get("properties") or {}
        for key, value in a.arguments.items():
            enum = (props.get(key) or {}).get("enum")
            if not isinstance(enum, list) or value not in enum:
                continue
            mine = " ".join(words(str(value)))
            for other in enum:
                phrase = " ".join(words(str(other)))
                if (other != value and phrase and phrase not in mine
                        and re.search(rf"\b{re.escape(phrase)}\b", low)):
                    out.append(f"the prompt asks for {key} {other!r}; the sample's {a.tool} used {value!r}")
    return out
