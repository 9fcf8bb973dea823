"""The hindsight sample as one coherent conversation: which window of the run it is, and how its
user turns must change so that every turn follows from the achieved goal.

A conversation that failed goal A was shaped by A: the user asked for A, the agent asked for A's
details, offered A's changes, refused some of them. Relabeling the first user turn alone leaves all
of that in place: the agent asks for what it was just told, offers changes nobody asked for, and
the user contradicts the new request. So:

1. **The window.** An assistant turn that speaks of, offers or attempts a write the goal does not
   contain cannot be made to fit (the agent's words, tool calls and results never change), so the
   sample never holds one: it ends before that turn, or opens at the next user turn after it,
   whichever keeps the larger goal (more writes, then more facts, then the earlier opening). The
   run's turns before the opening are left out (its system turns stay).
2. **The user side.** User turns are the relabeler's to edit, each with a plan (goal.TurnEdit):
   - what it must ask for and name: each write is asked for, with its identifying values, by the
     user turns before it; a missing value goes to the turn that answers the agent's question about
     it, else to the last turn that speaks of it, else to the opening; an ID a trained call uses
     that nothing in the sample gave before it (the run's left-out turns did) goes there too;
   - what it must no longer ask for or name: writes no call of the goal makes, values no call
     uses, another value of an enum than the run used;
   - what it must keep: the values of the original turn that the agent then used, and a yes;
   - the opening states the request at the level of detail of the original, and names nothing a
     later user turn gives (where the agent asks for it), so the agent never asks for what it was told.
   A turn with no plan stays as the user wrote it; a run whose user side already asks for exactly
   its goal needs no rewrite and no LLM call.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agenther.evidence import grounding
from agenther.evidence.coverage import asked, bystanders, fact_subjects, unnamed
from agenther.evidence.goal import (
    ID_LIKE,
    AchievedGoal,
    Fact,
    NoGoal,
    TurnEdit,
    argument_values,
    enum_clashes,
    first_user_index,
    goal_within,
    identifying_values,
    metadata_of,
    not_allowed,
    scanned,
    user_details,
    with_sample,
)
from agenther.evidence.grounding import ISO_DATE, occurs
from agenther.evidence.text_evidence import goal_calls
from agenther.evidence.tools import Tools, words
from agenther.evidence.turns import (
    argument_words,
    asks_anything,
    asks_for,
    change_words,
    key_phrases,
    requests_in,
    speaks_of,
    wish_met,
    wishes,
)
from agenther.params import Params

AFFIRMATIVE = re.compile(r"^\W*(yes|yeah|yep|sure|ok|okay|correct|that's correct|please proceed|go ahead|confirm)\b", re.I)


def hindsight_goal(row: dict, params: Params | None = None) -> AchievedGoal | NoGoal:
    """The row's achieved goal in its window, with the plan of its user turns; or why it has none."""
    messages = row["messages"]
    first_user = first_user_index(messages)
    if first_user is None:
        return NoGoal(reason="no_user_turn", detail="the trajectory has no user turn to relabel")
    tools = Tools.of(row.get("tools"), params)
    calls = goal_calls(row, tools)
    violations = not_allowed(calls, tools, metadata_of(row), row.get("failure_type"))
    search = _Windows(messages, calls, tools, violations)
    goal = search.best(first_user, len(messages))
    if goal is None:
        if search.conflicts:
            return NoGoal(reason="turn_conflict", detail="; ".join(dict.fromkeys(search.conflicts)))
        why = "no successful write or reported fact"
        if violations:
            why += " before the first write the agent was not allowed to make: " + "; ".join(violations.values())
        return NoGoal(reason="no_evidenced_achievement", detail=why)
    goal.edits = plan_edits(messages, goal, tools, calls, first_user)
    while goal.edits and goal.edits[0].step == goal.start and goal.edits[0].unask:
        # The opening asks for something the goal lacks, and the agent's next turns answer it: open at
        # the next user turn instead, if the goal stays whole and nothing there conflicts.
        later = _later_opening(messages, goal, tools, calls, violations)
        if later is None:
            break
        goal = later
        goal.edits = plan_edits(messages, goal, tools, calls, first_user)
    return goal


def _later_opening(messages: list[dict], goal: AchievedGoal, tools: Tools, calls: list[dict],
                   violations: dict[int, str]) -> AchievedGoal | None:
    first_evidence = min(goal.evidence_steps())
    following = next((i for i in range(goal.start + 1, first_evidence) if messages[i]["role"] == "user"), None)
    if following is None:
        return None
    later = goal_within(messages, calls, tools, following, goal.sample_end, violations)
    same = _size(later)[:2] == _size(goal)[:2]
    return later if same and first_hard_conflict(messages, later, tools, calls) is None else None


