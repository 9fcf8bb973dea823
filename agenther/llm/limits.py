"""Spending and pace limits around real calls: the run's budget and the per-provider rate limiter.

Both are hand-written on purpose (bench/README.md, "What litellm does, and what stays ours"):
litellm's BudgetManager tracks spend per user in one process (a user_cost.json file, or litellm's
hosted service), while a run's budget must hold across `dvc repro`'s stage processes (agenther/cli.py
carries what earlier stages spent) and leave records `budget_exhausted` for the rerun; litellm's
Router raises RateLimitError when a deployment is over its rpm/tpm instead of waiting for the
bucket to refill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agenther import stopping
from agenther.llm.errors import BudgetExhausted


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
