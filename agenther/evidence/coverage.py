"""The coverage judge (deterministic): the sample's user side and the sample cover each other.

The request is the whole user side of the conversation (the opening and every later user turn, as
the trainer sees them after the relabeler's rewrites), not its first line. Both ways:
- every write the sample trains on is asked for by the user turns BEFORE it: they name the action
  (tools.Tools.requested) and each of its identifying values (IDs, flight numbers, dates, names,
  amounts, enum choices), or a lookup the agent made by values they name implies them; a miss is
  `unrequested_action`;
- every requirement of the user side is met by the sample: each detail a rewritten turn names
  (grounding.facts) occurs in the sample, it asks for no write the sample does not contain, and
  for no other value of an enum parameter than the one the sample's write used; a miss is
  `unmet_requirement`.
It needs no LLM, so it runs before the LLM judges (and inside the relabel gate, where a miss is
fed back to the relabeler as the reason of its retry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agenther.evidence.goal import (
    EXEMPT_KEYS,
    ID_LIKE,
    AchievedGoal,
    Action,
    evidence_messages,
    identifying_values,
    other_enum_values,
)
from agenther.evidence.grounding import ISO_DATE, MONTHS, ungrounded
from agenther.evidence.text_evidence import goal_calls
from agenther.evidence.tools import Tools, words
from agenther.evidence.turns import change_words, requests_in
from agenther.params import Params

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def misses(user_side: list[tuple[int, str]], goal: AchievedGoal, row: dict, params: Params | None = None,
           rewritten: Iterable[int] = ()) -> list[tuple[str, str]]:
    """(reason, detail) of every way the sample's user side (its user turns: run step, text as the
    trainer sees it) and the sample fail to cover each other. `rewritten`: the steps of the turns the
    relabeler wrote, whose details must occur in the rest of the sample."""
    rewritten = set(rewritten)
    messages = evidence_messages(row["messages"], goal)
    tools = Tools.of(row.get("tools"), params)
    every = goal_calls(row, tools)
    calls = [c for c in every if goal.start <= c["step"] < goal.sample_end]
    known = tools.write_names(c["name"] for c in every)
    done = {a.tool for a in goal.actions}
    request = "\n".join(text for _, text in user_side)
    found: list[tuple[str, str]] = []
    for a in goal.actions:
        before = "\n".join(text for step, text in user_side if step < a.call_step)
        if not tools.requested(a.tool, before, known):
            found.append(("unrequested_action", f"no user turn before step {a.call_step} asks for {a.tool}"))
            continue
        missing = unnamed(a, before, calls, tools)
        if missing:
            found.append(
                (
                    "unrequested_action",
                    f"{a.tool} (step {a.call_step}) uses {', '.join(map(repr, missing))}, which no user turn "
                    "before it names",
                )
            )
    asks = "\n".join(requests_in(text) for _, text in user_side)  # not what the user says they do not want
    for w in known:
        if w not in done and tools.requested(w, asks, known):
            found.append(("unmet_requirement", f"the user asks for {w}, which the sample does not do"))
    asked_verbs = set().union(*(change_words(text) for _, text in user_side))
    done_verbs = set().union(*(tools.request_words(a.tool, known)[0] for a in goal.actions))
    if asked_verbs - done_verbs:  # a change the sample makes no write for (its tool may be unknown)
        found.append(
            (
                "unmet_requirement",
                f"the user asks to {', '.join(sorted(asked_verbs - done_verbs))}, "
                "which no write of the sample does",
            )
        )
    if not goal.actions and not _names_a_fact(request, goal):  # the question itself says what it is about
        found.append(
            (
                "unmet_requirement",
                "the user side names nothing the agent looked up or reported (no ID, name or "
                "value of its lookups or answers): it may ask for anything",
            )
        )
    found += [("unmet_requirement", f"the user names {given!r}, the answer the sample gives: a question names "
                                    "what it asks about, not its answer")
              for given in gives_away(request, goal)]
    found += [("unmet_requirement", "the user " + w) for w in other_enum_values(request, goal, tools)]
    found += [
        ("unmet_requirement", f"the user names {key.replace('_', ' ')} {value}, which no write of the sample acts on")
        for key, value in bystanders(request, goal, calls)
    ]
    absent = ungrounded("\n".join(text for step, text in user_side if step in rewritten), messages)
    if absent:
        found.append(("unmet_requirement", "the sample never mentions " + ", ".join(absent)))
    return found


def gives_away(request: str, goal: AchievedGoal) -> list[str]:
    """The items of the goal's final answers (text agents' Finish[...]) that the request already names:
    "What was the name of the bridge that opened in 1874?" answered "1874" asks nothing."""
    return [item for f in goal.facts for item in f.answer if asked(item, request)]


def bystanders(prompt: str, goal: AchievedGoal, calls: list[dict]) -> list[tuple[str, str]]:
    """(key, value) of the entities the prompt names that are of a kind the sample's writes act on
    (a reservation ID where the writes cancel reservations) but that no write acts on: "cancel
    IFOYYZ and NQNU5R" where only NQNU5R was cancelled asks for more than the sample does."""
    keys = {k for a in goal.actions for k in a.arguments if _is_key(k)}
    acted_on = {str(v) for a in goal.actions for k, v in a.arguments.items() if _is_key(k)}
    seen: dict[str, str] = {}
    for c in calls:
        for key, value in keyed_values(c["arguments"], keys):
            seen.setdefault(value, key)
    return [(key, v) for v, key in seen.items() if v not in acted_on and asked(v, prompt)]


