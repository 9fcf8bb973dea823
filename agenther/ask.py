"""Ask an LLM for one JSON object from a prompt template, retrying invalid answers."""

from __future__ import annotations

from dataclasses import dataclass

from agenther import prompts
from agenther.llm import BUDGET_EXHAUSTED, BudgetExhausted, LLMClient, PromptTooLong, check_schema


@dataclass
class Asked:
    data: dict | None
    error: str | None  # why every attempt failed (None when data is set)
    attempts: int
    budget_exhausted: bool = False  # the run's LLM budget was spent before an answer came


def ask(
    llm: LLMClient,
    template: str,
    schema: dict,
    *,
    stage: str,
    temperatures: list[float],
    attempts: int,
    first_seed: int = 0,
    **values: str,
) -> Asked:
    """Up to `attempts` calls; attempt i uses temperatures[i] (the last one repeats).
    An answer that is not JSON or misses required keys counts as a failed attempt.
    A spent budget (BudgetExhausted) ends the asking at once: `budget_exhausted` is set and
    `error` starts with "budget_exhausted", so callers reject the record as left undone."""
    messages = [{"role": "user", "content": prompts.fill(template, **values)}]
    error = None
    for i in range(attempts):
        temperature = temperatures[min(i, len(temperatures) - 1)]
        try:
            answer = llm.complete_json(messages, schema, temperature=temperature, stage=stage, seed=first_seed + i)
        except BudgetExhausted as exc:
            return Asked(None, f"{BUDGET_EXHAUSTED}: {exc}", i, budget_exhausted=True)
        except PromptTooLong:
            return Asked(None, "the prompt exceeds the model's context window (lower llm.context_tokens)", i + 1)
        error = answer.error or (check_schema(answer.data, schema) if answer.data is not None else None)
        if error is None:
            return Asked(answer.data, None, i + 1)
    return Asked(None, f"invalid LLM answer after {attempts} attempt(s): {error}", attempts)
