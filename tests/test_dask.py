"""The hindsight flow on a Dask cluster: a real distributed.LocalCluster with worker processes,
Prefect's real (temporary, isolated) API, the scripted LLM server.

Isolation as in tests/test_prefect.py: PREFECT_HOME, the database and the result storage point
at a temporary folder before prefect is imported. The batch cache (Prefect's persisted results)
would make a second run of the same records all cache hits, so each run here refreshes it
(PREFECT_TASKS_REFRESH_CACHE) and has an LLM response cache of its own: every run really computes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TAU, list_keys, write_params
from llm_server import FakeLLMServer, picky_brain, slow
from prefect_isolation import isolate

# A killed worker's in-flight slots come back after the lease timeout (30 s by default): the kill test waits less
_HOME, _ENV = isolate("agenther-dask-test-", DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT="6s")

import distributed  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    PREFECT_TASKS_REFRESH_CACHE,
    temporary_settings,
)
from prefect.states import State  # noqa: E402

from agenther.devtools.seaweedfs import SeaweedFS  # noqa: E402
from agenther.llm.providers import Endpoint  # noqa: E402
from agenther.s3 import s3_client  # noqa: E402
from flows.hindsight import hindsight  # noqa: E402
from tasks.dask import WorkerLLMs, check_reachable  # noqa: E402

pytestmark = pytest.mark.slow  # a Dask cluster, Prefect's API and an LLM server per test

RECORDS = 30
BATCH_RUN = re.compile(r"\w+\[\d+:\d+\]")  # a stage's batch task run, e.g. classify[0:5] (a shard's: package[rows 3])
BATCH = 5  # several batches per stage, so several are in flight at once
# The first RECORDS tau-bench runs as JSONL: a log ingest can cut in parts (io.part_mb) for the workers
LOG = _HOME / "tau-30.jsonl"
LOG.write_text("".join(json.dumps(r) + "\n" for r in json.loads(TAU.read_text())[:RECORDS]))
EXPORTS = ("sft.jsonl", "sharegpt.jsonl", "trl/sft.jsonl", "llamafactory/dataset_info.json", "rejected.parquet",
           "01_classified.parquet", "02_extracted.parquet", "03_relabeled.parquet", "04_verified.parquet")


@pytest.fixture(scope="module", autouse=True)
def isolated_prefect() -> Iterator[None]:
    with temporary_settings(updates={PREFECT_HOME: _HOME, PREFECT_API_URL: None,
                                     PREFECT_API_DATABASE_CONNECTION_URL: _ENV["PREFECT_API_DATABASE_CONNECTION_URL"],
                                     PREFECT_RESULTS_LOCAL_STORAGE_PATH: _HOME / "storage",
                                     PREFECT_TASKS_REFRESH_CACHE: True}):
        yield
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.Client]:
    """Two worker processes, one thread each (the flow's task runs tell them the Prefect API)."""
    with (distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local,
          # not the process's default client: prefect-dask would run a flow's own LocalCluster's tasks on it
          distributed.Client(local, set_as_default=False) as client):
        yield client


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    """One scripted server for the module: its address is in the params, so in every sample's
    lineage (params hash), which must be the same for the runs compared here."""
    with FakeLLMServer(picky_brain) as llm:
        yield llm


@pytest.fixture
def fresh(server: FakeLLMServer) -> FakeLLMServer:
    """The module's server, its brain and its counts as new."""
    server.brain, server.requests, server.max_open = picky_brain, [], 0
    return server


def run_flow_state(tmp_path: Path, name: str, server: FakeLLMServer, prefect: dict | None = None,
                   io: dict | None = None, **knobs: object) -> tuple[State, dict]:
    """The flow on RECORDS tau-bench records in batches of BATCH, with an LLM cache of its own:
    (its final state, its summary)."""
    params = write_params(tmp_path / f"{name}.yaml", server, cache=tmp_path / f"{name}-cache",
                          ingest={"input": str(LOG)},
                          llm={"max_retries": 1, "concurrency": 2}, io=io or {},
                          prefect={"batch_size": BATCH, "retries": 2, "retry_backoff_s": 0.1} | (prefect or {}))
    state = hindsight(params_file=str(params), out_dir=str(tmp_path / name), return_state=True, **knobs)
    assert state.is_completed(), state
    return state, state.result()


def run_flow(tmp_path: Path, name: str, server: FakeLLMServer, prefect: dict | None = None, io: dict | None = None,
             **knobs: object) -> dict:
    return run_flow_state(tmp_path, name, server, prefect, io, **knobs)[1]


def task_runs_of(flow_run_id: object) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server) -> tuple[Path, dict, int]:
    """The local runner's run: (its output folder, its summary, its LLM calls)."""
    tmp = tmp_path_factory.mktemp("local")
    server.brain, server.requests = picky_brain, []
    summary = run_flow(tmp, "local", server)
    return tmp / "local", summary, len(server.requests)


