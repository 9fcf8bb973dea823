"""The coherence judge (deterministic): the sample read turn by turn, exactly as a trainer sees it.

Every trained turn must be the right response to the goal and to what the user has said so far, and
no user turn may contradict the request. One reason code per defect:
- `asks_given_value`: a trained assistant turn asks for a value (a user id, a reservation id) that the
  user side has already given;
- `speaks_other_action`: a trained assistant turn offers, promises or speaks of a write the goal does
  not contain;
- `denies_given_value`: a user turn says it does not know a value an earlier user turn gave;
- `asks_unmade_change`: a user turn asks for a write, or a change, that no write of the goal makes;
- `names_unused_value`: a user turn names an ID or date that no call or result of the sample holds;
- `other_enum_value`: a user turn asks for another value of an enum than the run's write used;
- `unsourced_argument`: a trained tool call uses an ID that neither the user side nor a tool result
  (nor the agent's instructions) gave before the call (dates are left out: "a day later" is the
  agent's own arithmetic);
- `unmet_requirement`: a wish of the user side (a seat, "the cheapest", nonstop) that no tool call or
  result meets (the agent saying so is not enough).
The same reading of turns (agenther.evidence.turns) plans the sample (agenther.evidence.conversation),
so this judge checks what the planner meant to avoid, after the relabeler's rewrites.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from agenther.evidence.conversation import goal_arguments
from agenther.evidence.coverage import asked
from agenther.evidence.goal import ID_LIKE, AchievedGoal, argument_values, enum_clashes, scanned, user_details
from agenther.evidence.grounding import occurs
from agenther.evidence.text_evidence import goal_calls
from agenther.evidence.tools import Tools
from agenther.evidence.turns import asks_for, change_words, denies, requests_in, speaks_of, wish_met, wishes
from agenther.params import Params

CODES = ("asks_given_value", "speaks_other_action", "denies_given_value", "asks_unmade_change",
         "names_unused_value", "other_enum_value", "unsourced_argument", "unmet_requirement")


class Defect(BaseModel):
    code: str  # one of CODES
    step: int  # the run step of the turn
    detail: str


class Turn(BaseModel):
    """One turn of the sample as the trainer sees it."""
    step: int  # its step in the run
    message: dict
    trained: bool  # an assistant turn with weight 1


def sample_turns(messages: list[dict], steps: list[int], goal: AchievedGoal, rewrites: dict[int, str]) -> list[Turn]:
    """The sample's turns (run `steps`, rewritten user turns in place) with their training weight."""
    train = set(goal.train_steps)
    return [Turn(step=i, message={**messages[i], "content": rewrites[i]} if i in rewrites else messages[i],
                 trained=messages[i]["role"] == "assistant" and i in train) for i in steps]


