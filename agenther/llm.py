"""The one door to language models: litellm, a content-addressed cache, retries, accounting.

Every LLM call in agenther goes through `LLMClient.complete_json`. A call's answer is
cached on disk under the sha256 of everything that determines it (model identity,
messages, sampling parameters, response format), so a rerun makes zero calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import litellm  # agenther/__init__.py has set LITELLM_LOCAL_MODEL_COST_MAP by now: no network at import

litellm.suppress_debug_info = True
litellm.telemetry = False
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
    # Their INFO lines echo every request; ours say what matters, and never carry keys.
    logging.getLogger(_name).setLevel(logging.WARNING)
log = logging.getLogger("agenther.llm")

TRANSIENT = (
    litellm.exceptions.RateLimitError,
    litellm.exceptions.InternalServerError,
    litellm.exceptions.ServiceUnavailableError,
    litellm.exceptions.BadGatewayError,
    litellm.exceptions.Timeout,
    litellm.exceptions.APIConnectionError,
)


class LLMUnreachable(RuntimeError):
    """The endpoint refused connections after every retry: the run cannot go on."""


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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Usage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
    response_format: str = "auto"  # auto | json_object_schema | json_schema | json_object
    usage: dict[str, Usage] = field(default_factory=dict)  # per stage
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

        response = self._call_with_retries(request, usage)
        raw = response.choices[0].message.content or ""
        tokens = getattr(response, "usage", None)
        prompt_tokens = int(getattr(tokens, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(tokens, "completion_tokens", 0) or 0)
        with self._lock:
            usage.calls += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.cost_usd += _cost(response)
        self._cache_put(key, {"raw": raw, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
        return _parse(raw)

    def total_usage(self) -> Usage:
        total = Usage()
        for u in self.usage.values():
            total.add(u)
        return total

    # -- internals --------------------------------------------------------------------------
    def _usage(self, stage: str) -> Usage:
        with self._lock:
            return self.usage.setdefault(stage, Usage())

    def _response_format(self, schema: dict) -> dict:
        kind = self.response_format
        if kind == "auto":
            # llama.cpp servers take a schema inside json_object (grammar-constrained) and
            # reject json_schema; hosted providers that support json_schema get it.
            if self.api_base and self.model.startswith("openai/"):
                kind = "json_object_schema"
            elif litellm.supports_response_schema(model=self.model):
                kind = "json_schema"
            else:
                kind = "json_object"
        if kind == "json_object_schema":
            return {"type": "json_object", "schema": schema}
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        return {"type": "json_object"}

    def _call_with_retries(self, request: dict, usage: Usage) -> Any:
        kwargs = dict(request, model=self.model, timeout=self.timeout_s, num_retries=0, max_retries=0)
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key:
            kwargs["api_key"] = self.api_key
        for attempt in range(self.max_retries + 1):
            try:
                return litellm.completion(**kwargs)
            except TRANSIENT as exc:
                last = attempt == self.max_retries
                with self._lock:
                    usage.failed_calls += 1
                    usage.retries += 0 if last else 1
                if last:
                    if _is_connection_error(exc):
                        raise LLMUnreachable(f"LLM endpoint {self.api_base or self.model} unreachable "
                                             f"after {self.max_retries + 1} attempts") from None
                    raise
                delay = _retry_after(exc) or self.backoff_s * (2**attempt) * (1 + random.random())
                log.warning("LLM call failed (%s), retry %d in %.1fs", type(exc).__name__, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            body = entry["body"]
            if entry["key"] != key or entry["sha256"] != _digest(body):
                raise ValueError("checksum mismatch")
            return body
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("corrupt LLM cache entry %s (%s): treated as a miss", path.name, exc)
            return None

    def _cache_put(self, key: str, body: dict) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": _digest(body), "body": body}, sort_keys=True))
        tmp.replace(path)  # atomic: a killed run never leaves half an entry


def _is_connection_error(exc: Exception) -> bool:
    # litellm reports a refused connection to an OpenAI-compatible server as an
    # InternalServerError whose message says "Connection error".
    if isinstance(exc, litellm.exceptions.Timeout):
        return False
    return isinstance(exc, litellm.exceptions.APIConnectionError) or "Connection error" in str(exc)


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


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(exc, "litellm_response_headers", None) or getattr(
        getattr(exc, "response", None), "headers", None
    )
    try:
        value = headers.get("retry-after") if headers is not None else None
        return min(float(value), 60.0) if value is not None else None
    except (TypeError, ValueError):
        return None


def _cost(response: Any) -> float:
    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:  # local and unknown models have no price: they cost nothing here
        return 0.0


T = TypeVar("T")
R = TypeVar("R")


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> list[R]:
    """Apply fn to every item with at most `concurrency` in flight; results keep input order."""
    items = list(items)
    if concurrency <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(fn, items))


def check_schema(data: dict, schema: dict) -> str | None:
    """A small validator for the flat schemas our prompts ask for: required keys and types."""
    types = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "array": list, "object": dict}
    for key in schema.get("required", []):
        if key not in data:
            return f"missing key {key!r}"
    for key, spec in schema.get("properties", {}).items():
        if key in data and "type" in spec:
            expected = types[spec["type"]]
            value = data[key]
            if isinstance(value, bool) and spec["type"] in ("number", "integer"):
                return f"key {key!r} must be a {spec['type']}, got a boolean"
            if not isinstance(value, expected):
                return f"key {key!r} must be a {spec['type']}, got {type(value).__name__}"
    return None
