"""Stage 3: an LLM rewrites the user side of the sample so the conversation asks for the computed
achieved goal, behind a gate.

The sample's window and the plan of its user turns are computed (agenther.evidence.conversation):
which turns change, what each must ask for, name, keep, and no longer say. The relabeler sees the
achieved goal (the writes that succeeded; for a goal of facts only, what the agent looked up and
reported) and only the turns to rewrite, each with its original text and its notes; never the
whole transcript. One call returns every rewritten turn as a typed list (agenther/llm/answers.py).
A run whose user side already asks for exactly its goal needs no call: its conversation is kept
as the user wrote it (`relabel_model` "rules", 0 attempts), and passes the same gate.

An attempt passes only if it is valid JSON with every turn asked for, each turn is the user's own
voice (no pasted record or tool names, no copied example), keeps every value the agent then used,
and the whole sample as the trainer will see it passes the deterministic coverage check both ways
(agenther.evidence.coverage: grounding of the rewritten turns included) and the coherence check
turn by turn (agenther.evidence.coherence); then its confidence must reach the threshold. A failed
check is told to the next attempt as what to fix (attempt i samples at temperatures[i]). A record
with no passing attempt after max_attempts is rejected with the last reason: there is no "best
attempt" fallback. A record reached after the run's LLM budget is spent is `budget_exhausted`.
"""

from __future__ import annotations

import json
import re

import polars as pl

from agenther import schema
from agenther.evidence import coherence, coverage
from agenther.evidence.conversation import AFFIRMATIVE
from agenther.evidence.edits import rule_written, still_says
from agenther.evidence.goal import AchievedGoal, TurnEdit, describe_goal, first_user_index, sample_steps
from agenther.evidence.render import defuse, tool_calls
from agenther.evidence.tools import Tools
from agenther.evidence.turns import asks_anything
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, LLMs, map_concurrent
from agenther.llm.answers import RelabelAnswer
from agenther.llm.ask import ask
from agenther.params import Params

STAGE = "relabel"
SCHEMA = RelabelAnswer  # the answer's contract (agenther/llm/answers.py)
FACTS = 2  # facts shown to the relabeler, at most (the last ones: the final report)
FACT_CHARS = 150
TURN_CHARS = 600  # of a turn's original text shown to the relabeler
MAX_DETAILS = 16


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def goal_of(row: dict) -> AchievedGoal:
    return AchievedGoal.model_validate_json(row["achieved_goal"])


def pastes_log(prompt: str, goal: AchievedGoal, record: str) -> bool:
    """Small models paste the record back (a line of it, JSON, tool names such as
    update_reservation_flights or "update reservation flights"): a log line, not a request a user
    would make. Two-word names ("cancel reservation") are plain English and allowed."""
    low, plain = prompt.lower(), _plain(prompt)
    names = {a.tool.lower() for a in goal.actions}
    spaced = {n.replace("_", " ") for n in names if n.count("_") >= 2}
    lines = [_plain(line.lstrip("- ").strip('"')) for line in record.splitlines() if line.startswith("- ")]
    return ("{" in prompt or any(n in low for n in names | spaced) or INSTRUCTION_WORDS.search(prompt) is not None
            or any(len(line.split()) >= 3 and line[:40] in plain for line in lines))


# The record's headings and the retry's instructions: pasted into a prompt, they name details
# without asking for them ("Please book a flight. Name all of: one_way, 3, 1.").
INSTRUCTION_WORDS = re.compile(r"\b(name( all| one or more)?( of)?|told the user|looked up|done|fix|ask for|keep|"
                               r"do not( name( yet)?| ask for)?|say instead|it was)\s*:", re.I)


# The words of relabel.txt's example (a library loan): small models copy examples verbatim.
EXAMPLE_WORDS = frozenset({"library", "loan", "renew", "l2291", "fines", "m880"})
# A user's request says "my"; the agent says "your", and small models describe the record itself.
AGENT_VOICE = re.compile(r"\b(your|you wish|you want|you would like|you'd like)\b", re.I)
META = re.compile(r"\b((?i:assistant|agent|record|customer|the user|chatbot|conversation)|AI)\b")

def not_the_users_voice(text: str, opening: bool) -> str | None:
    """Why the turn is not the user speaking (it speaks as the agent, or about the record), or None.
    An opening must also ask for something."""
    if META.search(text):
        return f"the turn speaks about the conversation, not as the user: {text[:80]!r}"
    if AGENT_VOICE.search(text):
        return f"the turn speaks to the user, as the agent would: {text[:80]!r}"
    if opening and not asks_anything(text):
        return f"the first message asks for nothing: {text[:80]!r}"
    return None


