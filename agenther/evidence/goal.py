"""The achieved goal of a failed run, computed from what it did, and the sample that proves it.

Hindsight Experience Replay works because the achieved goal is a function of what happened.
For a tool-using agent that is:
- actions: the write calls that succeeded (tool, arguments, call and result steps). An error
  result is never an achievement, and neither is a write the agent was not allowed to make:
  where the log carries ground truth (tau-bench's expected actions), a write of a kind the
  correct run never makes (or, in a run classified constraint_violation, any write the correct
  run does not make) is a violation, and the sample ends before the first violation;
- facts: values that successful read results returned and the agent then told the user,
  each pointing at the report and the results it rests on.

The sample is a window of the run: from an opening user turn (`start`) to the cut after the last
step that evidences the goal (keeping the assistant's report right after it). Which window, and
how its user turns must change to ask for this goal, is agenther.evidence.conversation's job.
Assistant turns that do not contribute (failed calls, repeated calls, reads nothing uses)
stay as context with weight 0; `train_steps` are the assistant turns that train.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from typing import Any

from pydantic import BaseModel

from agenther.evidence import grounding
from agenther.evidence.grounding import ISO_DATE
from agenther.evidence.text_evidence import describe_page_write, supported_answers
from agenther.evidence.tools import Tools, is_error, words

MAX_FACTS = 6
REPORT_CHARS = 300
MAX_READS = 3  # lookups kept per fact (the last ones before the report)
ID_LIKE = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9][\w-]{2,}$")  # HAT050, MZDDS4, credit_card_7
# Arguments that identify what a write acts on must be asked for; these keys follow from the
# user's account instead (a natural request says "with my credit card", not its id).
EXEMPT_KEYS = re.compile(r"payment|dob|birth|email|address|phone|zip|user_?id|^url$", re.I)


class Action(BaseModel):
    tool: str
    arguments: dict[str, Any]
    call_step: int
    result_step: int
    # What the agent saw right before a write by text (the page a button was pressed on: item,
    # title, price; text_evidence.acted_calls): a request may name these, need not.
    seen: dict[str, str] = {}


class Fact(BaseModel):
    text: str  # what the agent told the user (cut to REPORT_CHARS)
    values: list[str]  # the values from read results that the report states
    steps: list[int]  # the report's step, then the result steps it rests on
    reads: list[Action] = []  # the lookups whose results it states (what a question about it names)
    # A final answer's items, when the fact is an answer the observations support (text_evidence):
    # a question about it asks for them, so it must not name them.
    answer: list[str] = []


class Excluded(BaseModel):
    tool: str
    call_step: int
    reason: str  # error_result | not_allowed


class TurnEdit(BaseModel):
    """How one user turn of the sample must change so the conversation asks for the achieved goal
    (planned by agenther.evidence.conversation, written by the relabeler, checked by the gate)."""
    step: int  # the user turn (a step of the run)
    opening: bool = False  # it opens the sample: the first thing the user says
    ask: list[str] = []  # write tools it must ask for
    question: bool = False  # it must ask what the agent's report answers (a goal of facts only)
    name: list[str] = []  # values it must name
    hold: list[str] = []  # values it must not name yet: a later user turn gives them, where the agent asks
    unsay: list[str] = []  # values (IDs, dates) it must no longer name: no call of the sample uses them
    unask: list[str] = []  # writes or changes it must no longer ask for: no write of the goal makes them
    instead: dict[str, str] = {}  # another value of an enum -> the value the run used
    keep: list[str] = []  # values of the original turn that the agent then used: they stay


class AchievedGoal(BaseModel):
    actions: list[Action] = []
    facts: list[Fact] = []
    excluded: list[Excluded] = []
    start: int = 0  # the sample's opening user turn: the run's turns before it (after the system prompt) are left out
    sample_end: int  # the sample is messages[start:sample_end], after the system prompt
    train_steps: list[int] = []  # assistant steps of the sample with weight 1 (the others: 0)
    user_words: list[str] = []  # the user's turns inside the sample, after the opening
    edits: list[TurnEdit] = []  # the user turns the relabeler rewrites (none: the conversation already fits)

    def evidence_steps(self) -> set[int]:
        steps = {s for a in self.actions for s in (a.call_step, a.result_step)}
        return steps | {s for f in self.facts for s in f.steps}


class NoGoal(BaseModel):
    reason: str  # no_evidenced_achievement | turn_conflict | no_user_turn
    detail: str


SCAN_CHARS = 65_536  # of one turn's text that the turn-by-turn rules read


def scanned(text: str | None) -> str:
    """The part of a turn's text the turn-by-turn rules read: an ID or detail an agent goes on to use
    is near the start of a tool result; a 50 MB result must not be copied into every check."""
    return (text or "")[:SCAN_CHARS]


def first_user_index(messages: list[dict]) -> int | None:
    return next((i for i, m in enumerate(messages) if m["role"] == "user"), None)


def sample_steps(messages: list[dict], goal: AchievedGoal) -> list[int]:
    """The run steps of the sample, in order: the system turns before the run's first user turn,
    then messages[start:sample_end]."""
    first = first_user_index(messages)
    if first is None:
        raise ValueError("the trajectory has no user turn")
    return [*range(first), *range(max(goal.start, first), goal.sample_end)]


def evidence_messages(messages: list[dict], goal: AchievedGoal) -> list[dict]:
    """What a rewritten user turn's details may come from: the sample as the run had it (what the
    agent did and saw, and what the user said), without the run's first user turn, which states the
    failed goal (details copied from it would ask for what the run did not do)."""
    first = first_user_index(messages)
    return [messages[i] for i in sample_steps(messages, goal) if i != first]


def rewrites_of(row: dict) -> dict[int, str]:
    """step -> text of the sample's rewritten user turns (the relabeled table's `rewrites` column)."""
    return {int(r["step"]): r["after"] for r in json.loads(row.get("rewrites") or "[]")}


def sample_messages(messages: list[dict], goal: AchievedGoal, rewrites: dict[int, str]) -> list[dict]:
    """The sample as trained on: the run's system turns, then its turns from the opening (`start`) to
    the cut (`sample_end`), each rewritten user turn (step -> text) in place of the original. Tool calls
    and results never change."""
    return [{**messages[i], "content": rewrites[i]} if i in rewrites else messages[i]
            for i in sample_steps(messages, goal)]


def metadata_of(row: dict) -> dict:
    """The row's benchmark metadata (ground truth and the like); {} when absent or unreadable."""
    try:
        meta = json.loads(row.get("metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def not_allowed(calls: list[dict], tools: Tools, meta: dict, failure_type: str | None) -> dict[int, str]:
    """call step -> why: the successful writes that are violations by the log's ground truth."""
    gt = meta.get("gt_actions")
    if not isinstance(gt, list):
        return {}
    writes = [(str(a.get("name")), a.get("kwargs") if isinstance(a.get("kwargs"), dict) else {})
              for a in gt if isinstance(a, dict) and tools.is_write(str(a.get("name")))]
    expected = Counter(_canonical(name, kwargs) for name, kwargs in writes)
    kinds = {name for name, _ in writes}
    out: dict[int, str] = {}
    for c in calls:
        if not tools.is_write(c["name"]) or is_error(c["result"]):
            continue
        key = _canonical(c["name"], c["arguments"])
        if c["name"] not in kinds:
            out.setdefault(c["step"], f"step {c['step']} {c['name']}: the correct run makes no {c['name']}")
        elif expected[key] > 0:
            expected[key] -= 1
        elif failure_type == "constraint_violation":
            out.setdefault(
                c["step"],
                f"step {c['step']} {c['name']}: a write the correct run does not make "
                "in a run that broke a constraint",
            )
    return out


def _canonical(name: str | None, arguments: dict) -> str:
    return f"{name}({json.dumps(arguments, sort_keys=True, separators=(',', ':'))})"


def goal_within(messages: list[dict], calls: list[dict], tools: Tools, start: int, end: int,
                violations: dict[int, str]) -> AchievedGoal:
    """The goal the turns messages[start:end] achieve by themselves: the writes called and answered
    inside them, the facts reported inside them from reads inside them, with the sample that proves it."""
    actions, excluded = [], []
    for c in calls:
        if not tools.is_write(c["name"]) or c["step"] < start:
            continue
        if c["step"] in violations:
            excluded.append(Excluded(tool=c["name"], call_step=c["step"], reason="not_allowed"))
        elif is_error(c["result"]) or c["result_step"] is None:
            excluded.append(Excluded(tool=c["name"], call_step=c["step"], reason="error_result"))
        elif c["result_step"] < end:
            actions.append(
                Action(tool=c["name"], arguments=c["arguments"], call_step=c["step"], result_step=c["result_step"],
                       seen=c.get("seen") or {})
            )
    facts = _facts(messages, calls, tools, start, end)
    facts = sorted(facts + _answer_facts(messages, calls, tools, start, end, facts),
                   key=lambda f: f.steps[0])[-MAX_FACTS:]
    return with_sample(messages, calls, tools, actions, facts, excluded, start, end)


def with_sample(messages: list[dict], calls: list[dict], tools: Tools, actions: list[Action], facts: list[Fact],
                excluded: list[Excluded], start: int, end: int) -> AchievedGoal:
    """The goal with its sample: from the opening `start`, cut after the last evidencing step (and
    the report after it)."""
    last = max([a.result_step for a in actions] + [f.steps[0] for f in facts], default=-1)
    sample_end = min(end, last + 1)
    if sample_end < end and _is_report(messages[sample_end]):
        sample_end += 1  # the assistant's report of what was done
    while sample_end > start and messages[sample_end - 1]["role"] != "assistant":
        sample_end -= 1  # a sample ends where the model last spoke
    goal = AchievedGoal(
        actions=actions, facts=facts, excluded=excluded, start=start, sample_end=sample_end,
        user_words=[(messages[i].get("content") or "").strip()
                    for i in range(start + 1, sample_end) if messages[i]["role"] == "user"],
    )
    goal.train_steps = _train_steps(messages, calls, tools, goal)
    return goal


def _is_report(message: dict) -> bool:
    return (
        message["role"] == "assistant"
        and not message.get("tool_calls")
        and bool((message.get("content") or "").strip())
    )


# -- facts: what read results returned and the agent told the user ------------------------------
@functools.lru_cache(maxsize=4096)  # a result is looked at for every window of its run that could hold it
def result_values(result: str | None) -> frozenset[str]:
    """Specific values in a tool result: IDs, dates, numbers of 2+ digits, short phrases."""
    out: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int | float):
            if len(str(abs(int(value)))) >= 2:
                out.add(str(value).removesuffix(".0"))
        elif isinstance(value, str):
            text = value.strip()
            if text[:1] in "[{":
                try:
                    return walk(json.loads(text))
                except json.JSONDecodeError:
                    pass
            if (
                ID_LIKE.match(text)
                or ISO_DATE.fullmatch(text)
                or (2 <= len(text.split()) <= 12 and len(text) <= 120)
            ):
                out.add(text)
            elif len(text) > 120:
                out.update(t for t in re.findall(r"[\w-]+", text) if ID_LIKE.match(t))

    if result:
        try:
            walk(json.loads(result))
        except json.JSONDecodeError:
            walk(result)
    return frozenset(out)


def _facts(messages: list[dict], calls: list[dict], tools: Tools, start: int, end: int) -> list[Fact]:
    reads = [
        c
        for c in calls
        if tools.kind(c["name"]) == "read"
        and c["step"] >= start
        and c["name"] != "Finish"
        and c["result_step"] is not None
        and not is_error(c["result"])
    ]
    facts = []
    found = [result_values(c["result"]) for c in reads]  # once per read, not once per report
    for step, text in _reports(messages, calls, start, end):
        low = text.lower()
        values, steps, looked_up = [], [], []
        for c, returned in zip(reads, found, strict=True):
            if c["result_step"] >= step:
                continue
            # IDs first: what a question about the report would name
            said = sorted((v for v in returned if _said(v, low)),
                          key=lambda v: (not ID_LIKE.match(v) or v.islower(), v))
            if said:
                values += [v for v in said if v not in values]
                steps.append(c["result_step"])
                looked_up.append(Action(tool=c["name"], arguments=c["arguments"], call_step=c["step"],
                                        result_step=c["result_step"]))
        if values:
            facts.append(
                Fact(
                    text=" ".join(text.split())[:REPORT_CHARS],
                    values=values[:12],
                    steps=[step, *sorted(set(steps))],
                    reads=looked_up[-MAX_READS:],
                )
            )
    return facts[-MAX_FACTS:]


def _answer_facts(messages: list[dict], calls: list[dict], tools: Tools, start: int, end: int,
                  facts: list[Fact]) -> list[Fact]:
    """Facts of final answers checked against text observations (agenther.evidence.text_evidence):
    a Finish answer whose words occur in the read results before it, or a yes/no answer whose
    reasoning states values those results hold. An answer they do not support is no fact. An
    answer already a fact by the values `_facts` found in it stays as `_facts` made it."""
    have = {f.steps[0] for f in facts}
    return [
        Fact(text=" ".join(s.text.split())[:REPORT_CHARS], values=s.values,
             steps=[s.step, *sorted({r["result_step"] for r in s.reads})],
             reads=[Action(tool=r["name"], arguments=r["arguments"], call_step=r["step"], result_step=r["result_step"])
                    for r in s.reads][-MAX_READS:], answer=s.answer)
        for s in supported_answers(messages, calls, tools, start, end) if s.step not in have
    ]


def _reports(messages: list[dict], calls: list[dict], start: int, end: int) -> list[tuple[int, str]]:
    """(step, text) of what the agent told the user in messages[start:end]: its text turns, and the
    final answer of a Finish call (ToolBench, ReAct)."""
    out = [(i, messages[i]["content"]) for i in range(start, end) if _is_report(messages[i])]
    for c in calls:
        if (
            c["name"] == "Finish"
            and start <= c["step"] < end
            and c["arguments"].get("return_type") != "give_up_and_restart"
        ):
            answer = c["arguments"].get("final_answer") or c["arguments"].get("input")
            if isinstance(answer, str) and answer.strip():
                out.append((c["step"], answer))
    return sorted(out)


def _said(value: str, low_text: str) -> bool:
    """`value` occurs in `low_text` as a whole word: no word character (re's \\w: alphanumeric or
    "_") right before or after it. A find loop, not a regex: one regex per value overflowed re's
    cache of compiled patterns and extract spent a third of its time compiling them."""
    v = value.lower()
    if len(v) < 2:
        return False
    start = low_text.find(v)
    while start >= 0:
        end = start + len(v)
        before = low_text[start - 1] if start else " "
        after = low_text[end] if end < len(low_text) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return True
        start = low_text.find(v, start + 1)
    return False


# -- which assistant turns train ---------------------------------------------------------------
def identifying_values(arguments: dict, exempt: bool = True) -> list[str]:
    """The values that say what a write acts on: IDs, dates, amounts, enum-like words, names;
    not the ones that follow from the user's account (EXEMPT_KEYS) unless `exempt` is False."""
    return [v for _, v in argument_values(arguments, EXEMPT_KEYS if exempt else None)]


def argument_values(arguments: dict, skip: re.Pattern | None = None) -> list[tuple[str, str]]:
    """(leaf key, value) of every scalar argument, nested ones included, in order; none under a key
    `skip` matches."""
    out: list[tuple[str, str]] = []

    def walk(key: str, value: Any) -> None:
        if skip is not None and skip.search(key):
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k, v)
        elif isinstance(value, list):
            for v in value:
                walk(key, v)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int | float):
            out.append((key, str(value).removesuffix(".0")))
        elif isinstance(value, str) and value.strip():
            out.append((key, value.strip()))

    for k, v in arguments.items():
        walk(k, v)
    return out