def cache_keys(cache: Path) -> list[str]:
    return sorted(entry.name for entry in cache.rglob("*.json"))


def executed_per_worker(client: distributed.Client) -> dict[str, int]:
    return client.run(lambda dask_worker: dask_worker.state.executed_count)


def assert_same_outputs(out: Path, summary: dict, reference: tuple[Path, dict, int]) -> None:
    ref_out, ref_summary, _ = reference
    for name in EXPORTS:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    for stage in ("ingest", "classify", "extract", "relabel", "verify"):
        ours = {k: v for k, v in summary["stages"][stage].items() if k not in ("seconds", "usage")}
        theirs = {k: v for k, v in ref_summary["stages"][stage].items() if k not in ("seconds", "usage")}
        assert ours == theirs, stage


def test_the_flow_on_two_dask_workers_writes_what_the_local_runner_writes(tmp_path, cluster, reference, fresh):
    """Every batch and every shard on the workers (ingest read in parts of ~100 KB and package split in
    shards of 4 rows, where the reference reads and packages in one shard each in the flow's process):
    the same files, byte for byte."""
    before = executed_per_worker(cluster)
    with distributed.get_task_stream(cluster) as stream:  # what the workers ran, as the scheduler saw it
        state, summary = run_flow_state(tmp_path, "dask", fresh, io={"batch_rows": 4, "part_mb": 0.1},
                                        task_runner="dask", dask_address=cluster.scheduler.address)
    ingest_parts = [t for t in stream.data if str(t["key"]).startswith("part_shard")]
    assert len(ingest_parts) >= 5  # ~600 KB of logs in parts of ~100 KB, read on the workers
    calls = len(fresh.requests)
    assert_same_outputs(tmp_path / "dask", summary, reference)
    out, ref_out = tmp_path / "dask", reference[0]
    for folder in ("openai", "trl", "llamafactory", "hf", "tasks"):  # every consumer's file too
        files = sorted(p.relative_to(ref_out) for p in (ref_out / folder).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(out) for p in (out / folder).rglob("*") if p.is_file()), folder
        assert all((out / f).read_bytes() == (ref_out / f).read_bytes() for f in files), folder
    shards = [r.name for r in task_runs_of(state.state_details.flow_run_id) if not BATCH_RUN.fullmatch(r.name)]
    assert sum(n.startswith("package[rows ") for n in shards) == 8  # 30 rows in shards of 4
    # each export file merged from its runs, each exporter's finish, as task runs on the workers
    assert sum(n.startswith("package[merge_runs ") for n in shards) >= 5
    assert any(n.startswith("package[finish_exporter ") for n in shards)

    # a preference pair comes from a bucket's shard (the 30 records here may hold no task that pairs)
    assert any(n.startswith("package[bucket ") for n in shards) or not summary["exports"]["dpo"]
    assert calls == reference[2] and summary["llm"]["total"]["calls"] == calls  # each call once, none lost
    # the workers' clients ask under the flow's cache keys: the same LLM cache entries as the local run's
    assert cache_keys(tmp_path / "dask-cache") == cache_keys(reference[0].parent / "local-cache")
    ran = {worker: n - before[worker] for worker, n in executed_per_worker(cluster).items()}
    # 30 records in batches of 5: 6 classify + 6 extract batches at least, spread over both workers
    assert len(ran) == 2 and all(n >= 2 for n in ran.values()), ran


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, cluster, reference, fresh):
    pids = cluster.run(os.getpid)
    killed: list[int] = []
    fresh.brain = slow(picky_brain, 0.4)

    def kill_when_busy() -> None:
        # relabel's calls under way on both workers: kill the first worker mid-batch
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if len(fresh.prompts_of("relabel")) >= 2:
                pid = next(iter(pids.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    summary = run_flow(tmp_path, "killed", fresh, task_runner="dask", dask_address=cluster.scheduler.address)
    killer.join(5)
    assert killed, "the run ended before a worker could be killed mid-run"
    assert killed[0] not in cluster.run(os.getpid).values()  # the nanny started a new worker process
    assert_same_outputs(tmp_path / "killed", summary, reference)
    # nothing counted twice: the summary's calls are the ones whose answers made the outputs
    assert summary["llm"]["total"]["calls"] + summary["llm"]["total"]["cache_hits"] >= reference[2]


def test_the_in_flight_limit_holds_across_workers(tmp_path, reference, fresh):
    """llm.concurrency=2 with two workers, each running a batch whose calls could take both
    slots: the server never sees more than 2 requests open, and sees 2 (both in use)."""
    fresh.brain = slow(picky_brain, 0.3)
    summary = run_flow(tmp_path, "limited", fresh, task_runner="dask", dask_workers=2)  # a LocalCluster of its own
    assert fresh.max_open == 2, fresh.max_open
    assert_same_outputs(tmp_path / "limited", summary, reference)


def test_the_batch_cache_on_s3_is_read_by_every_worker(tmp_path, reference, fresh, monkeypatch):
    """prefect.result_storage s3://…: the batch results the workers persist land in the store
    (a SeaweedFS here), and a second run on a new cluster finds every batch there: all cached,
    no LLM call. The keys reach the workers through their environment, never a block or a log."""
    with SeaweedFS(tmp_path / "s3") as store:
        for name, value in (("AGENTHER_S3_ENDPOINT", store.endpoint), ("AWS_ACCESS_KEY_ID", store.access_key),
                            ("AWS_SECRET_ACCESS_KEY", store.secret_key)):
            monkeypatch.setenv(name, value)
        s3_client(store.settings()).create_bucket(Bucket="agenther")
        storage = {"result_storage": "s3://agenther/prefect-results"}
        first = run_flow(tmp_path, "first", fresh, task_runner="dask", dask_workers=2, prefect=storage)
        assert_same_outputs(tmp_path / "first", first, reference)
        calls = len(fresh.requests)
        keys = list_keys("s3://agenther/prefect-results", store.settings())
        assert len(keys) >= 6 + 6 + 2 + 2 + 1, keys  # a result per batch (classify, extract, relabel, verify), ingest's
        with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: False}):
            state, second = run_flow_state(tmp_path, "second", fresh, task_runner="dask", dask_workers=2, prefect=storage)
        assert len(fresh.requests) == calls  # every batch came from the store
        # the stages' batches (package's shards write files: never cached)
        runs = [r for r in task_runs_of(state.state_details.flow_run_id) if BATCH_RUN.fullmatch(r.name)]
        assert runs and all(r.state.name == "Cached" for r in runs), [(r.name, r.state.name) for r in runs]
        assert_same_outputs(tmp_path / "second", second, reference)
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents(include_secrets=True)
        assert not any(store.secret_key in json.dumps(d.data, default=str) for d in documents)
        assert not any(store.secret_key in key for key in keys)