# -- what the relabeler reads -------------------------------------------------------------------
def record_of(row: dict) -> str:
    """The goal the conversation must ask for: its writes (or, for a goal of facts only, what the
    agent looked up and the last facts it reported)."""
    goal = goal_of(row)
    return describe_goal(goal, 0 if goal.actions else FACTS, FACT_CHARS)  # a change needs no report to ask for it


def _words_of(tool: str) -> str:
    return tool.replace("_", " ")


def turn_notes(edit: TurnEdit) -> list[str]:
    """The notes of one turn to rewrite, as the relabeler reads them."""
    notes = []
    if edit.ask:
        notes.append("ASK FOR: " + ", ".join(_words_of(t) for t in edit.ask))
    if edit.question:
        notes.append("ASK: the question that TOLD THE USER answers")
    named = [n for n in edit.name if not n.startswith("one of: ")]
    if named:
        notes.append("NAME: " + ", ".join(named[:MAX_DETAILS]))
    notes += [f"NAME ONE OR MORE OF: {n.removeprefix('one of: ')}" for n in edit.name if n.startswith("one of: ")]
    if edit.instead:
        notes.append("SAY INSTEAD: " + ", ".join(f"{used!r} (not {said!r})" for said, used in edit.instead.items()))
    if edit.keep:
        notes.append("KEEP: " + ", ".join(edit.keep))
    if edit.hold:
        notes.append("DO NOT NAME YET: " + ", ".join(edit.hold))
    if edit.unsay:
        notes.append("DO NOT NAME: " + ", ".join(edit.unsay))
    if edit.unask:
        notes.append("DO NOT ASK FOR: " + ", ".join(dict.fromkeys(_words_of(t) for t in edit.unask)))
    return notes


def ruled_and_written(row: dict, params: Params | None = None,
                      taking: bool = True) -> tuple[dict[int, str], list[TurnEdit]]:
    """The planned edits that need no writer, done (step -> text: agenther.evidence.edits), and the
    ones the relabeling model must write. `taking` False: rules only add, every edit that takes
    something away goes to the model."""
    goal = goal_of(row)
    first = first_user_index(row["messages"])
    tools = Tools.of(row.get("tools"), params)
    known = tools.write_names(c["name"] for c in tool_calls(row["messages"]))
    ruled: dict[int, str] = {}
    written = []
    for e in goal.edits:
        takes = bool(e.unask or e.unsay or e.instead)
        text = None if takes and not taking else rule_written(
            e, row["messages"][e.step].get("content") or "", goal.start != first, tools, known)
        if text is None:
            written.append(e)
        else:
            ruled[e.step] = text
    return ruled, written


def turns_text(row: dict, edits: list[TurnEdit]) -> str:
    """TURN k (FIRST MESSAGE). It was: "...", then its notes, for every turn of `edits`."""
    blocks = []
    for k, edit in enumerate(edits, 1):
        original = " ".join((row["messages"][edit.step].get("content") or "").split())[:TURN_CHARS]
        head = f"TURN {k}{' (FIRST MESSAGE)' if edit.opening else ''}. It was: \"{original}\""
        blocks.append("\n".join([head, *(f"  {n}" for n in turn_notes(edit))]))
    return defuse("\n".join(blocks))


# What the next attempt is told to do about each kind of miss (small models follow an
# instruction better than a quoted rejection).
FIXES = {
    "missing_turn": "Return one entry for every TURN, with its number.",
    "empty_prompt": "Write at least one full sentence per turn.",
    "copies_achievement": "Do not copy the record, the notes or tool names: write what the user typed.",
    "copies_example": "The example is from another shop: write about this record only.",
    "not_a_request": 'Write as the user, in the first person ("I", "my"): never "your", never about the agent.',
    "repeats_goal": "Leave out what the notes say not to ask for.",
    "lost_value": "Keep every detail under KEEP.",
    "unrequested_action": "ASK FOR and NAME everything the notes list.",
    "unmet_requirement": "Ask only for what the record shows; leave out everything under DO NOT.",
    "asks_given_value": "In the FIRST MESSAGE, leave out what DO NOT NAME YET lists.",
    "low_confidence": "Follow every note.",
}