def goal_from_facts(row: dict, params: Params | None, facts: list[Fact]) -> AchievedGoal | NoGoal:
    """A goal of facts only (LLM-mode extraction of a run with no structured evidence), in the window
    from the run's first user turn, with its plan; rejected when an assistant turn inside it speaks of
    a write."""
    messages = row["messages"]
    first_user = first_user_index(messages)
    if first_user is None or not facts:
        return NoGoal(reason="no_evidenced_achievement", detail="no achievement with evidence in the trajectory")
    tools = Tools.of(row.get("tools"), params)
    calls = goal_calls(row, tools)
    goal = with_sample(messages, calls, tools, [], facts, [], first_user, len(messages))
    conflict = first_hard_conflict(messages, goal, tools, calls)
    if conflict is not None:
        return NoGoal(reason="turn_conflict", detail=f"step {conflict[0]} {conflict[1]}")
    goal.edits = plan_edits(messages, goal, tools, calls, first_user)
    return goal


class _Windows:
    """The best conflict-free window of a run, found by splitting at each conflict: the window ends
    before it, or opens at the next user turn after it (memoised: a run has a handful of conflicts)."""

    def __init__(self, messages: list[dict], calls: list[dict], tools: Tools, violations: dict[int, str]):
        self.messages, self.calls, self.tools, self.violations = messages, calls, tools, violations
        self.memo: dict[tuple[int, int], AchievedGoal | None] = {}
        self.conflicts: list[str] = []

    def best(self, start: int, end: int) -> AchievedGoal | None:
        if (start, end) not in self.memo:
            self.memo[(start, end)] = self._best(start, end)
        return self.memo[(start, end)]

    def _best(self, start: int, end: int) -> AchievedGoal | None:
        violation = min((s for s in self.violations if start <= s < end), default=None)
        if violation is not None:  # never inside a sample: it ends before it, or opens after it
            return self._split(start, end, violation)
        goal = goal_within(self.messages, self.calls, self.tools, start, end, self.violations)
        if not goal.actions and not goal.facts:
            return None
        conflict = first_hard_conflict(self.messages, goal, self.tools, self.calls)
        if conflict is None:
            return goal
        step, why = conflict
        self.conflicts.append(f"step {step} {why}")
        return self._split(start, end, step)

    def _split(self, start: int, end: int, step: int) -> AchievedGoal | None:
        after = next((i for i in range(step + 1, end) if self.messages[i]["role"] == "user"), None)
        options = [self.best(start, step), self.best(after, end) if after is not None else None]
        return max((g for g in options if g is not None), key=_size, default=None)


def _size(goal: AchievedGoal) -> tuple[int, int, int]:
    """How much a window achieves: writes, then facts, then the earlier opening."""
    return len(goal.actions), len(goal.facts), -goal.start


