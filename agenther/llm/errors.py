"""The LLM layer's errors: what a run, a stage or an orchestrator can catch, and which of
litellm's exceptions are worth a retry."""

from __future__ import annotations

from agenther.llm.backend import litellm


def transient_errors() -> tuple[type[Exception], ...]:
    """litellm's errors worth a retry: 429, 5xx, timeouts, dropped or refused connections."""
    e = litellm().exceptions
    return (e.RateLimitError, e.InternalServerError, e.ServiceUnavailableError, e.BadGatewayError,
            e.Timeout, e.APIConnectionError)


def permanent_errors() -> tuple[type[Exception], ...]:
    """Errors a retry cannot fix. (A prompt too long for the model is the record's problem: ask()
    turns ContextWindowExceededError into a rejection of that record.)"""
    e = litellm().exceptions
    return (e.AuthenticationError, e.PermissionDeniedError, e.NotFoundError, e.BadRequestError)


class LLMError(RuntimeError):
    """The provider keeps failing (errors that outlast the retries, or that no retry can fix:
    bad key, unknown model, bad request): the run cannot go on. One line, no secrets.
    `transient`: the cause was a transient error (429/5xx/timeout) that outlasted the per-call
    retries, so an orchestrator may retry later (a Prefect task retry); False otherwise."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class LLMUnreachable(LLMError):
    """The endpoint refused connections after every retry."""


class PromptTooLong(RuntimeError):
    """The prompt does not fit the model's context window: the record's problem, not the run's
    (ask() turns it into a rejection of that record)."""


class CallFailed(Exception):
    """Why one litellm call failed, reduced to what the retry loop needs. Plain values only,
    so that it pickles across the pipe from a worker process.

    kind: "prompt_too_long" | "permanent" (a retry cannot fix it) | "transient" (429/5xx/timeout/
    connection) | "unexpected" (anything else a worker process caught)."""

    def __init__(self, kind: str, name: str, status: int | None = None, retry_after: float | None = None,
                 unreachable: bool = False, detail: str = ""):
        super().__init__(kind, name, status, retry_after, unreachable, detail)
        self.kind, self.name, self.status = kind, name, status
        self.retry_after, self.unreachable, self.detail = retry_after, unreachable, detail


class BudgetExhausted(RuntimeError):
    """The run's LLM budget (llm.budget_usd / llm.budget_tokens) is spent: no new call starts."""


BUDGET_EXHAUSTED = "budget_exhausted"  # the rejection reason for records left undone
