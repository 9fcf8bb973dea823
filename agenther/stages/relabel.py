"""Stage 3: an LLM puts the computed achieved goal into the words of a user's request, behind a gate.

The relabeler sees the achieved goal (agenther.evidence.goal: the writes that succeeded; for a goal of
facts only, what the agent looked up and reported) and the user's own later turns inside the sample: short and structured, never
the whole transcript, never the failed goal (small models echo what they are shown). Its
prompt puts the fixed instructions first so llama.cpp's prompt cache and providers' prefix
caches reuse them across calls.

Each attempt must be valid JSON, carry a confidence at or above the threshold, be a request in
the user's voice, not restate the failed goal, not paste tool names or JSON, and pass the
deterministic coverage check both ways (agenther.evidence.coverage, which includes grounding in the
sample). A failed check is told to the next attempt as what to fix, with the details still to
name (attempt i samples at temperatures[i]). A record with no passing attempt after max_attempts is
rejected with the last reason: there is no "best attempt" fallback. A record reached after the
run's LLM budget is spent is rejected as `budget_exhausted` (left undone).
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

import polars as pl

from agenther import schema
from agenther.evidence import coverage
from agenther.evidence.goal import AchievedGoal, describe_goal, identifying_values
from agenther.evidence.render import defuse, tool_calls
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, map_concurrent
from agenther.llm.answers import RelabelAnswer
from agenther.llm.ask import ask

STAGE = "relabel"
SCHEMA = RelabelAnswer  # the answer's contract (agenther/llm/answers.py)
USER_WORDS = 3  # the user's own turns shown to the relabeler, at most (the last ones: they confirm)
USER_CHARS = 110
FACTS = 2  # facts shown to the relabeler, at most (the last ones: the final report)
FACT_CHARS = 150
MAX_DETAILS = 16


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def similarity(a: str, b: str) -> float:
    return SequenceMatcher(None, _plain(a), _plain(b)).ratio()


def goal_of(row: dict) -> AchievedGoal:
    return AchievedGoal.model_validate_json(row["achieved_goal"])


def user_words(goal: AchievedGoal) -> str:
    said = [w for w in goal.user_words if w.strip()][-USER_WORDS:]
    if not said:
        return "(nothing)"
    return "\n".join(f'- "{defuse(" ".join(w.split())[:USER_CHARS])}"' for w in said)


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
INSTRUCTION_WORDS = re.compile(r"\b(name (all|one or more) of|told the user|looked up|done|fix)\s*:", re.I)


# The words of relabel.txt's example (a library loan): small models copy examples verbatim.
EXAMPLE_WORDS = frozenset({"library", "loan", "renew", "l2291", "fines", "m880"})
# A user's request says "my"; the agent says "your", and small models describe the record itself.
AGENT_VOICE = re.compile(r"\b(your|you wish|you want|you would like|you'd like)\b", re.I)
META = re.compile(r"\b((?i:assistant|agent|record|customer|the user|chatbot|conversation)|AI)\b")
# A request asks: a question, a word of asking or wanting, or an imperative ("Cancel my ...").
ASKING = re.compile(r"\?|\b(please|want|need|would like|'d like|wish|help|could|can|would|tell|show|find|check|"
                    r"let me know|give|get|send|make|book|cancel|change|update|modify|upgrade|downgrade|add|"
                    r"remove|move|switch|return|refund|pay|buy|order|reserve|search|look up|renew|what|which|how|"
                    r"when|where|who|is there|are there|do i|does)\b", re.I)


def not_the_users_voice(prompt: str) -> str | None:
    """Why the prompt is not a user's request (it speaks as the agent, or about the record), or None."""
    if META.search(prompt):
        return f"the prompt speaks about the conversation, not as the user: {prompt[:80]!r}"
    if AGENT_VOICE.search(prompt):
        return f"the prompt speaks to the user, as the agent would: {prompt[:80]!r}"
    if not ASKING.search(prompt):
        return f"the prompt asks for nothing: {prompt[:80]!r}"
    return None


def gate(answer: dict, row: dict, params: dict) -> tuple[str, str] | None:
    """None when the attempt passes; otherwise (reason code, detail)."""
    p = params["relabel"]
    prompt = answer["hindsight_prompt"].strip()
    confidence = answer["confidence"]
    if len(prompt.split()) < 3:
        return "empty_prompt", f"hindsight prompt too short: {prompt!r}"
    goal = goal_of(row)
    if pastes_log(prompt, goal, record_of(row, params)):
        return "copies_achievement", f"the prompt pastes the record instead of asking: {prompt[:80]!r}"
    copied = EXAMPLE_WORDS.intersection(_plain(prompt).split())
    if copied:
        return "copies_example", f"the prompt copies the template's example ({', '.join(sorted(copied))}): {prompt[:80]!r}"
    voice = not_the_users_voice(prompt)
    if voice:
        return "not_a_request", voice
    if not 0.0 <= confidence <= 1.0:
        return "invalid_llm_answer", f"confidence {confidence} outside [0, 1]"
    sim = similarity(prompt, row["goal"] or "")
    if sim > p["max_goal_similarity"]:
        return "repeats_goal", f"similarity {sim:.2f} to the failed goal"
    missed = coverage.misses(prompt, goal, row, params)  # grounding in the sample included
    if missed:
        return missed[0][0], "; ".join(detail for _, detail in missed)
    if confidence < p["confidence_threshold"]:
        return "low_confidence", f"confidence {confidence:.2f} < {p['confidence_threshold']}"
    return None


