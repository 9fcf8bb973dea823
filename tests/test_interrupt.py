"""Stopping a run: Ctrl-C (SIGINT) and SIGTERM end `agenther run` mid-relabel within 2 s with
exit code 130 / 143, abandon the calls still open, start no new one, write no half a table, and
keep every answer received in the LLM cache, so the rerun finishes, reconciles and sends no
answered call again. Then the mechanism underneath (agenther/stopping.py), in process: a stopped
client starts no call; a map whose waiting thread is interrupted by any exception (as Prefect's
TerminationSignal interrupts a cancelled flow run) returns at once and starts nothing more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, TAU
from llm_server import FakeLLMServer, Reply, careful_brain
from test_faults import (
    _accounted_once,
    _body_hash,
    _cache_key,
    _call_workers,
    _params,
    _running,
    wait_for_relabel_answers,
)

from agenther import stopping
from agenther.cli import main
from agenther.llm import LLMClient, map_concurrent
from agenther.llm.answers import RelabelAnswer, schema_of

STOP_WITHIN_S = 2.0


@pytest.fixture(autouse=True)
def _fresh_stop_flag():
    stopping.reset()
    yield
    stopping.reset()


def _cached(cache: Path, body: dict, api_base: str) -> bool:
    key = _cache_key(body, api_base)
    return (cache / key[:2] / f"{key}.json").exists()


class HeldBrain:
    """careful_brain answering after `delay_s`. After hold(), an answer not sent yet waits for
    release(): the calls open at that moment stay open (until the test releases them)."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.held = threading.Event()
        self.released = threading.Event()

    def hold(self) -> None:
        self.held.set()

    def release(self) -> None:
        self.delay_s = 0.0
        self.released.set()

    def __call__(self, request: dict) -> Reply | str:
        reply = careful_brain(request)
        time.sleep(self.delay_s)
        if self.held.is_set():
            self.released.wait(60)
        return reply


