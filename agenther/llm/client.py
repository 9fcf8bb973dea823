"""The one door to language models: `LLMClient.complete_json`, a JSON answer for a request.

Every LLM call in agenther goes through `LLMClient.complete_json`. A call's answer is cached on
disk (agenther/llm/cache.py) under the sha256 of everything that determines it (model identity,
messages, sampling parameters, response format), so a rerun makes zero calls.

Around each real call (never around a cache hit), in this order:
- `Budget` (agenther/llm/limits.py): a run-wide cap on tokens and/or USD; once spent reaches it
  no new call starts (`BudgetExhausted`), while answers already in the cache are still served;
- `RateLimiter` (the same module): token buckets for requests and tokens per minute, one per
  provider (model + api_base), shared by every client and thread that talks to it;
- an in-flight semaphore: at most llm.concurrency requests open at once across the run's clients;
- retries on 429/5xx/timeouts with exponential backoff and jitter, honouring Retry-After.

The HTTP call itself is the client's `transport` (agenther/llm/transport.py: `call_litellm`),
in this process by default or in worker processes (agenther/llm/call_pool.py, llm.processes).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import agenther.llm.cache as cache
from agenther import stopping
from agenther.llm.backend import litellm
from agenther.llm.errors import BudgetExhausted, CallFailed, LLMError, LLMUnreachable, PromptTooLong
from agenther.llm.limits import Budget, RateLimiter, estimate_tokens
from agenther.llm.transport import Completion, backoff_delay, call_litellm
from agenther.llm.usage import Usage

log = logging.getLogger("agenther.llm")


@dataclass
class Answer:
    data: dict | None  # parsed JSON object, or None when the answer was not valid JSON
    raw: str
    error: str | None = None  # why `data` is None
    cached: bool = False


@dataclass
class LLMClient:
    model: str  # a litellm model name, e.g. "openai/local" or "gpt-4o-mini"
    api_base: str | None = None
    api_key: str | None = None  # never logged, never part of a cache key
    identity: str | None = None  # what the cache key calls this model (default: model)
    cache_dir: Path | str | None = None  # a folder, or s3://bucket/prefix (agenther/llm/cache.py)
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
        # The server is part of what answers: another api_base serving the same model name is another
        # model. The embedded model's port changes every run; its identity (the model file) names it.
        key = cache.request_key(request if self.identity or not self.api_base else request | {"api_base": self.api_base})
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
                prompt_usd, completion_usd = litellm().cost_per_token(
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

    def _cache_get(self, key: str) -> dict | None:
        return cache.get(self.cache_dir, key)

    def _cache_put(self, key: str, body: dict) -> None:
        cache.put(self.cache_dir, key, body)


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
    if litellm().supports_response_schema(model=model):
        return "json_schema"
    return "json_object"


_UNPRICED: set[str] = set()  # declared models litellm's offline price map has no price for


def _parse(raw: str, cached: bool = False) -> Answer:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Answer(None, raw, f"invalid JSON: {exc.msg} at char {exc.pos}", cached)
    if not isinstance(data, dict):
        return Answer(None, raw, f"expected a JSON object, got {type(data).__name__}", cached)
    return Answer(data, raw, None, cached)