def keyed_values(arguments: dict, keys: set[str]) -> list[tuple[str, str]]:
    """(key, value) of every string value of `arguments` (nested) under one of `keys`."""
    out: list[tuple[str, str]] = []
    for k, v in arguments.items():
        if k in keys and isinstance(v, str) and v.strip():
            out.append((k, v.strip()))
        elif isinstance(v, dict):
            out += keyed_values(v, keys)
    return out


def unnamed(action: Action, request: str, calls: list[dict], tools: Tools) -> list[str]:
    """The identifying values of a write that the request neither names nor implies. The entity
    it acts on (a non-account `*_id` argument: the reservation to cancel) must be named; any other
    value may instead follow from a lookup the agent made, before the write, by IDs the request
    names or an earlier such lookup returned (the flights of reservation FQ8APE, from its details;
    the reservations of user ID mia_li_3668, then their details: the user need not list them)."""
    known, results = request, []
    for c in calls:
        if c["step"] >= action.call_step or tools.kind(c["name"]) != "read" or c["result_step"] is None:
            continue
        keys = [v for v in identifying_values(c["arguments"], exempt=False) if ID_LIKE.match(v)]
        if keys and all(asked(k, known) for k in keys):
            results.append(c["result"] or "")
            known += "\n" + results[-1]
    looked_up = "\n".join(results).lower()
    primary = set(_required({k: v for k, v in action.arguments.items() if _is_key(k)}))
    # a bare number (3 bags) is the user's choice: a lookup's "3" somewhere in its result implies nothing
    return [
        v
        for v in _required(action.arguments)
        if not asked(v, request)
        and (v in primary or v.isdigit() or not re.search(rf"(?<![\w]){re.escape(v.lower())}(?![\w])", looked_up))
    ]


def _is_key(name: str) -> bool:
    return name.lower().endswith("id") and not EXEMPT_KEYS.search(name)


def required_details(goal: AchievedGoal, row: dict, params: Params | None = None) -> list[str]:
    """What a request for this goal must name (the coverage check's own list, shown to the relabeler):
    the identifying values of every write that no lookup by its named IDs implies, in order, once;
    for a goal of facts only, the values the agent reported (naming one is enough)."""
    if not goal.actions:
        return list(dict.fromkeys(fact_subjects(goal)))
    tools = Tools.of(row.get("tools"), params)
    calls = goal_calls(row, tools)
    keys = [v for a in goal.actions for k, v in a.arguments.items() if _is_key(k) and isinstance(v, str)]
    request = "\n".join([*keys, *goal.user_words])
    return list(
        dict.fromkeys(
            v
            for a in goal.actions
            for v in [
                *_required({k: x for k, x in a.arguments.items() if _is_key(k)}),
                *unnamed(a, request, calls, tools),
            ]
        )
    )


def fact_subjects(goal: AchievedGoal) -> list[str]:
    """What a question about the goal's facts may name, one or more: what the agent looked up (the
    arguments of the reads the report rests on), then the values it reported."""
    looked_up = [v for f in goal.facts for r in f.reads for v in _required(r.arguments, exempt=False)]
    return [*looked_up, *(v for f in goal.facts for v in f.values if v not in f.answer)]  # not the answer asked for


def _names_a_fact(text: str, goal: AchievedGoal) -> bool:
    return any(asked(v, text) for v in fact_subjects(goal))


def _required(arguments: dict, exempt: bool = True) -> list[str]:
    """The identifying values a request must name: not zeros, not yes/no flags."""
    return [
        v
        for v in identifying_values(arguments, exempt=exempt)
        if v not in ("0", "") and v.lower() not in ("no", "yes", "none")
    ]


def asked(value: str, text: str) -> bool:
    """Does `text` name `value` (a date in any usual spelling, a small number as a word, an enum
    choice with spaces for underscores)?"""
    low = text.lower()
    if ISO_DATE.fullmatch(value):
        year, month, day = value.split("-")
        name = MONTHS[int(month) - 1]
        spoken = rf"\b{name[:3]}[a-z]*\.?\s+{int(day)}(st|nd|rd|th)?\b|\b{int(day)}(st|nd|rd|th)?\s+(of\s+)?{name[:3]}"
        return value in low or re.search(spoken, low) is not None or f"{int(month)}/{int(day)}" in low
    if (
        value.isdigit()
        and int(value) < len(NUMBER_WORDS)
        and re.search(rf"\b{NUMBER_WORDS[int(value)]}\b", low)
    ):
        return True
    phrase = " ".join(words(value)) if not re.search(r"\d", value) else value.lower()
    if not phrase:
        return True
    haystack = " ".join(words(low)) if phrase != value.lower() else low
    # the substring test first: most values are not in most texts, and it costs a tenth of the regex
    return phrase in haystack and re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", haystack) is not None
