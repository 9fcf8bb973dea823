"""The one door to language models: litellm, a content-addressed cache, retries, accounting.

Every LLM call in agenther goes through `LLMClient.complete_json`. A call's answer is
cached on disk under the sha256 of everything that determines it (model identity,
messages, sampling parameters, response format), so a rerun makes zero calls.

Around each real call (never around a cache hit), in this order:
- `Budget`: a run-wide cap on tokens and/or USD; once spent reaches it no new call starts
  (`BudgetExhausted`), while answers already in the cache are still served;
- `RateLimiter`: token buckets for requests and tokens per minute, one per provider
  (model + api_base), shared by every client and thread that talks to it;
- an in-flight semaphore: at most llm.concurrency requests open at once across the run's clients;
- retries on 429/5xx/timeouts with exponential backoff and jitter, honouring Retry-After.

Concurrency is a thread pool (`map_concurrent`): litellm's sync client is thread-safe and
the work is I/O bound (waiting on HTTP), so threads overlap the waiting without an event
loop; results keep input order, so outputs do not depend on completion order.

The HTTP call itself is `call_litellm`, the client's `transport`: in this process by default,
or in worker processes (agenther/call_pool.py, llm.processes) when litellm's own CPU per call
is what limits a run. Its answer (`Completion`) and failure (`CallFailed`) are plain values so
that they cross a process boundary; everything above (cache, budget, limits, retries) stays here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from agenther import stopping

log = logging.getLogger("agenther.llm")


@functools.cache
def _litellm() -> ModuleType:
    """litellm, imported at the first real call (2-5 s): a run served from stamps or the cache
    never pays for it. agenther/__init__.py has set LITELLM_LOCAL_MODEL_COST_MAP: no network."""
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        # Their INFO lines echo every request; ours say what matters, and never carry keys.
        logging.getLogger(name).setLevel(logging.WARNING)
    return litellm


def transient_errors() -> tuple[type[Exception], ...]:
    """litellm's errors worth a retry: 429, 5xx, timeouts, dropped or refused connections."""
    e = _litellm().exceptions
    return (e.RateLimitError, e.InternalServerError, e.ServiceUnavailableError, e.BadGatewayError,
            e.Timeout, e.APIConnectionError)


def permanent_errors() -> tuple[type[Exception], ...]:
    """Errors a retry cannot fix. (A prompt too long for the model is the record's problem: ask()
    turns ContextWindowExceededError into a rejection of that record.)"""
    e = _litellm().exceptions
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


class BudgetExhausted(RuntimeError):
    """The run's LLM budget (llm.budget_usd / llm.budget_tokens) is spent: no new call starts."""


BUDGET_EXHAUSTED = "budget_exhausted"  # the rejection reason for records left undone


class Budget:
    """A run-wide spending cap, shared by every client of the run (thread-safe).

    `check()` before a call raises BudgetExhausted once spent >= a limit; `charge()` after
    it adds the real usage. Calls already in flight when the cap is reached still finish,
    so spent can exceed a limit by at most (concurrency - 1) calls."""

    def __init__(self, usd: float | None = None, tokens: int | None = None):
        self.usd = None if usd is None else float(usd)
        self.tokens = None if tokens is None else int(tokens)
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self.refused = 0  # calls that did not start because the budget was spent
        self._lock = threading.Lock()

    @classmethod
    def from_params(cls, llm_params: dict) -> Budget:
        return cls(llm_params.get("budget_usd"), llm_params.get("budget_tokens"))

    @property
    def limited(self) -> bool:
        return self.usd is not None or self.tokens is not None

    def exhausted(self) -> bool:
        with self._lock:
            return self._reached()

    def _reached(self) -> bool:
        return ((self.usd is not None and self.spent_usd >= self.usd)
                or (self.tokens is not None and self.spent_tokens >= self.tokens))

    def check(self) -> None:
        with self._lock:
            if self._reached():
                self.refused += 1
                raise BudgetExhausted(
                    f"LLM budget spent: {self.spent_tokens} tokens / ${self.spent_usd:.6f} "
                    f"(limits: tokens={self.tokens}, usd={self.usd})")

    def charge(self, tokens: int, usd: float) -> None:
        with self._lock:
            self.spent_tokens += int(tokens)
            self.spent_usd += float(usd)


