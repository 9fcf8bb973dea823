"""Stopping a run part-way: Ctrl-C (SIGINT), SIGTERM, or a caller that gives up waiting.

One process-wide flag. `agenther run` / `agenther stage` set it from their signal handlers
(`on_signals`, installed by the CLI only), which also raise `Interrupted` in the main thread, so
whatever it was waiting for is left at once. From then on:
- no new LLM call starts: `LLMClient` calls `check()` right before every request, and its
  backoff and rate-limit waits are `sleep()`, which ends early;
- `map_concurrent` (agenther/llm/concurrency.py) hands out no new record, and does not wait for the calls
  still open: its threads are daemons, abandoned when the process exits;
- what was answered is already in the LLM response cache (each answer is written there as it
  arrives), so a rerun resumes without repeating an answered call;
- stage outputs are never half-written (tables, exports and stamps are renamed into place), and
  a stage that did not run to the end leaves no stamp, so the rerun runs it again.

A thread that was waiting on a `map_concurrent` and leaves it by any other exception (Prefect's
`TerminationSignal` when it cancels a flow run, a KeyboardInterrupt in a notebook) cancels
that map only: its records still in progress stop before their next call (`check()` reads the
map's own flag too), without touching the process-wide flag.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was told to stop (`signum`: the signal, SIGINT for a stop without one).
    A KeyboardInterrupt, so code that cleans up after Ctrl-C does so here too."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


_STOP = threading.Event()
_SIGNUM = [int(signal.SIGINT)]
_LOCAL = threading.local()  # .cancelled: the Event of the map_concurrent this thread works for


def request_stop(signum: int = signal.SIGINT) -> None:
    """Stop the run: no LLM call starts after this, in any thread."""
    _SIGNUM[0] = int(signum)
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def reset() -> None:
    """Clear the flag: a new run in the same process (the CLI calls this before each command)."""
    _STOP.clear()


def _cancelled() -> bool:
    event = getattr(_LOCAL, "cancelled", None)
    return event is not None and event.is_set()


def check() -> None:
    """Raise Interrupted if the run (or the map this thread works for) was told to stop."""
    if _STOP.is_set() or _cancelled():
        raise Interrupted(_SIGNUM[0])


def sleep(seconds: float) -> None:
    """time.sleep that ends early, with Interrupted, once a stop is requested."""
    end = time.monotonic() + max(0.0, seconds)
    while True:
        check()
        left = end - time.monotonic()
        if left <= 0:
            return
        _STOP.wait(min(left, 0.1))  # the map's own flag is polled at this pace


@contextlib.contextmanager
def working_for(cancelled: threading.Event) -> Iterator[None]:
    """In a worker thread of a map: `check()` also honours the map's own `cancelled` flag."""
    _LOCAL.cancelled = cancelled
    try:
        yield
    finally:
        _LOCAL.cancelled = None


def _handler(signum: int, frame: object) -> None:
    if _STOP.is_set():  # a second signal while stopping: no more cleaning up
        sys.stderr.write(f"agenther: {signal.Signals(signum).name} again: exiting now\n")
        os._exit(128 + signum)
    request_stop(signum)
    raise Interrupted(signum)


def _ours_to_take(signum: int) -> bool:
    """Only the default action is replaced: a handler someone installed in this process (an
    orchestrator's) is kept. An inherited 'ignore' counts as default: a shell starts background
    jobs (`agenther run ... &`) with SIGINT ignored, and `kill -INT` must still stop the run."""
    current = signal.getsignal(signum)
    return current in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)


@contextlib.contextmanager
def on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM stop the run (`request_stop` + Interrupted in
    the main thread; a second signal exits at once). The previous handlers are restored after.
    Outside the main thread (where Python cannot install handlers) this only clears the flag."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals if _ours_to_take(s)}
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
