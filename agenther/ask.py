"""Ask an LLM for one JSON object from a prompt template, retrying invalid answers."""

from __future__ import annotations

from dataclasses import dataclass

from agenther import prompts
from agenther.llm import LLMClient, check_schema


@dataclass
class Asked:
    data: dict | None
    error: str | None  # why every attempt failed (None when data is set)
    attempts: int


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
    An answer that is not JSON or misses required keys counts as a failed attempt."""
    messages = [{"role": "user", "content": prompts.fill(template, **values)}]
    error = None
    for i in range(attempts):
        temperature = temperatures[min(i, len(temperatures) - 1)]
        answer = llm.complete_json(messages, schema, temperature=temperature, stage=stage, seed=first_seed + i)
        error = answer.error or (check_schema(answer.data, schema) if answer.data is not None else None)
        if error is None:
            return Asked(answer.data, None, i + 1)
    return Asked(None, f"invalid LLM answer after {attempts} attempt(s): {error}", attempts)