# What the next attempt is told to do about each kind of miss (small models follow an
# instruction better than a quoted rejection).
FIXES = {
    "empty_prompt": "Write one to three full sentences.",
    "copies_achievement": "Do not copy the record or the agent's words and use no tool names: write what the user typed.",
    "copies_example": "The example is from another shop: write about this record only.",
    "not_a_request": 'Write the user\'s own request or question, in the first person ("I", "my"): never "your", '
                     "never about the agent or the conversation.",
    "repeats_goal": "Ask only for what DONE shows.",
    "unmet_requirement": "Ask only for what the record shows.",
    "low_confidence": "Ask only for what the record shows, naming its details.",
}


def feedback(failures: list[tuple[str, str, str]], row: dict, params: dict) -> str:
    """What the next attempt is told about the previous one (empty for the first attempt): the
    rejection in plain words (tool names spaced, no step numbers) and what to do instead,
    including the details the request still has to name."""
    if not failures:
        return ""
    prompt, code, why = failures[-1]
    for tool in sorted({c["name"] for c in tool_calls(row["messages"])}, key=len, reverse=True):
        why = why.replace(tool, tool.replace("_", " "))
    why = re.sub(r" \(step \d+\)", "", why)
    todo = [FIXES.get(code, "")]
    goal = goal_of(row)
    request = "\n".join([prompt, *goal.user_words])
    unnamed = [d for d in coverage.required_details(goal, row, params) if not coverage.asked(d, request)]
    if unnamed and (goal.actions or code == "unmet_requirement"):
        labelled = [_labelled(d, goal) for d in unnamed[:MAX_DETAILS]]
        todo.append(("Name all of: " if goal.actions else "Name one or more of: ") + ", ".join(labelled))
    return (f'\nYOUR PREVIOUS ANSWER "{defuse(prompt[:150])}" WAS REJECTED: {defuse(why[:160])}\n'
            f"FIX: {' '.join(t for t in todo if t)}")


def _labelled(value: str, goal: AchievedGoal) -> str:
    """A detail with the argument it fills ("total baggages 3"): a bare "3" tells a small model
    nothing, and it pastes it."""
    for arguments in [*(a.arguments for a in goal.actions), *(r.arguments for f in goal.facts for r in f.reads)]:
        for key, v in arguments.items():
            if value in identifying_values({key: v}, exempt=False):
                return f"{key.replace('_', ' ')} {value}"
    return value


def record_of(row: dict, params: dict) -> str:
    """The record the relabeler reads: the goal, and the details its request must name (the
    coverage check's own list: small models drop details unless told which)."""
    goal = goal_of(row)
    record = describe_goal(goal, 0 if goal.actions else FACTS, FACT_CHARS)  # a change needs no report to ask for it
    details = coverage.required_details(goal, row, params)
    if details:
        record += ("\nNAME ALL OF: " if goal.actions else "\nNAME ONE OR MORE OF: ") + ", ".join(details[:MAX_DETAILS])
    return record


def relabel_one(row: dict, params: dict, llm: LLMClient) -> tuple[dict | None, dict | None]:
    p = params["relabel"]
    record = defuse(record_of(row, params))
    said = user_words(goal_of(row))
    temperatures = p["temperatures"]
    failures: list[tuple[str, str, str]] = []  # (prompt, code, why) of each failed attempt
    for attempt in range(p["max_attempts"]):
        temperature = temperatures[min(attempt, len(temperatures) - 1)]
        asked = ask(llm, "relabel", SCHEMA, stage=STAGE, temperatures=[temperature], attempts=1,
                    first_seed=attempt, record=record, user_words=said, feedback=feedback(failures, row, params))
        if asked.budget_exhausted:  # left undone, not judged: no further attempt can start
            detail = "; ".join([*(f"attempt {i + 1}: {code} ({why})" for i, (_, code, why) in enumerate(failures)),
                                asked.error or BUDGET_EXHAUSTED])
            return None, schema.rejection(row["id"], STAGE, BUDGET_EXHAUSTED, detail)
        verdict = ("invalid_llm_answer", asked.error or "") if asked.data is None else gate(asked.data, row, params)
        if verdict is None:
            return row | {
                "hindsight_prompt": asked.data["hindsight_prompt"].strip(),
                "relabel_confidence": float(asked.data["confidence"]),
                "relabel_attempts": attempt + 1,
                "relabel_rationale": str(asked.data.get("rationale") or ""),
                "relabel_model": llm.name,
            }, None
        said_prompt = (asked.data or {}).get("hindsight_prompt") or ""
        failures.append((said_prompt if isinstance(said_prompt, str) else "", *verdict))
    reason = failures[-1][1]
    detail = "; ".join(f"attempt {i + 1}: {code} ({why})" for i, (_, code, why) in enumerate(failures))
    return None, schema.rejection(row["id"], STAGE, reason, detail)


def relabel_output(results: list[tuple[dict | None, dict | None]]) -> schema.StageOutput:
    """The stage's tables from relabel_one's results, in input order."""
    kept = [k for k, _ in results if k is not None]
    rejected = [r for _, r in results if r is not None]
    return schema.StageOutput(schema.frame(kept, schema.RELABELED), schema.frame(rejected, schema.REJECTION))


def relabel(extracted: pl.DataFrame, params: dict, llm: LLMClient) -> schema.StageOutput:
    results = map_concurrent(lambda r: relabel_one(r, params, llm), extracted.to_dicts(),
                             params["llm"]["concurrency"])
    return relabel_output(results)