def _spend_until_refused(run: str, tokens_per_call: int) -> int:
    """On a worker: the run's budget (llm.budget_tokens=20, on the cluster), charged call by call
    until it refuses; how many calls this worker was let through."""
    from agenther.llm import BudgetExhausted
    from agenther.params import LLM
    from tasks.dask import ClusterLimits

    limits = ClusterLimits(LLM(concurrency=2, budget_tokens=20), run)
    allowed = 0
    while True:
        try:
            limits.budget.check()
        except BudgetExhausted:
            return allowed
        allowed += 1
        time.sleep(0.05)  # the other worker gets its turn in between
        limits.budget.charge(tokens_per_call, 0.0)


def test_the_budget_holds_across_workers(cluster):
    """Two worker processes spend one run's budget of 20 tokens, 1 token a call: together they
    are let through 20 calls (plus at most one per worker already past its check), where two
    process-local budgets would let through 40."""
    workers = list(cluster.scheduler_info()["workers"])
    cluster.run(importlib.import_module, "tasks.dask")  # imported first: both workers start spending at once
    futures = [cluster.submit(_spend_until_refused, "budget-test", 1, workers=[w], pure=False) for w in workers]
    allowed = [f.result() for f in futures]
    assert all(n > 0 for n in allowed), allowed  # both spent from it
    assert 20 <= sum(allowed) <= 20 + len(workers) - 1, allowed


def test_what_cannot_run_on_dask_is_refused_before_the_run(tmp_path, fresh):
    # llm.processes: the workers are the processes
    params = write_params(tmp_path / "params.yaml", fresh, ingest={"input": str(TAU), "limit": 4},
                          llm={"processes": 2})
    state = hindsight(params_file=str(params), out_dir=str(tmp_path / "out"), task_runner="dask", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"llm.processes=2 does not apply on Dask.*--dask-workers"):
        state.result()
    assert not (tmp_path / "out" / "00_trajectories.parquet").exists()  # refused before ingest
    # a model on this machine's loopback, workers on another machine
    local_model = WorkerLLMs("{}", Endpoint("openai/local", "http://127.0.0.1:8080/v1", "local/qwen"), None, "r")
    with pytest.raises(ValueError, match=r"127.0.0.1:8080/v1 listens on this machine's loopback.*tcp://10.1.2.3:8786"):
        check_reachable(local_model, "tcp://10.1.2.3:8786")
    check_reachable(local_model, "tcp://127.0.0.1:8786")  # a cluster on this machine reaches it
