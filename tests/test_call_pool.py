"""llm.processes: the LLM calls made by worker processes (agenther/llm/call_pool.py).

A run through the workers gives the outputs of a run that calls from its own process; a worker
that dies mid-call is replaced and the call retried; workers die with their parent, even on
SIGKILL; a failure no retry can fix comes back named, without the key. (The fault suite in
test_faults.py runs its provider faults and its SIGKILL-and-resume test through the workers too.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, TAU
from llm_server import Reply, careful_brain, prompt_kind
from test_faults import _params, _running

from agenther.cli import main
from agenther.llm import CallFailed, LLMClient
from agenther.llm.answers import RelabelAnswer, schema_of
from agenther.llm.call_pool import CallPool, shared_pool
from agenther.params import ParamsError, load_params


def _run(tmp_path: Path, api_base: str, out: str, processes: int) -> dict:
    params = _params(tmp_path, api_base, cache=f"cache-{out}", concurrency=8, processes=processes)
    assert main(["run", "--input", str(TAU), "--out", str(tmp_path / out), "--limit", "12", "--params", params]) == 0
    return json.loads((tmp_path / out / "summary.json").read_text())


@pytest.mark.slow
def test_a_run_through_worker_processes_gives_the_outputs_of_an_in_process_run(tmp_path, llm_server):
    pool = shared_pool(2)  # the pool the run below uses (one per process and size)
    answered = sum(w.answered for w in pool.workers)
    in_process = _run(tmp_path, llm_server.api_base, "in-process", 0)
    assert sum(w.answered for w in pool.workers) == answered  # processes 0: no call went to the pool
    pooled = _run(tmp_path, llm_server.api_base, "pooled", 2)

    calls = pooled["llm"]["total"]["calls"]
    assert calls == in_process["llm"]["total"]["calls"] > 10
    assert sum(w.answered for w in pool.workers) - answered == calls  # every call went through a worker
    assert all(w.process.poll() is None for w in pool.workers)
    for name in pooled["exports"]["files"]:  # 12 records: no pairs, so no dpo.jsonl
        assert (tmp_path / "pooled" / name).read_bytes() == (tmp_path / "in-process" / name).read_bytes(), name
    rejected = [pl.read_parquet(tmp_path / out / "rejected.parquet").sort("id") for out in ("in-process", "pooled")]
    assert rejected[0].equals(rejected[1])
    assert pooled["gates"]["passed_judges"] == in_process["gates"]["passed_judges"] > 0
    assert pooled["reconciliation"]["ok"]


@pytest.mark.slow
def test_a_worker_killed_mid_call_is_replaced_and_the_call_retried(tmp_path, llm_server):
    first = threading.Event()

    def brain(request):
        if not first.is_set():
            first.set()
            return Reply(careful_brain(request), delay_s=5)  # the worker is killed while this waits
        return careful_brain(request)

    llm_server.brain = brain
    pool = CallPool(1)
    try:
        victim = pool.workers[0].process
        client = LLMClient(model="openai/local", api_base=llm_server.api_base, api_key="none",
                           transport=pool.completion, backoff_s=0.01, timeout_s=20)
        result = {}
        caller = threading.Thread(target=lambda: result.update(answer=client.complete_json(
            [{"role": "user", "content": "You write hindsight goals. Trajectory: ..."}],
            schema_of(RelabelAnswer), temperature=0.0, stage="relabel")))
        started = time.monotonic()
        caller.start()
        assert first.wait(30), "the call never reached the server"
        victim.kill()
        caller.join(60)
        assert not caller.is_alive(), "the call hung on a dead worker"
        assert time.monotonic() - started < 30  # well before the slow answer would have come back
        assert result["answer"].data is not None
        usage = client.usage["relabel"]
        assert (usage.calls, usage.failed_calls, usage.retries) == (1, 1, 1)
        assert pool.workers[0].process.pid != victim.pid and pool.workers[0].process.poll() is None
        assert len(llm_server.requests) == 2 and prompt_kind(llm_server.requests[1]) == "relabel"
    finally:
        pool.close()


@pytest.mark.slow
def test_workers_exit_when_their_parent_is_killed(tmp_path):
    script = ("import sys, time; from agenther.llm.call_pool import CallPool; pool = CallPool(2); "
              "print(' '.join(str(w.process.pid) for w in pool.workers), flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30  # a worker still importing litellm notices when it first reads
        while any(_running(pid) for pid in pids):
            assert time.monotonic() < deadline, f"workers {[p for p in pids if _running(p)]} outlived their parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_an_unexpected_failure_in_a_worker_comes_back_named_without_the_key():
    pool = CallPool(1)
    try:
        with pytest.raises(CallFailed) as failed:
            # No model: litellm itself refuses the arguments, a failure no retry can fix.
            pool.completion({"messages": [{"role": "user", "content": "hi"}], "api_key": "sk-secret-123"})
        assert failed.value.kind == "unexpected" and failed.value.name
        assert "sk-secret-123" not in str(failed.value.args)
    finally:
        pool.close()


@pytest.mark.parametrize("value", [-1, 1.5, "two", True])
def test_processes_must_be_a_whole_number(value):
    with pytest.raises(ParamsError, match="llm.processes"):
        load_params(None, {"llm": {"processes": value}})
