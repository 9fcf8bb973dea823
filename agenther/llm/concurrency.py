"""`map_concurrent`: the stages' concurrent map over records, in input order, stoppable."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from agenther import progress, stopping

T = TypeVar("T")
R = TypeVar("R")


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int, records: bool = True) -> list[R]:
    """Apply fn to every item with at most `concurrency` in flight; results keep input order.
    `records`: each item done is a record done (the progress line counts it); False where an item
    is one step of a record (a judge's call), which the caller counts itself.

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
            if records:
                progress.record_done()
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
                        if records:
                            progress.record_done()
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