def _train_steps(messages: list[dict], calls: list[dict], tools: Tools, goal: AchievedGoal) -> list[int]:
    action_steps = {a.call_step for a in goal.actions}
    fact_results = {s for f in goal.facts for s in f.steps[1:]}
    needed = [v.lower() for a in goal.actions for v in identifying_values(a.arguments) if len(v) >= 3]
    needed += [v.lower() for f in goal.facts for v in f.values]
    needed += [v.lower() for a in goal.actions for v in a.seen.values() if len(v) >= 3]  # the page it acted on
    chosen = {v.lower() for a in goal.actions for v in identifying_values(a.arguments)}
    by_step: dict[int, list[dict]] = {}
    for c in calls:
        by_step.setdefault(c["step"], []).append(c)
    seen: set[str] = set()
    train = []
    for i in range(goal.start, goal.sample_end):
        m = messages[i]
        if m["role"] != "assistant":
            continue
        if not m.get("tool_calls"):
            train.append(i)
            continue
        useful = False
        for c in by_step.get(i, []):
            key = _canonical(c["name"], c["arguments"])
            # a final report gets no reply (ReAct's Finish[...]): it has not failed for that
            repeated = key in seen
            failed = (is_error(c["result"]) or c["result_step"] is None) and not _final_report(c)
            seen.add(key)
            if repeated or failed:
                continue
            if i in action_steps or c["result_step"] in fact_results or _final_report(c):
                useful = True
            elif tools.kind(c["name"]) == "read":
                result = (c["result"] or "").lower()
                useful = useful or any(v in result for v in needed) or _chooses(c, chosen)
        if useful:
            train.append(i)
    return train