def feedback(failures: list[tuple[str, str]], row: dict) -> str:
    """What the next attempt is told about the previous one (empty for the first attempt): the
    rejection in plain words (tool names spaced, no step numbers) and what to do instead."""
    if not failures:
        return ""
    code, why = failures[-1]
    for tool in sorted({c["name"] for c in tool_calls(row["messages"])}, key=len, reverse=True):
        why = why.replace(tool, _words_of(tool))
    why = re.sub(r" \(?(before )?step \d+\)?", "", why)
    fix = FIXES.get(code, "Follow every note.")
    return f"\nYOUR PREVIOUS ANSWER WAS REJECTED: {defuse(why[:200])}\nFIX: {fix}"


# -- the gate -----------------------------------------------------------------------------------
def sample_defects(row: dict, goal: AchievedGoal, rewrites: dict[int, str],
                   params: Params) -> list[tuple[str, str]]:
    """(code, detail) of every defect of the sample as the trainer will see it, with `rewrites`
    (step -> text) in place: coverage both ways, then coherence turn by turn."""
    turns = coherence.sample_turns(row["messages"], sample_steps(row["messages"], goal), goal, rewrites)
    user_side = [(t.step, t.message.get("content") or "") for t in turns if t.message["role"] == "user"]
    found = coverage.misses(user_side, goal, row, params, rewritten=rewrites)
    found += [(d.code, f"step {d.step}: {d.detail}") for d in coherence.defects(turns, goal, row, params)]
    return found


def _kept(value: str, text: str) -> bool:
    return bool(AFFIRMATIVE.search(text)) if value == "yes" else coverage.asked(value, text)


def gate(answer: RelabelAnswer, row: dict, params: Params, edits: list[TurnEdit],
         ruled: dict[int, str]) -> tuple[tuple[str, str] | None, dict[int, str]]:
    """(None when the attempt passes, else (reason code, detail); the rewrites step -> text).
    `edits`: the turns asked for (TURN k is edits[k - 1]); `ruled`: the turns written by rules."""
    p = params.relabel
    goal = goal_of(row)
    by_number = {t.turn: t.text.strip() for t in answer.turns}
    rewrites = {e.step: by_number.get(k, "") for k, e in enumerate(edits, 1)}
    missing = [k for k, e in enumerate(edits, 1) if not rewrites[e.step]]
    rewrites |= ruled
    if missing:
        return ("missing_turn", f"no text for turn(s) {missing}"), rewrites
    record = record_of(row)
    tools = Tools.of(row.get("tools"), params)
    known = tools.write_names(c["name"] for c in tool_calls(row["messages"]))
    for k, e in enumerate(edits, 1):  # first: a turn handed back with what it must drop (small models echo)
        still = still_says(e, rewrites[e.step], tools, known)
        if still:
            return ("repeats_goal", f"turn {k} still says what it must no longer: {', '.join(still)}"), rewrites
    for k, e in enumerate(edits, 1):
        text = rewrites[e.step]
        if len(text.split()) < (3 if e.opening else 1):
            return ("empty_prompt", f"turn {k} is too short: {text!r}"), rewrites
        if pastes_log(text, goal, record):
            return ("copies_achievement", f"turn {k} pastes the record instead of speaking: {text[:80]!r}"), rewrites
        copied = EXAMPLE_WORDS.intersection(_plain(text).split())
        if copied:
            return ("copies_example", f"turn {k} copies the template's example ({', '.join(sorted(copied))}): "
                                      f"{text[:80]!r}"), rewrites
        voice = not_the_users_voice(text, e.opening)
        if voice:
            return ("not_a_request", f"turn {k}: {voice}"), rewrites
        lost = [v for v in e.keep if not _kept(v, text)]
        if lost:
            return ("lost_value", f"turn {k} drops {', '.join(map(repr, lost))}, which the agent then used"), rewrites
    if not 0.0 <= answer.confidence <= 1.0:
        return ("invalid_llm_answer", f"confidence {answer.confidence} outside [0, 1]"), rewrites
    found = sample_defects(row, goal, _changed(row, rewrites), params)
    if found:
        return (found[0][0], "; ".join(detail for _, detail in found)), rewrites
    if answer.confidence < p.confidence_threshold:
        return ("low_confidence", f"confidence {answer.confidence:.2f} < {p.confidence_threshold}"), rewrites
    return None, rewrites


