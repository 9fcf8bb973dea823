"""One HTTP call through litellm, its answer and failure as plain values, and the retry timing.

`call_litellm` is the LLM client's default transport: the one place a request leaves agenther,
in this process or in a worker process (agenther/llm/call_pool.py). Its answer (`Completion`)
and failure (`CallFailed`) are plain values so that they cross a process boundary; the cache,
budget, limits and retries stay with the client (agenther/llm/client.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from agenther.llm.backend import litellm as _litellm
from agenther.llm.errors import CallFailed, permanent_errors, transient_errors


@dataclass(frozen=True)
class Completion:
    """One call's answer as plain values (it may come from a worker process)."""

    content: str
    prompt_tokens: int
    completion_tokens: int
    response_cost: float  # litellm's price for the answering model (0 when it has none)


def call_litellm(kwargs: dict) -> Completion:
    """One `litellm.completion(**kwargs)`: its answer as a Completion, its failure as CallFailed.
    The one place a request leaves agenther, whether in this process or in a worker."""
    litellm = _litellm()
    try:
        response = litellm.completion(**kwargs)
    except litellm.exceptions.ContextWindowExceededError:  # a BadRequestError: before the permanent ones
        raise CallFailed("prompt_too_long", "ContextWindowExceededError") from None
    except permanent_errors() as exc:
        # The message may quote the request or part of a key: only the type and status go on.
        raise CallFailed("permanent", type(exc).__name__, status=getattr(exc, "status_code", None)) from None
    except transient_errors() as exc:
        raise CallFailed("transient", type(exc).__name__, retry_after=_retry_after(exc),
                         unreachable=_is_connection_error(exc)) from None
    tokens = getattr(response, "usage", None)
    # litellm prices every answer while logging it; reading its figure costs no second lookup.
    hidden = getattr(response, "_hidden_params", None) or {}
    return Completion(content=response.choices[0].message.content or "",
                      prompt_tokens=int(getattr(tokens, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(tokens, "completion_tokens", 0) or 0),
                      response_cost=float(hidden.get("response_cost") or 0.0))


def _is_connection_error(exc: Exception) -> bool:
    # litellm reports a refused connection to an OpenAI-compatible server as an
    # InternalServerError whose message says "Connection error".
    errors = _litellm().exceptions
    if isinstance(exc, errors.Timeout):
        return False
    return isinstance(exc, errors.APIConnectionError) or "Connection error" in str(exc)


def backoff_delay(attempt: int, base_s: float, cap_s: float, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry `attempt` (0-based). The server's Retry-After wins (capped at
    cap_s); otherwise exponential backoff base_s * 2**attempt, capped, times a jitter
    factor in [1, 2) so that parallel callers do not retry in lockstep."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap_s)
    return min(base_s * (2**attempt), cap_s) * (1.0 + rand())


def _retry_after(exc: Exception) -> float | None:
    """Seconds from a Retry-After (seconds or an HTTP date) or retry-after-ms header."""
    headers = getattr(exc, "litellm_response_headers", None) or getattr(
        getattr(exc, "response", None), "headers", None
    )
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return float(ms) / 1000.0
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, AttributeError):
        return None