def _final_report(call: dict) -> bool:
    return call["name"] == "Finish" and call["arguments"].get("return_type") != "give_up_and_restart"


def _chooses(call: dict, chosen: set[str]) -> bool:
    """A read that selects a value a write of the goal then uses (a text agent's click on "size 9"
    before pressing "Buy Now"; a lookup by the ID the write acts on)."""
    return bool(chosen) and not chosen.isdisjoint(v.lower() for v in identifying_values(call["arguments"], exempt=False))


# -- what a user turn names ---------------------------------------------------------------------
def user_details(text: str) -> list[tuple[str, str]]:
    # IDs with a capital letter (reservations, flights, orders) and dates; not account handles
    # such as user ids ("raj_brown_5782"), which a user gives whether or not a call needs them.
    return [(k, v) for k, v in grounding.facts(text) if k == "date" or (k == "id" and v != v.lower())]


class EnumClash(BaseModel):
    key: str  # the enum parameter
    said: str  # the value the text names
    used: str  # the value the run's write used
    tool: str


GENERIC_ENUM = frozenset({"yes", "no", "true", "false", "none", "other", "all"})  # say nothing without their key


def enum_clashes(text: str, goal: AchievedGoal, tools: Tools) -> list[EnumClash]:
    """Where `text` names another value of an enum parameter than the goal's write used, and not
    the one used (asked for economy, the run booked business); "from basic economy to economy"
    names the one used. A yes/no value counts only in a sentence that names its parameter
    ("no insurance"; a bare "Yes, please go ahead" says nothing about insurance)."""
    low = " ".join(words(text))
    found = []
    for a in goal.actions:
        props = ((tools.schemas.get(a.tool) or {}).get("parameters") or {}).get("properties") or {}
        for key, value in a.arguments.items():
            enum = (props.get(key) or {}).get("enum")
            if not isinstance(enum, list) or not isinstance(value, str) or value not in enum:
                continue
            mine = " ".join(words(value))
            key_words = "|".join(re.escape(w) for w in words(key) if len(w) >= 4) or re.escape(key)
            for other in enum:
                phrase = " ".join(words(str(other)))
                if other == value or not phrase:
                    continue
                if phrase in GENERIC_ENUM or mine in GENERIC_ENUM:
                    # "no insurance", "insurance: yes", "yes to the insurance": the value next to its key
                    near = rf"\b{{0}}\b(\s+\w+){{{{0,3}}}}\s+({key_words})\b|\b({key_words})\b(\s+\w+){{{{0,3}}}}\s+{{0}}\b"
                    clash = bool(re.search(near.format(re.escape(phrase)), low)) and not re.search(
                        near.format(re.escape(mine)), low)
                else:
                    clash = bool(re.search(rf"\b{re.escape(phrase)}\b", low)) and not re.search(
                        rf"\b{re.escape(mine)}\b", low)
                if clash:
                    found.append(EnumClash(key=key, said=str(other), used=value, tool=a.tool))
    return found


