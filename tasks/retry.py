"""Which task failures are worth a retry.

agenther.llm already retries each LLM call on 429/5xx/timeouts with backoff; a task retry is
the second line, for an outage that outlasts those. Only transient errors are retried:
- LLM provider: rate limits, 5xx, timeouts (litellm's exception classes, agenther.llm.transient_errors(),
  and agenther.llm.LLMError with `transient` set: those errors outlasted the per-call retries);
- S3: throttling, 5xx, dropped or refused connections (botocore).
Everything else fails the run at once: a bad input, a schema violation, a bug, and
LLMUnreachable (the endpoint refused connections through every per-call retry: the server is
down or the address is wrong; retrying would only delay the one-line error for minutes).
"""

from __future__ import annotations

from typing import Any

from agenther.llm import LLMError, LLMUnreachable, transient_errors

S3_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, LLMUnreachable):
        return False
    if isinstance(exc, transient_errors()):
        return True
    if isinstance(exc, LLMError):
        return exc.transient
    try:  # botocore comes with boto3; keep this module importable without it
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            ReadTimeoutError,
        )
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in S3_TRANSIENT_CODES or int(status or 0) >= 500
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only for a transient error."""
    try:
        state.result()
    except BaseException as exc:  # the task's exception is re-raised by result()
        return is_transient(exc)
    return False
