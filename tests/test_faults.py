"""The fault suite: provider faults from the scripted LLM server, a SIGKILL mid-relabel and
a rerun, and malformed inputs, all through `agenther run` (tests/test_pipeline.py covers the
happy path, a 500/429/503 sequence, a refused connection at start and a broken JSONL).

Every wait is bounded: LLM timeouts are 1-20 s, the subprocess is killed in teardown, and
server threads are daemons that die with the test process.
"""

from __future__ import annotations

import hashlib
import itertools
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
from conftest import ROOT, TAU, write_params
from llm_server import (
    FakeLLMServer,
    Reply,
    careful_brain,
    dropped,
    not_json_body,
    prompt_kind,
    truncated,
    user_text,
)

from agenther.cli import main
from agenther.stages.relabel import ruled_and_written


def _params(tmp_path: Path, api_base: str, cache: str = "cache", ingest: dict | None = None, **llm) -> str:
    return str(write_params(tmp_path / f"params-{cache}.yaml", api_base, cache=tmp_path / cache, ingest=ingest or {},
                            llm={"max_retries": 3, "concurrency": 2} | llm))


def _run(tmp_path: Path, server: FakeLLMServer, out: str = "out", limit: int = 8, inp: Path = TAU,
         extra: tuple[str, ...] = (), **llm) -> int:
    return main(["run", "--input", str(inp), "--out", str(tmp_path / out), "--limit", str(limit),
                 "--params", _params(tmp_path, server.api_base, **llm), *extra])


def _summary(tmp_path: Path, out: str = "out") -> dict:
    return json.loads((tmp_path / out / "summary.json").read_text())