@pytest.mark.parametrize(("sig", "code", "processes"), [
    # SIGINT to a process started with SIGINT ignored, as a shell starts `agenther run ... &`
    # (how the run that swallowed Ctrl-C was started); calls made from the run's own process.
    (signal.SIGINT, 130, 0),
    # SIGTERM, with the calls made by two worker processes (agenther/llm/call_pool.py).
    (signal.SIGTERM, 143, 2),
], ids=["SIGINT", "SIGTERM-call-workers"])
def test_a_signal_mid_relabel_stops_the_run_and_the_rerun_repeats_no_answered_call(tmp_path, sig, code,
                                                                                     processes):
    brain = HeldBrain(delay_s=1.0)  # 1 s per answer
    out = tmp_path / "out"
    with FakeLLMServer(brain) as server:
        params = _params(tmp_path, server.api_base, max_retries=1, processes=processes)
        args = ["run", "--input", str(TAU), "--out", str(out), "--limit", "16", "--params", params]
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(ROOT))
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sig == signal.SIGINT else None
        try:  # an ignored signal stays ignored across exec: the child starts with SIGINT ignored
            proc = subprocess.Popen([sys.executable, "-m", "agenther.cli", *args], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        try:
            deadline = wait_for_relabel_answers(server, proc, 3, seconds=90)
            brain.hold()  # from now on the calls in flight stay open
            time.sleep(0.1)
            # The run may be between batches (no call open) right now: wait for its next call,
            # which the held brain keeps open.
            while len(server.requests) <= len(server.answered):
                assert time.monotonic() < deadline, "the run made no call after the hold"
                time.sleep(0.05)
            answered = list(server.answered)
            while not all(_cached(tmp_path / "cache", b, server.api_base) for b in answered):  # the client has them
                assert time.monotonic() < deadline, "answers sent to the run never reached its cache"
                time.sleep(0.05)
            sent = len(server.requests)
            open_calls = sent - len(answered)
            workers = _call_workers(proc.pid)
            assert len(workers) == processes

            started = time.monotonic()
            proc.send_signal(sig)
            try:
                exit_code = proc.wait(timeout=10)
            finally:
                took = time.monotonic() - started
                brain.release()  # only now: the run must not have waited for its open calls
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stderr.close()
        assert exit_code == code, err[-2000:]
        assert took < STOP_WITHIN_S, f"{signal.Signals(sig).name}: exited {took:.2f} s after the signal"
        assert open_calls > 0, "no call was open when the signal came: the test proves nothing"
        assert "stopped by" in err and "Traceback" not in err, err[-2000:]
        time.sleep(0.3)
        assert len(server.requests) == sent, "a call started after the signal"
        deadline = time.monotonic() + 10
        while [w for w in workers if _running(w)]:  # the call workers end with the run
            assert time.monotonic() < deadline, "LLM call workers outlived the stopped run"
            time.sleep(0.05)

        # Nothing half-written: the tables so far are whole, relabel/verify wrote nothing, no stamp.
        assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
        for table in ("00_trajectories", "01_classified", "02_extracted"):
            assert pl.read_parquet(out / f"{table}.parquet").height > 0
        for name in ("03_relabeled.parquet", "04_verified.parquet", "summary.json", "stamps/relabel.json"):
            assert not (out / name).exists(), name

        server.requests.clear()
        assert main(args) == 0  # the rerun, as a user would type it again
        rerun = list(server.requests)

    summary = json.loads((out / "summary.json").read_text())
    _accounted_once(out, summary)
    ingest = summary["stages"]["ingest"]
    assert ingest["in"] == ingest["out"] + ingest["quarantined"] == 16
    assert summary["gates"]["passed_judges"] > 0
    resent = {_body_hash(b) for b in rerun} & {_body_hash(b) for b in answered}
    assert not resent, f"{len(resent)} answered call(s) sent again"
    hits = sum(summary["llm"][stage]["cache_hits"] for stage in ("relabel", "verify"))
    assert hits >= len(answered)


# -- the mechanism, in process -------------------------------------------------------------------------
def _client(server: FakeLLMServer, tmp_path: Path) -> LLMClient:
    return LLMClient(model="openai/local", api_base=server.api_base, api_key="x", cache_dir=tmp_path / "cache",
                     max_retries=0)


def _ask(client: LLMClient, text: str) -> dict | None:
    messages = [{"role": "user", "content": f"You write hindsight goals.\nRECORD:\n<<<\n- {text}\n>>>"}]
    return client.complete_json(messages, schema_of(RelabelAnswer), temperature=0.0, stage="relabel").data


def test_once_a_stop_is_requested_no_call_starts(tmp_path, llm_server):
    client = _client(llm_server, tmp_path)
    assert _ask(client, "book flight HAT001") is not None
    stopping.request_stop(signal.SIGTERM)
    with pytest.raises(stopping.Interrupted) as stopped:
        _ask(client, "cancel reservation ABC123")
    assert stopped.value.exit_code == 143
    assert len(llm_server.requests) == 1
    with pytest.raises(stopping.Interrupted):  # nor does a backoff wait go on
        client.sleep(30)
    stopping.reset()
    assert _ask(client, "cancel reservation ABC123") is not None
    assert len(llm_server.requests) == 2


class Cancelled(BaseException):
    """Stands for what a signal handler raises in the main thread (Prefect: TerminationSignal)."""


def test_a_map_whose_waiting_thread_is_interrupted_returns_at_once_and_starts_nothing_more(tmp_path):
    def slow(request: dict) -> Reply:
        return Reply(careful_brain(request), delay_s=0.5)

    def raise_cancelled(signum: int, frame: object) -> None:
        raise Cancelled

    with FakeLLMServer(slow) as server:
        client = _client(server, tmp_path)

        def two_calls(i: int) -> int:  # a record that asks twice, as relabel then a judge do
            _ask(client, f"book flight HAT{i:03d}")
            _ask(client, f"cancel reservation R{i:05d}")
            return i

        previous = signal.signal(signal.SIGUSR1, raise_cancelled)
        timer = threading.Timer(0.25, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
        started = time.monotonic()
        try:
            timer.start()
            with pytest.raises(Cancelled):
                map_concurrent(two_calls, range(8), concurrency=2)
            took = time.monotonic() - started
        finally:
            timer.cancel()
            signal.signal(signal.SIGUSR1, previous)
        assert took < 0.45, f"waited {took:.2f} s: the first answers come at 0.5 s, the map must not wait for them"
        time.sleep(1.5)  # the open calls are answered meanwhile; their records must not ask again
        assert len(server.requests) == 2, [r["messages"][0]["content"][-30:] for r in server.requests]
        assert not stopping.stop_requested()  # only that map was cancelled, not the process's run
        assert map_concurrent(lambda i: i * i, range(5), concurrency=2) == [0, 1, 4, 9, 16]


def test_a_failed_record_stops_the_map_and_its_error_wins_over_the_interruptions(tmp_path, llm_server):
    client = _client(llm_server, tmp_path)

    def record(i: int) -> int:
        if i == 0:
            raise ValueError("record 0 is broken")
        _ask(client, f"book flight HAT{i:03d}")
        return i

    with pytest.raises(ValueError, match="record 0"):
        map_concurrent(record, range(40), concurrency=4)
    # At most the records already taken by the other three workers asked; none started after.
    assert len(llm_server.requests) <= 3