def other_enum_values(text: str, goal: AchievedGoal, tools: Tools) -> list[str]:
    """enum_clashes, as sentences."""
    return [f"asks for {c.key} {c.said!r}; the run's {c.tool} used {c.used!r}" for c in enum_clashes(text, goal, tools)]


# -- the goal as words: for the relabeler, the review sheet and the `achievements` column ----------
def describe_value(value: Any) -> str:
    """Arguments in a form a person reads: lists of objects as "a b; c d", no JSON braces."""
    if isinstance(value, dict):
        return " ".join(describe_value(v) for v in value.values() if v not in (None, "", [], {}))
    if isinstance(value, list):
        return "; ".join(describe_value(v) for v in value)
    return str(value)


def describe_action(action: Action) -> str:
    if action.seen:  # a text agent's button write, with the page it was pressed on
        return describe_page_write(action.tool, action.arguments, action.seen)
    args = ", ".join(f"{k.replace('_', ' ')} {describe_value(v)}" for k, v in action.arguments.items()
                     if v not in (None, "", [], {}))
    return f"{action.tool.replace('_', ' ')}: {args}" if args else action.tool.replace("_", " ")


def describe_goal(goal: AchievedGoal, max_facts: int = MAX_FACTS, max_chars: int = 220) -> str:
    """The goal as the relabeler reads it: every action, the last `max_facts` facts."""
    lines = [f"- {describe_action(a)}" for a in goal.actions]
    shown = goal.facts[-max_facts:] if max_facts else []
    looked_up = [] if goal.actions else list(dict.fromkeys(describe_action(r) for f in shown for r in f.reads))
    text = "DONE:\n" + "\n".join(lines or ["- (no change of state)"])
    if looked_up:  # what a question about the report names (a goal of facts only)
        text += "\nLOOKED UP:\n" + "\n".join(f"- {line}" for line in looked_up)
    if shown:
        text += "\nTOLD THE USER:\n" + "\n".join(f'- "{_cut(f.text, max_chars)}"' for f in shown)
    return text


def goal_achievements(goal: AchievedGoal) -> list[dict]:
    """schema.ACHIEVEMENT rows of a goal: its actions, then its facts."""
    return [
        *({"text": describe_action(a), "steps": [a.call_step, a.result_step], "kind": "action"} for a in goal.actions),
        *({"text": f"told the user: {_cut(f.text, 200)}", "steps": f.steps, "kind": "information"}
          for f in goal.facts),
    ]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