def _accounted_once(out: Path, summary: dict) -> None:
    """Every failure is a hindsight sample or a rejection, exactly once."""
    rejected = pl.read_parquet(out / "rejected.parquet")
    sft = ([json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
           if (out / "sft.jsonl").exists() else [])  # a file with no rows is not written
    hindsight = [s["metadata"]["trajectory_id"] for s in sft if s["metadata"]["kind"] == "hindsight"]
    assert rejected["id"].n_unique() == rejected.height, "a record rejected twice"
    assert len(set(hindsight)) == len(hindsight), "a hindsight sample exported twice"
    assert not set(hindsight) & set(rejected["id"].to_list()), "a record both exported and rejected"
    assert summary["stages"]["classify"]["failures"] == len(hindsight) + rejected.height
    assert summary["reconciliation"]["ok"], summary["reconciliation"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    """The run of the first 8 records with careful_brain and no faults: what it accepts, and how many
    of its candidates needed a writer (the others: rules only). The faulty runs are measured by it."""
    tmp_path = tmp_path_factory.mktemp("clean")
    with FakeLLMServer(careful_brain) as server:
        assert _run(tmp_path, server) == 0
        first_asks = [r for r in server.prompts_of("relabel") if "WAS REJECTED" not in user_text(r)]
    relabeled = pl.read_parquet(tmp_path / "out" / "03_relabeled.parquet")
    return {"accepts": _summary(tmp_path)["gates"]["passed_judges"], "written": len(first_asks),
            "written_kept": relabeled.filter(pl.col("relabel_model") != "rules").height}


def _faults_first(faults: list, brain=careful_brain):
    """The first len(faults) requests get the faults, in order; then `brain` answers."""
    it = iter(faults)
    lock = threading.Lock()

    def flaky(request):
        with lock:
            fault = next(it, None)
        return fault() if fault else brain(request)

    return flaky


# -- transient provider faults: retried, the run succeeds --------------------------------------------
BURSTS = {
    "429 burst": [lambda: Reply("slow down", status=429, headers={"Retry-After": "0"})] * 3,
    "5xx": [lambda: Reply("busy", status=500), lambda: Reply("bad gateway", status=502),
            lambda: Reply("unavailable", status=503)],
    "504, truncated body, dropped connection, HTML body": [lambda: Reply("gateway timeout", status=504),
                                                           truncated, dropped, not_json_body],
}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [0, 2])  # calls from this process, or from worker processes
@pytest.mark.parametrize("name", list(BURSTS))
def test_transient_faults_are_retried_and_the_run_succeeds(tmp_path, llm_server, name, processes, clean):
    faults = BURSTS[name]
    # At most max_retries faults in a row can hit one call (concurrency 2 spreads them), so
    # every call succeeds in the end; max_retries 4 covers the four-fault burst.
    llm_server.brain = _faults_first(faults)
    assert _run(tmp_path, llm_server, max_retries=4, processes=processes) == 0
    summary = _summary(tmp_path)
    assert summary["llm"]["total"]["retries"] == len(faults)
    assert summary["llm"]["total"]["failed_calls"] == len(faults)
    assert summary["gates"]["passed_judges"] == clean["accepts"]
    _accounted_once(tmp_path / "out", summary)


def test_a_timeout_is_retried(tmp_path, llm_server):
    """llm.timeout_s 1 and a first answer that takes 3 s: the client gives up, retries, succeeds."""
    llm_server.brain = _faults_first([lambda: Reply(careful_brain_dummy(), delay_s=3)])
    started = time.monotonic()
    assert _run(tmp_path, llm_server, limit=4, timeout_s=1) == 0
    summary = _summary(tmp_path)
    assert summary["llm"]["total"]["retries"] == 1
    _accounted_once(tmp_path / "out", summary)
    assert time.monotonic() - started < 25


def careful_brain_dummy() -> str:
    return "{}"  # never delivered: the client has timed out before the delay ends


@pytest.mark.slow
def test_very_slow_answers_within_the_timeout_go_through(tmp_path, llm_server):
    def slow(request):
        reply = careful_brain(request)
        return Reply(reply, delay_s=0.8) if isinstance(reply, str) else reply

    llm_server.brain = slow
    assert _run(tmp_path, llm_server, limit=4, timeout_s=5) == 0
    summary = _summary(tmp_path)
    assert summary["llm"]["total"]["retries"] == 0
    assert summary["gates"]["passed_judges"] >= 1
    _accounted_once(tmp_path / "out", summary)


# -- answers that are not JSON: retried, then the record is rejected ------------------------------
@pytest.mark.parametrize("garbage", ["Sure! Here is the JSON you asked for:", '{"hindsight_prompt": "Please look',
                                     '["a list", "not an object"]', '{"confidence": 0.9}'])
def test_relabel_answers_that_are_not_valid_json_are_rejected_and_reconciled(tmp_path, llm_server, garbage, clean):
    def brain(request):
        return garbage if prompt_kind(request) == "relabel" else careful_brain(request)

    llm_server.brain = brain
    assert _run(tmp_path, llm_server) == 0
    summary = _summary(tmp_path)
    relabel, written = summary["stages"]["relabel"], clean["written"]
    assert written and relabel["rejected"].get("invalid_llm_answer") == written
    # Each record had max_attempts (3) tries, each a distinct request (temperature, seed).
    assert len(llm_server.prompts_of("relabel")) == 3 * written
    relabeled = pl.read_parquet(tmp_path / "out" / "03_relabeled.parquet")
    assert set(relabeled["relabel_model"]) == {"rules"}  # only rule-written conversations reached the judges
    rejected = pl.read_parquet(tmp_path / "out" / "rejected.parquet")
    invalid = rejected.filter(pl.col("reason") == "invalid_llm_answer")
    assert invalid.height == written and all(d.count("attempt ") == 3 for d in invalid["detail"])
    _accounted_once(tmp_path / "out", summary)


def test_one_invalid_answer_then_a_good_one_is_accepted(tmp_path, llm_server, clean):
    seen: set[str] = set()
    lock = threading.Lock()

    def brain(request):
        if prompt_kind(request) == "relabel":
            key = request["messages"][0]["content"].split("YOUR PREVIOUS ANSWER")[0]  # the record, not the retry note
            with lock:
                first = key not in seen
                seen.add(key)
            if first:
                return "not json"
        return careful_brain(request)

    llm_server.brain = brain
    assert _run(tmp_path, llm_server) == 0
    summary = _summary(tmp_path)
    assert summary["gates"]["passed_judges"] == clean["accepts"]
    relabeled = pl.read_parquet(tmp_path / "out" / "03_relabeled.parquet")
    written = relabeled.filter(pl.col("relabel_model") != "rules")
    assert written.height == clean["written_kept"] and set(written["relabel_attempts"].to_list()) == {2}
    _accounted_once(tmp_path / "out", summary)


def test_judge_answers_that_are_not_json_reject_the_record(tmp_path, llm_server, clean):
    def brain(request):
        return "garbage" if prompt_kind(request) == "judge_evidence" else careful_brain(request)

    llm_server.brain = brain
    assert _run(tmp_path, llm_server) == 0
    summary = _summary(tmp_path)
    assert summary["gates"]["passed_judges"] == 0
    # every record the trajectory judge passed reaches the evidence judge, whose garbage rejects it
    # as an invalid answer (not as the judge's verdict)
    rejected = summary["stages"]["verify"]["rejected"]
    verified = pl.read_parquet(tmp_path / "out" / "04_verified.parquet").to_dicts()
    passed_trajectory = sum(any(j["judge"] == "trajectory" and j["accept"] for j in r["judgements"]) for r in verified)
    assert passed_trajectory >= clean["accepts"]
    assert rejected["invalid_llm_answer"] == passed_trajectory and "rejected_by_evidence" not in rejected
    assert sum(rejected.values()) == summary["stages"]["verify"]["in"]
    _accounted_once(tmp_path / "out", summary)


# -- fatal provider faults: exit 2 with one line ---------------------------------------------------
def _fatal(tmp_path, server, capsys, **llm) -> tuple[int, str]:
    code = _run(tmp_path, server, limit=3, **llm)
    return code, capsys.readouterr().err.strip()


def test_connections_dropped_for_good_are_fatal_in_one_line(tmp_path, llm_server, capsys):
    llm_server.brain = lambda request: dropped()
    code, err = _fatal(tmp_path, llm_server, capsys, max_retries=1)
    assert code == 2 and len(err.splitlines()) == 1 and "unreachable" in err, err


def test_server_gone_mid_run_is_fatal_in_one_line(tmp_path, llm_server, capsys):
    """The endpoint answers two calls, then stops listening (connection refused from then on)."""
    count = itertools.count()

    def brain(request):
        if next(count) == 2:
            def stop():
                llm_server.httpd.shutdown()
                llm_server.httpd.server_close()
            threading.Thread(target=stop, daemon=True).start()
            return dropped()
        return careful_brain(request)

    llm_server.brain = brain
    code, err = _fatal(tmp_path, llm_server, capsys, max_retries=1)
    assert code == 2 and len(err.splitlines()) == 1 and "unreachable" in err, err


PERSISTENT = {
    "timeout": (lambda request: Reply("{}", delay_s=3), {"timeout_s": 1, "max_retries": 1}),
    "500": (lambda request: Reply("internal error", status=500), {"max_retries": 1}),
    "HTML body": (lambda request: not_json_body(), {"max_retries": 1}),
    "401": (lambda request: Reply("invalid api key", status=401), {}),
    "400": (lambda request: Reply("model not loaded", status=400), {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [0, 2])
@pytest.mark.parametrize("name", list(PERSISTENT))
def test_persistent_provider_errors_are_fatal_in_one_line(tmp_path, llm_server, capsys, name, processes):
    brain, llm = PERSISTENT[name]
    llm_server.brain = brain
    started = time.monotonic()
    try:
        code, err = _fatal(tmp_path, llm_server, capsys, processes=processes, **llm)
    finally:
        assert time.monotonic() - started < 25  # never hangs, whatever the outcome
    assert code == 2 and len(err.splitlines()) == 1, err


# -- SIGKILL mid-relabel, then a rerun ----------------------------------------------------------------
def _cache_key(body: dict, api_base: str) -> str:
    # The client's cache key (agenther/llm/client.py complete_json) from the body the server received
    # and the server it was sent to (a server named by its model name: its api_base is in the key).
    request = {"model": "openai/local", "messages": body["messages"], "temperature": body["temperature"],
               "max_tokens": body["max_tokens"], "seed": body["seed"], "response_format": body["response_format"],
               "api_base": api_base}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def wait_for_relabel_answers(server: FakeLLMServer, proc: subprocess.Popen, n: int, seconds: float) -> float:
    """Wait until the run `proc` has been sent `n` relabel answers; the deadline it was given."""
    deadline = time.monotonic() + seconds
    while sum(prompt_kind(r) == "relabel" for r in server.answered) < n:
        assert proc.poll() is None, f"run ended too early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached relabel"
        time.sleep(0.02)
    return deadline


def _body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [0, 2])  # with workers, they die with the killed run
def test_sigkill_mid_relabel_then_rerun_reconciles_and_repeats_no_answered_call(tmp_path, processes):
    def slow_relabel(request):
        reply = careful_brain(request)
        return Reply(reply, delay_s=0.3) if prompt_kind(request) == "relabel" else reply

    out, cache = tmp_path / "out", tmp_path / "cache"
    with FakeLLMServer(slow_relabel) as server:
        params = _params(tmp_path, server.api_base, max_retries=1, processes=processes)
        cmd = [sys.executable, "-m", "agenther.cli", "run", "--input", str(TAU), "--out", str(out),
               "--limit", "32", "--params", params]
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = wait_for_relabel_answers(server, proc, 4, seconds=60)
            # let the client write the cache entries of the answers it has (the first answer also
            # imports litellm in the run's process to price it, which can take seconds)
            while sum(1 for _ in cache.rglob("*.json")) < 3:
                assert proc.poll() is None and time.monotonic() < deadline, "answers never reached the cache"
                time.sleep(0.05)
            workers = _call_workers(proc.pid)
            assert len(workers) == processes
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            deadline = time.monotonic() + 10
            while [w for w in workers if _running(w)]:  # the workers die with the run
                assert time.monotonic() < deadline, "call workers outlived the killed run"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stderr.close()
        first = list(server.requests)
        first_relabel = [b for b in first if prompt_kind(b) == "relabel"]
        assert not (out / "summary.json").exists() and not (out / "04_verified.parquet").exists()
        cached = {b["messages"][0]["content"][-80:]: b for b in first_relabel
                  if (cache / (key := _cache_key(b, server.api_base))[:2] / f"{key}.json").exists()}
        assert len(cached) >= 3, "the killed run should have cached some relabel answers"

        server.requests.clear()
        assert main(["run", "--input", str(TAU), "--out", str(out), "--limit", "32", "--params", params]) == 0
        second = list(server.requests)

    summary = _summary(tmp_path)
    _accounted_once(out, summary)
    assert summary["gates"]["passed_judges"] > 0
    # No relabel call answered and cached by the killed run was sent again.
    resent = {_body_hash(b) for b in second} & {_body_hash(b) for b in cached.values()}
    assert not resent, f"{len(resent)} answered relabel call(s) sent again"
    assert summary["llm"]["relabel"]["cache_hits"] >= len(cached)
    # Everything the first run had not finished was asked now, so the union covers every record whose
    # conversation needed a writer (the others make no relabel call).
    extracted = pl.read_parquet(out / "02_extracted.parquet").to_dicts()
    written = sum(bool(ruled_and_written(r)[1]) for r in extracted)
    assert written and len([b for b in second if prompt_kind(b) == "relabel"]) + len(cached) >= written


def _call_workers(parent: int) -> list[int]:
    """The pids of `parent`'s LLM call worker processes (agenther/llm/call_pool.py)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"agenther.llm.call_pool" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- malformed inputs through the CLI ---------------------------------------------------------------
def _tau_records(n: int = 6) -> list[dict]:
    return json.loads(TAU.read_text())[:n]


def test_empty_input_file(tmp_path, llm_server, capsys):
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    code = main(["run", "--input", str(path), "--out", str(tmp_path / "out"),
                 "--params", _params(tmp_path, llm_server.api_base)])
    err = capsys.readouterr().err.strip()
    # Either a clear one-line refusal or an empty, reconciled run; never a traceback.
    if code == 2:
        assert len(err.splitlines()) == 1, err
    else:
        assert code == 0, err
        summary = _summary(tmp_path)
        assert summary["stages"]["ingest"]["in"] == 0 and summary["reconciliation"]["ok"]
    assert not llm_server.requests


@pytest.mark.parametrize("content,message", [
    (lambda raw: raw[: len(raw) // 2], "invalid JSON"),
    (lambda raw: b"\xff\xfe" + raw, "not UTF-8"),
])
def test_unreadable_single_file_is_a_one_line_error(tmp_path, llm_server, capsys, content, message):
    path = tmp_path / "tau.json"
    path.write_bytes(content(json.dumps(_tau_records()).encode()))
    code = main(["run", "--input", str(path), "--out", str(tmp_path / "out"),
                 "--params", _params(tmp_path, llm_server.api_base)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and str(path) in err, err


def test_wrong_types_and_an_unreadable_file_in_a_folder_are_quarantined(tmp_path, llm_server):
    records = _tau_records(6)
    bad = [dict(records[0], task_id=None), dict(records[1], reward="1.0"), dict(records[2], traj={"a": 1}),
           dict(records[3], traj=[{"role": "user", "content": 42}]), "not an object", dict(records[4], info=[1])]
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a-airline.json").write_text(json.dumps(records[:6] + bad))
    (folder / "b-broken.json").write_bytes(b'[{"task_id": 1, "traj": [')
    code = main(["run", "--input", str(folder), "--format", "tau-bench", "--out", str(tmp_path / "out"),
                 "--params", _params(tmp_path, llm_server.api_base)])
    assert code == 0
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert quarantine.height == len(bad) + 1
    reasons = quarantine["reason"].to_list()
    for needle in ("task_id", "reward", "traj", "not an object", "info", "invalid JSON"):
        assert any(needle in r for r in reasons), (needle, reasons)
    summary = _summary(tmp_path)
    assert summary["stages"]["ingest"] == {"in": 6 + len(bad) + 1, "out": 6, "quarantined": len(bad) + 1}
    _accounted_once(tmp_path / "out", summary)


@pytest.mark.slow
@pytest.mark.parametrize("cap_mb", [None, 100])
def test_a_50mb_tool_result_is_quarantined_or_compacted(tmp_path, llm_server, cap_mb):
    """One tau-bench record whose first tool result is 50 MB of text, among ordinary records.
    Default cap (ingest.max_trajectory_mb = 8): quarantined, named, the others go through.
    Cap raised to 100: it goes through, memory stays bounded and no prompt carries the 50 MB."""
    records = _tau_records(4)
    big = json.loads(json.dumps(records[2]))  # a failure with 7 tool results
    tool = next(m for m in big["traj"] if m["role"] == "tool")
    tool["content"] = tool["content"] + " " + "x" * (50 * 1024 * 1024)
    path = tmp_path / "big-airline.json"
    path.write_text(json.dumps([records[0], records[1], big, records[3]]))
    del big, tool
    params = _params(tmp_path, llm_server.api_base, ingest={} if cap_mb is None else {"max_trajectory_mb": cap_mb})
    script = f"""
import resource, sys, json
from agenther.cli import main
code = main(["run", "--input", {str(path)!r}, "--out", {str(tmp_path / 'out')!r}, "--params", {params!r}])
print(json.dumps({{"code": code, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}),
      file=sys.stderr)
"""
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=180)
    result = json.loads(done.stderr.decode().strip().splitlines()[-1])
    print("50 MB record:", result)
    assert result["code"] == 0, done.stderr.decode()[-3000:]
    # Bounded memory: a few copies of the record at most, not one per prompt or judge.
    assert result["maxrss_mb"] < 1500, result
    summary = _summary(tmp_path)
    _accounted_once(tmp_path / "out", summary)
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet").to_dicts()
    if cap_mb is None:
        assert summary["stages"]["ingest"] == {"in": 4, "out": 3, "quarantined": 1}
        (q,) = quarantine
        assert q["record_pointer"] == "[2]" and "52.5 MB" in q["reason"] and "max_trajectory_mb = 8" in q["reason"]
    else:
        assert summary["stages"]["ingest"] == {"in": 4, "out": 4, "quarantined": 0} and not quarantine
        # No prompt carried the 50 MB: transcripts are compacted.
        assert llm_server.requests and max(len(json.dumps(r)) for r in llm_server.requests) < 100_000
