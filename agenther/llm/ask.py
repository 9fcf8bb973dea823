"""Ask an LLM for one JSON answer from a prompt template, retrying answers that break its contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic

from agenther import prompts
from agenther.llm.answers import A, schema_of, validate
from agenther.llm.client import LLMClient
from agenther.llm.errors import BUDGET_EXHAUSTED, BudgetExhausted, PromptTooLong


@dataclass
class Asked(Generic[A]):
    answer: A | None  # the validated answer (None when every attempt failed)
    error: str | None  # why every attempt failed (None when answer is set)
    attempts: int
    budget_exhausted: bool = False  # the run's LLM budget was spent before an answer came

    @property
    def data(self) -> dict | None:
        """The validated answer as a dict (its model's fields only), or None."""
        return None if self.answer is None else self.answer.model_dump()


def ask(
    llm: LLMClient,
    template: str,
    answer: type[A],
    *,
    stage: str,
    temperatures: list[float],
    attempts: int,
    first_seed: int = 0,
    **values: str,
) -> Asked[A]:
    """Up to `attempts` calls; attempt i uses temperatures[i] (the last one repeats).
    The provider is sent `answer`'s JSON schema; an answer that is not JSON or does not validate
    against `answer` (agenther.llm.answers) counts as a failed attempt.
    A spent budget (BudgetExhausted) ends the asking at once: `budget_exhausted` is set and
    `error` starts with "budget_exhausted", so callers reject the record as left undone."""
    messages = [{"role": "user", "content": prompts.fill(template, **values)}]
    schema = schema_of(answer)
    error = None
    for i in range(attempts):
        temperature = temperatures[min(i, len(temperatures) - 1)]
        try:
            reply = llm.complete_json(messages, schema, temperature=temperature, stage=stage, seed=first_seed + i)
        except BudgetExhausted as exc:
            return Asked(None, f"{BUDGET_EXHAUSTED}: {exc}", i, budget_exhausted=True)
        except PromptTooLong:
            return Asked(None, "the prompt exceeds the model's context window (lower llm.context_tokens)", i + 1)
        if reply.error is not None:
            error = reply.error
            continue
        valid, error = validate(answer, reply.data)
        if valid is not None:
            return Asked(valid, None, i + 1)
    return Asked(None, f"invalid LLM answer after {attempts} attempt(s): {error}", attempts)
