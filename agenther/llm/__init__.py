"""agenther's LLM layer: every call to a language model goes through here.

    errors.py       what can go wrong (LLMError, PromptTooLong, BudgetExhausted, CallFailed, ...)
    backend.py      litellm, imported at the first real call and configured once
    transport.py    one call through litellm as plain values (Completion), retry timing
    client.py       LLMClient.complete_json: cache, budget, rate limit, in-flight limit, retries, cost
    cache.py        the content-addressed answer cache on disk
    limits.py       the run's Budget and the per-provider RateLimiter
    usage.py        Usage: calls, hits, tokens and cost per stage
    concurrency.py  map_concurrent: the stages' concurrent map over records
    call_pool.py    worker processes for the calls (llm.processes)
    providers.py    LLMs: the models a run uses, built from params (the seam to the stages)
    models.py       the registry of local GGUF models shipped in PyPI wheels (python -m agenther.llm.models)
    server.py       the llama.cpp server process that serves one of them
    answers.py      the pydantic contracts of the answers
    ask.py          ask(): a template filled, asked, its answer validated, retried

This module exports the names the rest of agenther uses; it imports nothing heavy (litellm is
imported at the first real call, pydantic only by answers.py and ask.py).
"""

from agenther.llm.client import Answer, LLMClient, format_kind
from agenther.llm.concurrency import map_concurrent
from agenther.llm.errors import (
    BUDGET_EXHAUSTED,
    BudgetExhausted,
    CallFailed,
    LLMError,
    LLMUnreachable,
    PromptTooLong,
    permanent_errors,
    transient_errors,
)
from agenther.llm.limits import Budget, RateLimiter, estimate_tokens
from agenther.llm.providers import LLMs
from agenther.llm.transport import Completion, backoff_delay, call_litellm
from agenther.llm.usage import Usage

__all__ = [
    "BUDGET_EXHAUSTED",
    "Answer",
    "Budget",
    "BudgetExhausted",
    "CallFailed",
    "Completion",
    "LLMClient",
    "LLMError",
    "LLMUnreachable",
    "LLMs",
    "PromptTooLong",
    "RateLimiter",
    "Usage",
    "backoff_delay",
    "call_litellm",
    "estimate_tokens",
    "format_kind",
    "map_concurrent",
    "permanent_errors",
    "transient_errors",
]