class RateLimiter:
    """Token buckets for one provider: requests per minute and tokens per minute (None = no limit).

    Both buckets start full and refill continuously. `acquire(tokens)` blocks until one
    request and `tokens` tokens are available, then takes them; `correct(actual - estimate)`
    settles the token bucket once the real usage is known. Thread-safe; `clock` and `sleep`
    are injectable so a test can drive it without waiting."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = stopping.sleep):
        self.rpm = float(requests_per_minute) if requests_per_minute else None
        self.tpm = float(tokens_per_minute) if tokens_per_minute else None
        self.clock, self.sleep = clock, sleep
        self._requests = self.rpm or 0.0
        self._tokens = self.tpm or 0.0
        self._last = clock()
        self._lock = threading.Lock()
        self.waited_s = 0.0  # total time callers spent waiting here

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _refill(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self.rpm:
            self._requests = min(self.rpm, self._requests + elapsed * self.rpm / 60.0)
        if self.tpm:
            self._tokens = min(self.tpm, self._tokens + elapsed * self.tpm / 60.0)

    def acquire(self, tokens: int = 0) -> float:
        """Wait until the call may start; returns the seconds waited."""
        if not self.limited:
            return 0.0
        tokens = min(float(tokens), self.tpm) if self.tpm else 0.0  # one huge call must still pass
        waited = 0.0
        while True:
            with self._lock:
                self._refill()
                wait = 0.0
                if self.rpm and self._requests < 1.0:
                    wait = (1.0 - self._requests) * 60.0 / self.rpm
                if self.tpm and self._tokens < tokens:
                    wait = max(wait, (tokens - self._tokens) * 60.0 / self.tpm)
                if wait <= 1e-9:
                    if self.rpm:
                        self._requests -= 1.0
                    if self.tpm:
                        self._tokens -= tokens
                    self.waited_s += waited
                    return waited
            self.sleep(wait)
            waited += wait

    def correct(self, delta_tokens: int) -> None:
        """Settle the token bucket: delta = real tokens - the estimate taken by acquire()."""
        if not self.tpm or not delta_tokens:
            return
        with self._lock:
            self._refill()
            self._tokens = min(self.tpm, self._tokens - delta_tokens)


def estimate_tokens(messages: list[dict], max_tokens: int) -> int:
    """Before the call: ~4 characters per prompt token plus the whole completion allowance."""
    return sum(len(str(m.get("content", ""))) for m in messages) // 4 + int(max_tokens)


@dataclass
class Answer:
    data: dict | None  # parsed JSON object, or None when the answer was not valid JSON
    raw: str
    error: str | None = None  # why `data` is None
    cached: bool = False


@dataclass
class Usage:
    calls: int = 0
    cache_hits: int = 0
    failed_calls: int = 0
    retries: int = 0
    budget_refused: int = 0  # calls not made because the run's budget was spent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Usage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @staticmethod
    def total(usages: Iterable[Usage]) -> Usage:
        total = Usage()
        for u in usages:
            total.add(u)
        return total


@dataclass
class LLMClient:
    model: str  # a litellm model name, e.g. "openai/local" or "gpt-4o-mini"
    api_base: str | None = None
    api_key: str | None = None  # never logged, never part of a cache key
    identity: str | None = None  # what the cache key calls this model (default: model)
    cache_dir: Path | None = None
    max_tokens: int = 384
    timeout_s: float = 120.0
    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0  # cap of one backoff delay (before jitter) and of Retry-After
    response_format: str = "auto"  # auto | json_object_schema | json_schema | json_object
    usage: dict[str, Usage] = field(default_factory=dict)  # per stage
    budget: Budget | None = None  # shared by the run's clients (providers.LLMs)
    limiter: RateLimiter | None = None  # shared by the clients of one provider
    inflight: threading.Semaphore | None = None  # shared in-flight limit (llm.concurrency)
    transport: Callable[[dict], Completion] = field(default=call_litellm, repr=False)  # or a CallPool's
    sleep: Callable[[float], None] = field(default=stopping.sleep, repr=False)  # backoff waits: end on a stop
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.identity or self.model

    # -- public -----------------------------------------------------------------------------
    def complete_json(
        self, messages: list[dict], schema: dict, *, temperature: float, stage: str, seed: int = 0
    ) -> Answer:
        """Ask for one JSON object that follows `schema`. Transport errors are retried here;
        an answer that is not JSON comes back with `data=None` and `error` set."""
        request = {
            "model": self.name,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
            "response_format": self._response_format(schema),
        }
        key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        usage = self._usage(stage)
        cached = self._cache_get(key)
        if cached is not None:
            with self._lock:
                usage.cache_hits += 1
            return _parse(cached["raw"], cached=True)

        if self.budget is not None:
            try:
                self.budget.check()
            except BudgetExhausted:
                with self._lock:
                    usage.budget_refused += 1
                raise
        completion = self._call_with_retries(request, usage, estimate_tokens(messages, self.max_tokens))
        raw = completion.content
        prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        # cached first: an answer paid for survives a stop or a kill while it is being priced
        # (the first pricing imports litellm in this process, seconds when calls run in workers)
        self._cache_put(key, {"raw": raw, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
        cost = self._cost(completion)
        with self._lock:
            usage.calls += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.cost_usd += cost
        if self.budget is not None:
            self.budget.charge(prompt_tokens + completion_tokens, cost)
        return _parse(raw)

    # -- internals --------------------------------------------------------------------------
    def _usage(self, stage: str) -> Usage:
        with self._lock:
            return self.usage.setdefault(stage, Usage())

    def _response_format(self, schema: dict) -> dict:
        kind = format_kind(self.response_format, self.model, self.api_base)
        if kind == "json_object_schema":
            return {"type": "json_object", "schema": schema}
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        return {"type": "json_object"}

    def _cost(self, completion: Completion) -> float:
        """USD from litellm's offline price map for the declared model and the real usage, else
        litellm's price for the model that answered; 0 for local and unknown models. The map is
        fixed for the process, so a declared model found unpriced is not looked up again."""
        if self.model not in _UNPRICED:  # module-wide: the price map is the same for every client
            try:
                prompt_usd, completion_usd = _litellm().cost_per_token(
                    model=self.model, prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens)
                return float(prompt_usd) + float(completion_usd)
            except Exception:
                _UNPRICED.add(self.model)
        return completion.response_cost

    def _send(self, kwargs: dict, estimate: int) -> Completion:
        """One HTTP request: rate limit first, then at most `inflight` open at once. Once the run
        is told to stop (agenther.stopping), no request starts: Interrupted instead."""
        stopping.check()
        if self.limiter is not None:
            waited = self.limiter.acquire(estimate)
            if waited:
                log.info("rate limit: waited %.1fs for %s", waited, self.api_base or self.model)
        with self.inflight if self.inflight is not None else nullcontext():
            stopping.check()  # a stop may have come while this call waited for a free slot
            completion = self.transport(kwargs)
        if self.limiter is not None:
            real = completion.prompt_tokens + completion.completion_tokens
            self.limiter.correct(real - min(estimate, int(self.limiter.tpm or estimate)))
        return completion

    def _call_with_retries(self, request: dict, usage: Usage, estimate: int = 0) -> Completion:
        kwargs = dict(request, model=self.model, timeout=self.timeout_s, num_retries=0, max_retries=0)
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key:
            kwargs["api_key"] = self.api_key
        endpoint = self.api_base or self.model
        for attempt in range(self.max_retries + 1):
            try:
                return self._send(kwargs, estimate)
            except CallFailed as failed:
                stopping.check()  # stopping: the failure is the abandoned call's (a worker killed)
                if failed.kind == "prompt_too_long":
                    raise PromptTooLong(f"the prompt exceeds {self.name}'s context window") from None
                if failed.kind == "permanent":
                    raise LLMError(f"LLM endpoint {endpoint}: {failed.name} {failed.status or ''}".strip()
                                   + " (not retried: check the model name, key and request)") from None
                if failed.kind != "transient":
                    raise LLMError(f"LLM call to {endpoint} failed: {failed.name}: {failed.detail}") from None
                last = attempt == self.max_retries
                with self._lock:
                    usage.failed_calls += 1
                    usage.retries += 0 if last else 1
                if last:
                    if failed.unreachable:
                        raise LLMUnreachable(f"LLM endpoint {endpoint} unreachable "
                                             f"after {self.max_retries + 1} attempts") from None
                    raise LLMError(f"LLM endpoint {endpoint}: {failed.name} after {self.max_retries + 1} "
                                   f"attempts (timeout_s={self.timeout_s})", transient=True) from None
                delay = backoff_delay(attempt, self.backoff_s, self.max_backoff_s, failed.retry_after)
                log.warning("LLM call failed (%s), retry %d in %.1fs", failed.name, attempt + 1, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        path = self._cache_path(key)
        if path is None:
            return None
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("unreadable LLM cache entry %s (%s): treated as a miss", path.name, exc)
            return None
        try:
            entry = json.loads(text)
            body = entry["body"]
            if entry["key"] != key or entry["sha256"] != _digest(body):
                raise ValueError("checksum mismatch")
            return body
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("corrupt LLM cache entry %s (%s): treated as a miss", path.name, exc)
            return None

    def _cache_put(self, key: str, body: dict) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        folder = path.parent
        if folder not in _MADE_DIRS:  # one mkdir per shard folder and process, not one per call
            folder.mkdir(parents=True, exist_ok=True)
            _MADE_DIRS.add(folder)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        entry = json.dumps({"key": key, "sha256": _digest(body), "body": body}, sort_keys=True)
        try:
            tmp.write_text(entry)
        except FileNotFoundError:  # the folder went away since (a test or a user cleaned the cache)
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(entry)
        tmp.replace(path)  # atomic: a killed run never leaves half an entry


@functools.cache
def format_kind(response_format: str, model: str, api_base: str | None) -> str:
    """The response_format kind for a client's setting and model (cached: litellm's
    capability lookup is not free, and the answer depends on these three only)."""
    if response_format != "auto":
        return response_format
    # llama.cpp servers take a schema inside json_object (grammar-constrained) and
    # reject json_schema; hosted providers that support json_schema get it.
    if api_base and model.startswith("openai/"):
        return "json_object_schema"
    if _litellm().supports_response_schema(model=model):
        return "json_schema"
    return "json_object"


_UNPRICED: set[str] = set()  # declared models litellm's offline price map has no price for
_MADE_DIRS: set[Path] = set()  # cache shard folders this process has created or found


def _is_connection_error(exc: Exception) -> bool:
    # litellm reports a refused connection to an OpenAI-compatible server as an
    # InternalServerError whose message says "Connection error".
    errors = _litellm().exceptions
    if isinstance(exc, errors.Timeout):
        return False
    return isinstance(exc, errors.APIConnectionError) or "Connection error" in str(exc)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _parse(raw: str, cached: bool = False) -> Answer:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Answer(None, raw, f"invalid JSON: {exc.msg} at char {exc.pos}", cached)
    if not isinstance(data, dict):
        return Answer(None, raw, f"expected a JSON object, got {type(data).__name__}", cached)
    return Answer(data, raw, None, cached)


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


T = TypeVar("T")
R = TypeVar("R")


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> list[R]:
    """Apply fn to every item with at most `concurrency` in flight; results keep input order.

    The workers are daemon threads that take the next item as they finish one. When an item
    fails, no new item starts, and the ones in progress stop before their next LLM call; the
    failure is raised once they have (the first failed item's, in input order, an interruption
    only if nothing else failed). When the run is told to stop (agenther.stopping), or the
    waiting thread is interrupted (a signal's exception, Prefect's cancellation), the map is left
    at once: no new item or call starts, and calls still open are abandoned (their threads end
    with the process; answers that arrive meanwhile are still cached)."""
    items = list(items)
    if concurrency <= 1 or len(items) <= 1:
        results = []
        for item in items:
            stopping.check()
            results.append(fn(item))
        return results
    out: list = [None] * len(items)
    failed: dict[int, BaseException] = {}
    todo = iter(range(len(items)))
    lock = threading.Lock()
    cancelled = threading.Event()
    workers = min(concurrency, len(items))
    running = [workers]
    finished = threading.Event()

    def work() -> None:
        try:
            with stopping.working_for(cancelled):
                while True:
                    with lock:
                        i = None if cancelled.is_set() or stopping.stop_requested() else next(todo, None)
                    if i is None:
                        return
                    try:
                        out[i] = fn(items[i])
                    except BaseException as exc:  # recorded for the waiting thread, which raises it
                        with lock:
                            failed[i] = exc
                        cancelled.set()
                        return
        finally:
            with lock:
                running[0] -= 1
                if not running[0]:
                    finished.set()

    try:
        for n in range(workers):
            threading.Thread(target=work, daemon=True, name=f"agenther-map-{n}").start()
        # A timed wait: an untimed join can sit through a signal delivered to another thread,
        # while this returns to Python every 0.1 s, where the signal's handler runs.
        while not finished.wait(0.1):
            stopping.check()  # a stop requested from another thread: leave the open calls too
    except BaseException:
        cancelled.set()  # this map only: the caller decides whether the whole run stops
        raise
    stopping.check()
    if failed:
        real = [i for i, exc in failed.items() if not isinstance(exc, stopping.Interrupted)]
        raise failed[min(real or failed)]
    return out