# -- the stage ----------------------------------------------------------------------------------
def _changed(row: dict, rewrites: dict[int, str]) -> dict[int, str]:
    """The rewrites that change their turn (a turn written back as it was is no rewrite)."""
    return {s: t for s, t in rewrites.items() if t != (row["messages"][s].get("content") or "")}


def rewrites_json(row: dict, rewrites: dict[int, str]) -> str:
    """The `rewrites` column: [{step, before, after}] of each turn whose text changed."""
    changed = [{"step": step, "before": row["messages"][step].get("content") or "", "after": text}
               for step, text in sorted(rewrites.items()) if text != (row["messages"][step].get("content") or "")]
    return json.dumps(changed, ensure_ascii=False)


def _accepted(row: dict, goal: AchievedGoal, rewrites: dict[int, str], confidence: float, attempts: int,
              rationale: str, model: str) -> dict:
    rewrites = _changed(row, rewrites)
    opening = rewrites.get(goal.start, row["messages"][goal.start].get("content") or "")
    return row | {
        "hindsight_prompt": opening.strip(),
        "rewrites": rewrites_json(row, rewrites),
        "relabel_confidence": confidence,
        "relabel_attempts": attempts,
        "relabel_rationale": rationale,
        "relabel_model": model,
    }


def relabel_one(row: dict, params: Params, llm: LLMClient) -> tuple[dict | None, dict | None]:
    p = params.relabel
    goal = goal_of(row)
    ruled, written = ruled_and_written(row, params)
    if not written:  # the user side already asks for this goal, or rules make it so
        found = sample_defects(row, goal, _changed(row, ruled), params)
        if not found:
            why = ("the conversation already asks for the achieved goal" if not ruled else
                   "the conversation asks for the achieved goal once rules edit its turns")
            return _accepted(row, goal, ruled, 1.0, 0, why, "rules"), None
        ruled, written = ruled_and_written(row, params, taking=False)  # what rules took away: to the model
        if not written:
            return None, schema.rejection(row["id"], STAGE, found[0][0], "; ".join(d for _, d in found))
    record, turns = defuse(record_of(row)), turns_text(row, written)
    temperatures = p.temperatures
    failures: list[tuple[str, str]] = []  # (code, why) of each failed attempt
    for attempt in range(p.max_attempts):
        temperature = temperatures[min(attempt, len(temperatures) - 1)]
        asked = ask(llm, "relabel", SCHEMA, stage=STAGE, temperatures=[temperature], attempts=1,
                    first_seed=attempt, record=record, turns=turns, feedback=feedback(failures, row))
        if asked.budget_exhausted:  # left undone, not judged: no further attempt can start
            detail = "; ".join([*(f"attempt {i + 1}: {code} ({why})" for i, (code, why) in enumerate(failures)),
                                asked.error or BUDGET_EXHAUSTED])
            return None, schema.rejection(row["id"], STAGE, BUDGET_EXHAUSTED, detail)
        if asked.answer is None:
            failures.append(("invalid_llm_answer", asked.error or ""))
            continue
        verdict, rewrites = gate(asked.answer, row, params, written, ruled)
        if verdict is None:
            return _accepted(row, goal, rewrites, float(asked.answer.confidence), attempt + 1,
                             str((asked.data or {}).get("rationale") or ""), llm.name), None
        failures.append(verdict)
    reason = failures[-1][0]
    detail = "; ".join(f"attempt {i + 1}: {code} ({why})" for i, (code, why) in enumerate(failures))
    return None, schema.rejection(row["id"], STAGE, reason, detail)


def relabel_output(results: list[tuple[dict | None, dict | None]]) -> schema.StageOutput:
    """The stage's tables from relabel_one's results, in input order."""
    kept = [k for k, _ in results if k is not None]
    rejected = [r for _, r in results if r is not None]
    return schema.StageOutput(schema.frame(kept, schema.RELABELED), schema.frame(rejected, schema.REJECTION))


def relabel(extracted: pl.DataFrame, params: Params, llm: LLMClient) -> schema.StageOutput:
    results = map_concurrent(lambda r: relabel_one(r, params, llm), extracted.to_dicts(),
                             params.llm.concurrency)
    return relabel_output(results)


def step(batch: pl.DataFrame, params: Params, llms: LLMs) -> schema.StageOutput:
    """The stage (agenther/stages/__init__.py)."""
    return relabel(batch, params, llms.main())