def goal_arguments(goal: AchievedGoal) -> set[str]:
    """The words of the goal's writes' argument names, nested ones included."""
    keys: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                keys.append(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for a in goal.actions:
        walk(a.arguments)
    return argument_words(keys)


def first_hard_conflict(messages: list[dict], goal: AchievedGoal, tools: Tools,
                        calls: list[dict]) -> tuple[int, str] | None:
    """(step, why) of the first assistant turn after the opening that attempts or speaks of a write
    the goal does not contain: no rewrite of the user side makes it fit."""
    known = tools.write_names(c["name"] for c in calls)
    others = [w for w in known if w not in {a.tool for a in goal.actions}]
    arguments = goal_arguments(goal)
    left_out = left_out_text(messages, goal)
    for i in range(goal.start + 1, goal.sample_end):
        m = messages[i]
        if m["role"] != "assistant":
            continue
        unseen = refers_to_left_out(m.get("content") or "", left_out, messages, goal.start, i)
        if unseen:
            return i, f"the assistant speaks of {unseen}, which only turns before the sample's opening gave"
        for c in m.get("tool_calls") or []:
            if c["name"] in others:
                return i, f"the assistant attempts {c['name']}, which the goal does not contain"
        for w in others:
            said = speaks_of(tools, w, m.get("content") or "", known, arguments)
            if said:
                return i, f"the assistant speaks of {w}, which the goal does not contain: {said[:120]!r}"
    return None


CODE = re.compile(r"\b(?=[A-Za-z0-9_-]*\d)[A-Za-z][A-Za-z0-9_-]{2,}\b|\b[A-Z]{3}\b")  # HAT041, mia_kim_4397, IAH


def left_out_text(messages: list[dict], goal: AchievedGoal) -> str:
    """What the run said (any role) between its first user turn and the sample's opening."""
    first = first_user_index(messages) or 0
    return "\n".join(scanned(m.get("content")) for m in messages[first:goal.start])


def refers_to_left_out(text: str, left_out: str, messages: list[dict], start: int, step: int) -> str | None:
    """The first ID or code in `text` (the agent's words at `step`) that the left-out turns gave and
    nothing in the sample before `step` did ("your flight from IAH to SEA", said before the opening)."""
    if not left_out:
        return None
    first = first_user_index(messages) or 0
    before = "\n".join(scanned(m.get("content")) for m in [*messages[:first], *messages[start:step]])
    for token in dict.fromkeys(CODE.findall(text)):
        if (token in left_out and re.search(rf"\b{re.escape(token)}\b", left_out)
                and not (token in before and re.search(rf"\b{re.escape(token)}\b", before))):
            return token
    return None


def is_identifier(value: str) -> bool:
    """Values an agent can only know by being told or by looking them up: IDs and dates."""
    return bool(ID_LIKE.match(value) or ISO_DATE.fullmatch(value))


def label(key: str, value: str) -> str:
    """A value with the argument it fills ("total baggages 2"): a bare "2" tells a writer nothing."""
    return f"{key.replace('_', ' ')} {value}"


class _Plan:
    """The edits of one window's user turns, built up rule by rule (see the module docstring)."""

    def __init__(self, messages: list[dict], goal: AchievedGoal, tools: Tools, calls: list[dict], first_user: int):
        self.messages, self.goal, self.tools, self.first_user = messages, goal, tools, first_user
        self.known = tools.write_names(c["name"] for c in calls)
        self.calls = [c for c in calls if goal.start <= c["step"] < goal.sample_end]
        self.users = [i for i in range(goal.start, goal.sample_end) if messages[i]["role"] == "user"]
        self.edits: dict[int, TurnEdit] = {}

    def text(self, step: int) -> str:
        return self.messages[step].get("content") or ""

    def edit(self, step: int) -> TurnEdit:
        return self.edits.setdefault(step, TurnEdit(step=step, opening=step == self.goal.start))

    def user_text_before(self, step: int, since: int | None = None) -> str:
        return "\n".join(self.text(i) for i in self.users if (since is None or i >= since) and i < step)

    def turn_for(self, key: str, value: str, before: int) -> int:
        """The user turn that should give `value` (of argument `key`) for a call at `before`: after the
        first tool result that shows it, if one does (nobody names a flight number before the search
        finds it); there, the one answering the agent's last question about it, else the last one
        that speaks of it, else the last one; else the opening."""
        shown = next((c["result_step"] for c in self.calls if c["result_step"] is not None
                      and c["result_step"] < before and asked(value, scanned(c["result"]))), None)
        after = self.goal.start if shown is None else shown
        candidates = [u for u in self.users if after <= u < before]
        for i in range(before - 1, after, -1):
            m = self.messages[i]
            if m["role"] == "assistant" and asks_for(m.get("content") or "", key):
                answer = next((u for u in candidates if u > i), None)
                if answer is not None:
                    return answer
                break
        phrases = [p for p in key_phrases(key) if len(p) >= 4] + [w for w in words(key) if len(w) >= 4 and w not in
                                                                  ("total", "number", "type", "name", "first", "last")]
        spoken = [u for u in candidates if any(p in " ".join(words(self.text(u))) for p in phrases)]
        return (spoken or candidates or [self.goal.start])[-1]

    def what_the_goal_does_not(self) -> None:
        done = {a.tool for a in self.goal.actions}
        others = [w for w in self.known if w not in done]
        arguments = goal_arguments(self.goal)
        done_verbs = set().union(*(self.tools.request_words(a.tool, self.known)[0] for a in self.goal.actions))
        used = "\n".join(f"{c['name']} {json.dumps(c['arguments'])} {scanned(c['result'])}" for c in self.calls).lower()
        for i in self.users:
            text = self.text(i)
            said = requests_in(text)
            unask = [w for w in others if speaks_of(self.tools, w, said, self.known, arguments)]
            unask += sorted(change_words(text) - done_verbs)
            # a wish (an aisle seat, the cheapest) nothing the agent did or saw meets goes too
            unask += [w for w in wishes(said) if not wish_met(w, used)]
            unsay = [v for kind, v in user_details(text) if not occurs(kind, v, used)]
            unsay += [v for _, v in bystanders(text, self.goal, self.calls)]
            # a value the agent then speaks of stays: without it the agent's words come from nowhere
            # (the judges then reject the sample, if the value asks for more than it does)
            spoken = "\n".join(self.text(j) for j in range(i + 1, self.goal.sample_end)
                               if self.messages[j]["role"] == "assistant").lower()
            unsay = [v for v in unsay if v.lower() not in spoken]
            clashes = {c.said: c.used for c in enum_clashes(text, self.goal, self.tools)}
            if unask or unsay or clashes:
                e = self.edit(i)
                e.unask += unask
                e.unsay += unsay
                e.instead |= clashes

    def what_each_write_needs(self) -> None:
        for a in self.goal.actions:
            # what the user turns before it say, with what the plan already has them name
            planned = [n for step, e in self.edits.items() if step < a.call_step for n in e.name]
            before = "\n".join([self.user_text_before(a.call_step), *planned])
            keys = {v: k for k, v in argument_values(a.arguments)}
            if not self.tools.requested(a.tool, before, self.known):
                self.edit(self.users[-1] if self.users[-1] < a.call_step else self.goal.start).ask.append(a.tool)
            for value in unnamed(a, before, self.calls, self.tools):
                key = keys.get(value, "")
                self.edit(self.turn_for(key, value, a.call_step)).name.append(label(key, value))

    def what_the_agent_was_told_elsewhere(self) -> None:
        """An ID a trained call uses that nothing inside the sample gave before the call (the user
        said it, or a lookup returned it, in turns the sample leaves out): the user gives it."""
        system = "\n".join(m.get("content") or "" for m in self.messages[: self.first_user])
        trained = set(self.goal.train_steps)
        for c in self.calls:
            if c["step"] not in trained:
                continue
            seen = "\n".join([system, self.user_text_before(c["step"]), *(
                scanned(d["result"]) for d in self.calls if d["result_step"] is not None and d["result_step"] < c["step"])])
            for key, value in argument_values(c["arguments"]):
                if ID_LIKE.match(value) and not asked(value, seen):
                    self.edit(self.turn_for(key, value, c["step"])).name.append(label(key, value))

    def the_opening(self) -> None:
        opening = self.goal.start
        if opening != self.first_user:
            self.edit(opening)  # a turn from the middle of the run: it must become a first message
        if not self.goal.actions:
            # A goal of facts only is what the failed run reported, not what its question asked
            # (a text agent's wrong Finish answer): the opening must ask what the report answers.
            self.edit(opening)
        if opening not in self.edits:
            return
        e = self.edits[opening]
        later = [u for u in self.users if u > opening]
        # a turn from the middle of the run that asks nothing ("Sure, my user ID is ...") cannot open
        # a conversation: it must ask for the goal
        answer_only = opening != self.first_user and not asks_anything(requests_in(self.text(opening)))
        for a in self.goal.actions:
            requested = self.tools.requested(a.tool, "\n".join(self.text(u) for u in self.users if u < a.call_step),
                                             self.known)
            if (not requested or answer_only) and a.tool not in e.ask:
                e.ask.append(a.tool)
        if not self.goal.actions:
            e.question = True
            later_text = "\n".join(self.text(u) for u in later)
            if not any(asked(v, later_text) for v in fact_subjects(self.goal)):
                e.name.append("one of: " + ", ".join(list(dict.fromkeys(fact_subjects(self.goal)))[:6]))
        named = " ".join(e.name).lower()
        e.hold = list(dict.fromkeys(v for u in later for kind, v in grounding.facts(self.text(u))
                                    if kind in ("id", "date") and v.lower() not in named))

    def what_stays(self) -> None:
        for step, e in self.edits.items():
            used = {v.lower() for c in self.calls if c["step"] > step for _, v in argument_values(c["arguments"])}
            original = self.text(step)
            e.keep = [v for kind, v in grounding.facts(original) if v not in e.unsay and (
                v.lower() in used or (kind == "date" and any(asked(u, v) for u in used if ISO_DATE.fullmatch(u)))
                or (kind == "name" and all(w.lower() in used for w in v.split())))]
            # the later writes' details the user already says here (economy, one way): a rewrite keeps them
            later = [v for a in self.goal.actions if a.call_step > step for v in identifying_values(a.arguments)]
            e.keep += [v for v in later if not ID_LIKE.match(v) and len(v) > 2 and asked(v, original)
                       and not any(asked(v, k) for k in e.keep)]
            if AFFIRMATIVE.search(original):
                e.keep.append("yes")
            for field in ("ask", "name", "hold", "unsay", "unask", "keep"):
                setattr(e, field, list(dict.fromkeys(getattr(e, field))))


def plan_edits(messages: list[dict], goal: AchievedGoal, tools: Tools, calls: list[dict],
               first_user: int) -> list[TurnEdit]:
    """The edits that make the window's user side ask for exactly its goal (module docstring)."""
    plan = _Plan(messages, goal, tools, calls, first_user)
    plan.what_the_goal_does_not()
    plan.what_the_agent_was_told_elsewhere()
    plan.what_each_write_needs()
    plan.the_opening()
    plan.what_stays()
    return [plan.edits[s] for s in sorted(plan.edits)]