def defects(turns: list[Turn], goal: AchievedGoal, row: dict, params: Params | None = None) -> list[Defect]:
    """Every defect of the sample, in turn order."""
    tools = Tools.of(row.get("tools"), params)
    every = goal_calls(row, tools)
    calls = [c for c in every if goal.start <= c["step"] < goal.sample_end]
    known = tools.write_names(c["name"] for c in every)
    done = {a.tool for a in goal.actions}
    others = [w for w in known if w not in done]
    arguments = goal_arguments(goal)
    done_verbs = set().union(*(tools.request_words(a.tool, known)[0] for a in goal.actions))
    # what the agent did and saw: a value the user names that is in none of it was never acted on
    used = "\n".join(f"{c['name']} {json.dumps(c['arguments'])} {scanned(c['result'])}" for c in calls).lower()
    # the IDs the calls of the sample pass, by argument name: what "your reservation ID" refers to
    by_key: dict[str, set[str]] = {}
    for c in calls:
        for key, value in argument_values(c["arguments"]):
            if key.lower().endswith("id"):
                by_key.setdefault(key, set()).add(value)
    system = "\n".join(t.message.get("content") or "" for t in turns if t.message["role"] == "system")
    found: list[Defect] = []
    said = ""  # the user side so far
    results = ""  # tool results so far
    for t in turns:
        role, text = t.message["role"], scanned(t.message.get("content"))
        if role == "user":
            found += _user_defects(t.step, text, said, by_key, goal, tools, others, known, arguments, done_verbs, used)
            said += "\n" + text
        elif role == "tool":
            results += "\n" + text
        elif role == "assistant" and t.trained:
            for key, values in by_key.items():
                question = asks_for(text, key)
                given = [v for v in sorted(values) if asked(v, said)]  # sorted: a set's order varies by process
                if question and given and not any(asked(v, question) for v in values):
                    found.append(Defect(code="asks_given_value", step=t.step,
                                        detail=f"asks for the {key.replace('_', ' ')} the user gave ({given[0]}): "
                                               f"{question[:100]!r}"))
            for w in others:
                spoken = speaks_of(tools, w, text, known, arguments)
                if spoken:
                    found.append(Defect(code="speaks_other_action", step=t.step,
                                        detail=f"speaks of {w}, which the goal does not contain: {spoken[:100]!r}"))
                    break
            for c in t.message.get("tool_calls") or []:
                seen = "\n".join([system, said, results])
                for key, value in argument_values(c.get("arguments") if isinstance(c.get("arguments"), dict)
                                                  else _parsed(c.get("arguments"))):
                    if ID_LIKE.match(value) and not asked(value, seen):
                        found.append(Defect(code="unsourced_argument", step=t.step,
                                            detail=f"{c['name']} uses {key} {value!r}, which no user turn or tool "
                                                   "result gave before it"))
    # what the agent did and saw, not what it said: "Seats: aisle and middle together" in a report no
    # call or result backs is no seat given
    did = "\n".join(_calls_and_results(t.message) for t in turns if t.message["role"] in ("assistant", "tool")).lower()
    for t in turns:
        if t.message["role"] != "user":
            continue
        for wish in wishes(requests_in(t.message.get("content") or "")):
            if not wish_met(wish, did):
                found.append(Defect(code="unmet_requirement", step=t.step,
                                    detail=f"the user asks for {wish!r}, which no call or result of the run meets"))
    return found


def _user_defects(step: int, text: str, said: str, by_key: dict[str, set[str]], goal: AchievedGoal, tools: Tools,
                  others: list[str], known: list[str], arguments: set[str], done_verbs: set[str],
                  used: str) -> list[Defect]:
    found = []
    asking_text = requests_in(text)
    for key, values in by_key.items():
        denial = denies(text, key)
        given = [v for v in values if asked(v, said)]
        if denial and given:
            found.append(Defect(code="denies_given_value", step=step,
                                detail=f"says it does not know the {key.replace('_', ' ')} an earlier turn gave "
                                       f"({given[0]}): {denial[:100]!r}"))
    for w in others:
        spoken = speaks_of(tools, w, asking_text, known, arguments)
        if spoken:
            found.append(Defect(code="asks_unmade_change", step=step,
                                detail=f"asks for {w}, which the goal does not contain: {spoken[:100]!r}"))
            break
    else:
        unmade = sorted(change_words(text) - done_verbs)
        if unmade:
            found.append(Defect(code="asks_unmade_change", step=step,
                                detail=f"asks to {', '.join(unmade)}, which no write of the goal does: {text[:100]!r}"))
    for kind, value in user_details(text):
        if not occurs(kind, value, used):
            found.append(Defect(code="names_unused_value", step=step,
                                detail=f"names {value!r}, which no call of the sample uses"))
    for clash in enum_clashes(text, goal, tools):
        found.append(Defect(code="other_enum_value", step=step,
                            detail=f"asks for {clash.key} {clash.said!r}; the run's {clash.tool} used {clash.used!r}"))
    return found


def _calls_and_results(message: dict) -> str:
    """A tool result's text, or the calls an assistant turn makes (names and arguments)."""
    if message["role"] == "tool":
        return scanned(message.get("content"))
    return " ".join(f"{c['name']} {json.dumps(c.get('arguments'))}" for c in message.get("tool_calls") or [])


def _parsed(arguments: object) -> dict:
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
