"""Stage 3: an LLM proposes the hindsight prompt a failed run fully satisfies, behind a gate.

Each attempt must be valid JSON, carry a confidence at or above the threshold, and not
restate the failed goal (small models often do). Attempt i samples at temperatures[i].
A record with no passing attempt after max_attempts is rejected with the last reason:
there is no "best attempt" fallback. A record reached after the run's LLM budget is spent
is rejected as `budget_exhausted` (left undone).
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

import polars as pl

from agenther import schema
from agenther.ask import ask
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, map_concurrent
from agenther.render import estimate_tokens, prompt_budget, render

STAGE = "relabel"
SCHEMA = {
    "type": "object",
    "properties": {
        "hindsight_prompt": {"type": "string"},
        "confidence": {"type": "number"},
        "rationale": {"type": "string"},
    },
    "required": ["hindsight_prompt", "confidence", "rationale"],
}


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def similarity(a: str, b: str) -> float:
    return SequenceMatcher(None, _plain(a), _plain(b)).ratio()


MAX_ACHIEVEMENTS = 12  # the prompt lists at most this many (actions first): small contexts fill fast


def describe_achievements(achievements: list[dict]) -> str:
    ranked = sorted(achievements, key=lambda a: a["kind"] != "action")[:MAX_ACHIEVEMENTS]
    return "\n".join(f"- {a['text']} (steps {', '.join(map(str, a['steps']))})" for a in ranked)


def copies_achievement(prompt: str, achievements: list[dict]) -> bool:
    """Small models paste the achievement list back ("update reservation flights succeeded
    with {...}"): that is a log line, not a request a user would make."""
    plain = _plain(prompt)
    return "{" in prompt or any(_plain(a["text"])[:30] in plain for a in achievements if len(a["text"]) >= 30)


def gate(answer: dict, row: dict, params: dict) -> tuple[str, str] | None:
    """None when the attempt passes; otherwise (reason code, detail)."""
    prompt = answer["hindsight_prompt"].strip()
    confidence = answer["confidence"]
    if len(prompt.split()) < 3:
        return "empty_prompt", f"hindsight prompt too short: {prompt!r}"
    if copies_achievement(prompt, row["achievements"]):
        return "copies_achievement", f"the prompt pastes the achievement list: {prompt[:80]!r}"
    if not 0.0 <= confidence <= 1.0:
        return "invalid_llm_answer", f"confidence {confidence} outside [0, 1]"
    sim = similarity(prompt, row["goal"] or "")
    if sim > float(params["max_goal_similarity"]):
        return "repeats_goal", f"similarity {sim:.2f} to the failed goal"
    if confidence < float(params["confidence_threshold"]):
        return "low_confidence", f"confidence {confidence:.2f} < {params['confidence_threshold']}"
    return None


def relabel_one(row: dict, params: dict, llm: LLMClient) -> tuple[dict | None, dict | None]:
    p = params["relabel"]
    evidence = {s for a in row["achievements"] for s in a["steps"]}
    achievements = describe_achievements(row["achievements"])
    budget = max(256, prompt_budget(params) - estimate_tokens(achievements))
    transcript = render(row["messages"], keep=evidence, budget_tokens=budget)
    temperatures = [float(t) for t in p["temperatures"]]
    failures = []
    for attempt in range(int(p["max_attempts"])):
        temperature = temperatures[min(attempt, len(temperatures) - 1)]
        asked = ask(llm, "relabel", SCHEMA, stage=STAGE, temperatures=[temperature], attempts=1,
                    first_seed=attempt, achievements=achievements,
                    transcript=transcript)
        if asked.budget_exhausted:  # left undone, not judged: no further attempt can start
            detail = "; ".join([*(f"attempt {i + 1}: {code} ({why})" for i, (code, why) in enumerate(failures)),
                                asked.error or BUDGET_EXHAUSTED])
            return None, schema.rejection(row["id"], STAGE, BUDGET_EXHAUSTED, detail)
        verdict = ("invalid_llm_answer", asked.error) if asked.data is None else gate(asked.data, row, p)
        if verdict is None:
            return row | {
                "hindsight_prompt": asked.data["hindsight_prompt"].strip(),
                "relabel_confidence": float(asked.data["confidence"]),
                "relabel_attempts": attempt + 1,
                "relabel_rationale": str(asked.data["rationale"]),
                "relabel_model": llm.name,
            }, None
        failures.append(verdict)
    reason = failures[-1][0]
    detail = "; ".join(f"attempt {i + 1}: {code} ({why})" for i, (code, why) in enumerate(failures))
    return None, schema.rejection(row["id"], STAGE, reason, detail)


def relabel_output(results: list[tuple[dict | None, dict | None]]) -> schema.StageOutput:
    """The stage's tables from relabel_one's results, in input order."""
    kept = [k for k, _ in results if k is not None]
    rejected = [r for _, r in results if r is not None]
    return schema.StageOutput(schema.frame(kept, schema.RELABELED), schema.frame(rejected, schema.REJECTION))


def relabel(extracted: pl.DataFrame, params: dict, llm: LLMClient) -> schema.StageOutput:
    results = map_concurrent(lambda r: relabel_one(r, params, llm), extracted.to_dicts(),
                             int(params["llm"]["concurrency"]))
    return relabel_output(results)
