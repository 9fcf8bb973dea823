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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from agenther import stopping
from agenther.llm.errors import BudgetExhausted
from agenther.params import LLM as LLMParams


class SharedState(Protocol):
    """Where a Budget's or a RateLimiter's counters live and what guards them: `hold()` gives
    the values (a dict) for one read-modify-write, seen by no one else until it ends. The
    arithmetic stays in Budget and RateLimiter; only this part differs between one process
    (ProcessState) and a cluster (tasks/dask.py: a distributed.Lock and Variable)."""

    def hold(self) -> Iterator[dict]: ...


class ProcessState:
    """Counters in this process, guarded by a thread lock."""

    def __init__(self) -> None:
        self._values: dict = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self) -> Iterator[dict]:
        with self._lock:
            yield self._values


class Budget:
    """A run-wide spending cap, shared by every client of the run (thread-safe; with a cluster's
    `state`, by every process of the run).

    `check()` before a call raises BudgetExhausted once spent >= a limit; `charge()` after
    it adds the real usage. Calls already in flight when the cap is reached still finish,
    so spent can exceed a limit by at most (concurrency - 1) calls."""

    def __init__(self, usd: float | None = None, tokens: int | None = None, state: SharedState | None = None):
        self.usd = None if usd is None else float(usd)
        self.tokens = None if tokens is None else int(tokens)
        self._state = state if state is not None else ProcessState()

    def _read(self, name: str) -> float:
        with self._state.hold() as values:
            return values.get(name, 0)

    @property
    def spent_usd(self) -> float:
        return float(self._read("spent_usd"))

    @property
    def spent_tokens(self) -> int:
        return int(self._read("spent_tokens"))

    @property
    def refused(self) -> int:
        """Calls that did not start because the budget was spent."""
        return int(self._read("refused"))

    @classmethod
    def from_params(cls, llm_params: LLMParams) -> Budget:
        return cls(llm_params.budget_usd, llm_params.budget_tokens)

    @property
    def limited(self) -> bool:
        return self.usd is not None or self.tokens is not None

    def exhausted(self) -> bool:
        if not self.limited:
            return False
        with self._state.hold() as values:
            return self._reached(values)

    def _reached(self, values: dict) -> bool:
        return ((self.usd is not None and values.get("spent_usd", 0.0) >= self.usd)
                or (self.tokens is not None and values.get("spent_tokens", 0) >= self.tokens))

    def check(self) -> None:
        if not self.limited:
            return  # nothing to hold: no round trip to a cluster's lock for an unlimited run
        with self._state.hold() as values:
            if self._reached(values):
                values["refused"] = values.get("refused", 0) + 1
                raise BudgetExhausted(
                    f"LLM budget spent: {values.get('spent_tokens', 0)} tokens / ${values.get('spent_usd', 0.0):.6f} "
                    f"(limits: tokens={self.tokens}, usd={self.usd})")

    def charge(self, tokens: int, usd: float) -> None:
        with self._state.hold() as values:
            values["spent_tokens"] = values.get("spent_tokens", 0) + int(tokens)
            values["spent_usd"] = values.get("spent_usd", 0.0) + float(usd)


class RateLimiter:
    """Token buckets for one provider: requests per minute and tokens per minute (None = no limit).

    Both buckets start full and refill continuously. `acquire(tokens)` blocks until one
    request and `tokens` tokens are available, then takes them; `correct(actual - estimate)`
    settles the token bucket once the real usage is known. Thread-safe; with a cluster's
    `state` (and a clock every process shares, time.time), one pair of buckets for every process
    of the run. `clock` and `sleep` are injectable so a test can drive it without waiting."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = stopping.sleep,
                 state: SharedState | None = None):
        self.rpm = float(requests_per_minute) if requests_per_minute else None
        self.tpm = float(tokens_per_minute) if tokens_per_minute else None
        self.clock, self.sleep = clock, sleep
        self._state = state if state is not None else ProcessState()
        self.waited_s = 0.0  # total time callers in this process spent waiting here

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _refill(self, values: dict) -> None:
        """Bring the buckets in `values` up to now (full ones when first seen)."""
        now = self.clock()
        if "last" not in values:
            values.update(requests=self.rpm or 0.0, tokens=self.tpm or 0.0, last=now)
        elapsed = max(0.0, now - values["last"])
        values["last"] = now
        if self.rpm:
            values["requests"] = min(self.rpm, values["requests"] + elapsed * self.rpm / 60.0)
        if self.tpm:
            values["tokens"] = min(self.tpm, values["tokens"] + elapsed * self.tpm / 60.0)

    def acquire(self, tokens: int = 0) -> float:
        """Wait until the call may start; returns the seconds waited."""
        if not self.limited:
            return 0.0
        tokens = min(float(tokens), self.tpm) if self.tpm else 0.0  # one huge call must still pass
        waited = 0.0
        while True:
            with self._state.hold() as values:
                self._refill(values)
                wait = 0.0
                if self.rpm and values["requests"] < 1.0:
                    wait = (1.0 - values["requests"]) * 60.0 / self.rpm
                if self.tpm and values["tokens"] < tokens:
                    wait = max(wait, (tokens - values["tokens"]) * 60.0 / self.tpm)
                if wait <= 1e-9:
                    if self.rpm:
                        values["requests"] -= 1.0
                    if self.tpm:
                        values["tokens"] -= tokens
                    self.waited_s += waited
                    return waited
            self.sleep(wait)
            waited += wait

    def correct(self, delta_tokens: int) -> None:
        """Settle the token bucket: delta = real tokens - the estimate taken by acquire()."""
        if not self.tpm or not delta_tokens:
            return
        with self._state.hold() as values:
            self._refill(values)
            values["tokens"] = min(self.tpm, values["tokens"] - delta_tokens)


def estimate_tokens(messages: list[dict], max_tokens: int) -> int:
    """Before the call: ~4 characters per prompt token plus the whole completion allowance."""
    return sum(len(str(m.get("content", ""))) for m in messages) // 4 + int(max_tokens)
