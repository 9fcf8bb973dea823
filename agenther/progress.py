"""Progress of a long stage: records done of the total, kept so far, LLM calls and their rate, ETA.

On a terminal one line is redrawn every second; elsewhere (a log file, CI, a Prefect worker, whose
prints become log lines) a plain line every 30 s (AGENTHER_PROGRESS_S; 0: only when each stage
ends) and one when such a long stage ends: a stage that ends sooner prints nothing, so logs and
one-line errors stay readable.
Records are counted as they finish (`record_done`, called by the concurrent map the LLM stages use)
or a batch at a time (`advance`), whichever the stage gives.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

_CURRENT: list[Progress] = []  # the stage being shown, if any (one at a time per process)


def record_done() -> None:
    """One record of the current stage finished (thread-safe; nothing when no stage is shown)."""
    if _CURRENT:
        _CURRENT[-1].advance(1, batch=False)


class Progress:
    def __init__(self, stage: str, total: int, calls: Callable[[], int], stream: TextIO | None = None):
        self.stage, self.total, self.calls = stage, total, calls
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 1.0 if self.tty else float(os.environ.get("AGENTHER_PROGRESS_S", 30))
        self._shown = False
        self.done = self.kept = 0
        self._by_record = 0  # records counted one by one in the batch under way
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._last_calls = 0
        self._calls_at_start = self._safe_calls()

    def __enter__(self) -> Progress:
        _CURRENT.append(self)
        threading.Thread(target=self._tick, daemon=True, name=f"agenther-progress-{self.stage}").start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        _CURRENT.remove(self)
        if exc_type is None and (self.tty or self._shown or self.interval <= 0):
            self._show(final=True)

    def advance(self, records: int, kept: int = 0, batch: bool = True) -> None:
        """`records` more done (a whole batch, replacing the ones counted one by one in it, or one)."""
        with self._lock:
            if batch:
                self.done += records - self._by_record
                self._by_record = 0
                self.kept += kept
            else:
                self.done += records
                self._by_record += records

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        calls = self._safe_calls() - self._calls_at_start
        parts = [f"{self.stage}: {self.done}/{self.total} records", f"{self.kept} kept"]
        if calls:
            parts.append(f"{calls} LLM calls ({calls / elapsed:.1f}/s)" if elapsed > 0 else f"{calls} LLM calls")
        if 0 < self.done < self.total:
            parts.append(f"ETA {_clock(elapsed / self.done * (self.total - self.done))}")
        parts.append(f"{_clock(elapsed)} elapsed")
        return ", ".join(parts)

    def _safe_calls(self) -> int:
        # a usage dict that grew while it was read: the last count stands, the next tick reads again
        with contextlib.suppress(RuntimeError):
            self._last_calls = self.calls()
        return self._last_calls

    def _tick(self) -> None:
        if self.interval <= 0:  # AGENTHER_PROGRESS_S=0: a line when each stage ends, none between
            return
        while not self._stop.wait(self.interval):
            self._show()

    def _show(self, final: bool = False) -> None:
        self._shown = True
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
            self.stream.flush()
        else:  # print: a Prefect flow with log_prints turns it into a log line
            print(self.line(), file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
