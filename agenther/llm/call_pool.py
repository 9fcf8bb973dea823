"""Worker processes that make the LLM calls, for runs that one process's CPU cannot keep up with.

litellm spends a few milliseconds of CPU on every call (building the request, parsing the
answer, pricing and logging it) while holding the GIL, so one process tops out at a few
hundred calls a second however many requests are open: against a 200 ms endpoint that caps
concurrency 64 near 30x the serial rate (bench/README.md). With llm.processes = N the calls
run in N worker processes instead, each with a thread pool, and their CPU spreads over the cores.

Only the call moves (`agenther.llm.transport.call_litellm`, the client's transport): the cache, the budget,
the rate limiters, the in-flight limit and the retries stay in the calling process, so they hold
for the whole run exactly as without workers. Requests and answers cross one pipe per worker as
plain values; the caller's thread blocks on a Future until its answer comes back.

Pools are started on first use and kept for the life of the process. A worker is a fresh
`python -m agenther.llm.call_pool` (not multiprocessing's spawn, which would run the caller's main
script again in it) that imports litellm once, a few seconds. It reads end of file on its socket
when its parent is gone, however it died, and exits; a worker that dies fails the calls it had
with LLMError instead of leaving their callers waiting.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

from agenther import stopping
from agenther.llm.errors import CallFailed, LLMError
from agenther.llm.transport import Completion, call_litellm

THREADS_PER_WORKER = 256  # an upper bound only: the caller's in-flight limit decides how many are open


class CallPool:
    """`processes` workers; `completion(kwargs)` is a drop-in transport for LLMClient.
    A worker that dies fails its open calls as transient (the client retries them with backoff,
    like a dropped connection) and is replaced by a new one on the next call."""

    def __init__(self, processes: int, threads: int = THREADS_PER_WORKER):
        if processes < 1:
            raise ValueError(f"a call pool needs at least one process, not {processes}")
        self.threads = threads
        self.workers = [_Worker(threads) for _ in range(processes)]
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    def completion(self, kwargs: dict) -> Completion:
        with self._lock:
            if self._closed:
                raise LLMError("the LLM call pool is closed")
            self.workers = [_Worker(self.threads) if w.gone else w for w in self.workers]
            worker = min(self.workers, key=lambda w: len(w.pending))  # the least busy
        return worker.call(next(self._ids), kwargs)

    def close(self, abandon: bool = False) -> None:
        """Stop the workers once their open calls are answered, or at once with `abandon`
        (the run was told to stop: agenther.stopping)."""
        with self._lock:
            self._closed = True
        for worker in self.workers:
            worker.close(abandon)


class _Worker:
    def __init__(self, threads: int):
        ours, theirs = socket.socketpair()
        # The worker must import this agenther, wherever the caller found it.
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agenther.llm.call_pool", str(theirs.fileno()), str(threads)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=path))
        theirs.close()  # the worker's end lives in the worker only: its death is our end of file
        self.conn = Connection(ours.detach())
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()  # one writer on the socket at a time; guards pending and gone
        self.gone: str | None = None  # why this worker cannot take calls any more
        self.answered = 0  # calls this worker has answered (with a completion or a failure)
        threading.Thread(target=self._read_answers, daemon=True, name=f"llm-calls-{self.process.pid}").start()

    def call(self, call_id: int, kwargs: dict) -> Completion:
        future: Future = Future()
        with self.lock:
            if self.gone:
                raise self.failure()
            self.pending[call_id] = future
            try:
                self.conn.send((call_id, kwargs))
            except OSError:  # died since it was chosen: the reader thread is failing its calls
                self.pending.pop(call_id, None)
                raise self.failure() from None
        return future.result()  # raises the CallFailed the call ended with

    def failure(self) -> CallFailed:
        return CallFailed("transient", "LLMWorkerExited", detail=self.gone or "")

    def _read_answers(self) -> None:
        while True:
            try:
                call_id, outcome = self.conn.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                future = self.pending.pop(call_id)
                self.answered += 1
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        with self.lock:
            if self.gone is None:
                self.gone = f"the LLM call worker process {self.process.pid} exited (code {code})"
            pending, self.pending = self.pending, {}
        for future in pending.values():
            future.set_exception(self.failure())

    def close(self, abandon: bool = False) -> None:
        with self.lock:
            if self.gone:
                return
            self.gone = "the LLM call pool is closed"
            if abandon:  # its open calls have no one left to answer to
                self.process.kill()
            with contextlib.suppress(OSError):  # already gone
                self.conn.send(None)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve(conn: Connection, threads: int) -> None:
    """A worker's loop: take (call_id, kwargs) from the socket, answer each from a pool thread."""
    send_lock = threading.Lock()

    def answer(call_id: int, kwargs: dict) -> None:
        try:
            outcome: Completion | CallFailed = call_litellm(kwargs)
        except CallFailed as failed:
            outcome = failed
        except Exception as exc:  # anything else must still reach the caller, without the key
            detail = str(exc)[:300]
            if kwargs.get("api_key"):
                detail = detail.replace(str(kwargs["api_key"]), "***")
            outcome = CallFailed("unexpected", type(exc).__name__, detail=detail)
        with send_lock:
            try:
                conn.send((call_id, outcome))
            except OSError:
                os._exit(0)  # the parent is gone

    with ThreadPoolExecutor(threads, thread_name_prefix="llm-call") as pool:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone: its open calls have no one to answer to
            if message is None:
                break
            pool.submit(answer, *message)


_POOLS: dict[int, CallPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(processes: int) -> CallPool:
    """The process's pool of `processes` workers, started on first use and closed at exit."""
    with _POOLS_LOCK:
        if processes not in _POOLS:
            if not _POOLS:
                atexit.register(_close_all)
            _POOLS[processes] = CallPool(processes)
        return _POOLS[processes]


def pooled_transport(processes: int):
    """An LLMClient transport that sends every call to the shared pool of `processes` workers
    (started by the first call, so a run served from the cache starts none)."""

    def transport(kwargs: dict) -> Completion:
        return shared_pool(processes).completion(kwargs)

    return transport


def _close_all() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close(abandon=stopping.stop_requested())


if __name__ == "__main__":  # a worker: python -m agenther.llm.call_pool FD THREADS
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
