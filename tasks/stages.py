"""The stages as Prefect tasks: the runner's executor (agenther/runner.py) with each step a task.

The stage loop (gates, batches, tables, stats, stamps) is agenther.runner's, as for `agenther run`
and `dvc repro`; Prefect supplies the per-batch step, ingest and package's shards as tasks:
- a batch of `prefect.batch_size` rows per task run (never one per trajectory: a task run costs
  milliseconds to tens of ms of API traffic). A batch task is handed where its rows are (the input
  table, which every worker reads on the shared work folder, and the rows' range), not the rows:
  nothing big is pickled into the task graph; each reads its rows itself;
- cache key: the input table's sha256 and the batch's range (so its content) + the stage's params
  + code and prompt versions (caching.py); results are persisted, so an identical rerun is a cache
  hit for every batch and calls no LLM; a cached batch's calls count as cache hits, as the LLM
  response cache counts them;
- retries: exponential backoff with jitter, transient errors only (retry.py).
Ingest is one task that reads the logs into the tables, its shards (parts of the logs) spread over
the cluster's workers; its cached result is the tables' digests, and a cache hit copies them from
the folder they were written to. Package runs in the flow and spreads its shards as task runs
(agenther/stages/packaging.py). Shards are never cached: they write files.
With the local task runner, batches of one stage run one after another in the flow's thread:
`llm.concurrency` already bounds the calls in flight inside a batch. With the Dask task runner
(tasks/dask.py) a stage's batches are submitted to the cluster, at most two per worker thread
ahead of the one the stage loop waits for (the flow's memory stays flat), and their results come
back to the stage loop in input order (the tables are the ones the local runner writes); the
in-flight limit and the other run-wide limits then hold across the workers (tasks/dask.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff

from agenther import runner
from agenther.llm import LLMs, Usage
from agenther.params import Params, Prefect
from agenther.runner import BatchResult, LocalExecutor
from agenther.stages import Spread, in_process, stage
from agenther.tables import count_rows, read_rows
from agenther.workdir import TABLES, file_digest
from tasks.caching import files_digest, sha256, stage_key

if TYPE_CHECKING:
    from prefect.filesystems import WritableFileSystem
    from prefect_dask import DaskTaskRunner

    from tasks.dask import WorkerLLMs
from tasks.retry import retry_if_transient

# The `prefect:` section's defaults; PrefectExecutor applies the run's params with `configured()`.
DEFAULT = Prefect()
RETRY = {"retries": DEFAULT.retries, "retry_delay_seconds": exponential_backoff(backoff_factor=DEFAULT.retry_backoff_s),
         "retry_jitter_factor": DEFAULT.retry_jitter, "retry_condition_fn": retry_if_transient}
CACHED = {"persist_result": True, "cache_expiration": timedelta(days=30)}


def _batch_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        offset, rows = parameters["rows"]  # the rows of a table with this sha256: the batch's content
        return stage_key(stage, parameters["params"], sha256(parameters["table_digest"], str(offset), str(rows)))

    return key


def _ingest_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    params = parameters["params"]
    return stage_key("ingest", params, files_digest(params.ingest.input))


# -- the tasks: one call into agenther each -----------------------------------------------------
def _batch(name: str) -> Task:
    @task(name=f"{name}-batch", cache_key_fn=_batch_key(name), **CACHED, **RETRY)
    def run_batch(table: str, table_digest: str, rows: tuple[int, int], params: Params,
                  llms: LLMs | WorkerLLMs) -> BatchResult:
        # On a Dask worker `llms` is a description (tasks/dask.py): this process's clients for the run
        batch = read_rows(table, *rows)
        return runner.step((name,), batch, params, llms if isinstance(llms, LLMs) else llms.llms())[name]

    return run_batch


BATCH_TASKS = {stage: _batch(stage) for stage in runner.TABLE_STAGES}


@task(name="ingest", task_run_name="ingest", cache_key_fn=_ingest_key, **CACHED, **RETRY)
def ingest_task(params: Params, work: str, spread: Spread) -> dict:
    """Reads the logs into the work folder's tables (the ingest stage's function; its shards spread
    over the cluster's workers when there is one); the result (kept by Prefect) is small: the
    stats, where the tables were written and their digests."""
    stats = stage("ingest").load()(params, Path(work), spread=spread)
    return {"work": work, "stats": stats, "digests": _table_digests(Path(work))}


INGEST_TABLES = ("trajectories", "quarantine")


def _table_digests(work: Path) -> dict[str, str]:
    return {name: file_digest(work / TABLES[name]) for name in INGEST_TABLES}


def _restore_ingest(result: dict, work: Path) -> bool:
    """Make `work` hold the tables a (possibly cached) ingest result describes: already there,
    or copied from the folder the result was written to. False if neither has them any more."""
    for name in INGEST_TABLES:
        target, digest = work / TABLES[name], result["digests"][name]
        if target.exists() and file_digest(target) == digest:
            continue
        source = Path(result["work"]) / TABLES[name]
        if not source.exists() or file_digest(source) != digest:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return True


# Never cached: they write files and objects (a cache hit would skip the writing).
@task(name="shard", cache_policy=NO_CACHE, persist_result=False)
def shard_task(fn: Callable[[Any], Any], job: Any) -> Any:
    """One shard of a whole-run stage (package's): fn(job), on whichever worker runs it."""
    return fn(job)


@task(name="push", task_run_name="push", cache_policy=NO_CACHE, persist_result=False, **RETRY)
def push_task(local: str, url: str) -> list[str]:
    from agenther.s3 import push_dir  # settings from AGENTHER_S3_ENDPOINT / AWS_* env

    return push_dir(Path(local), url)


def configured(t: Task, params: Params) -> Task:
    """`t` with the retry settings and the result storage of params' `prefect:` section."""
    p = params.prefect
    storage = {"result_storage": result_storage(p.result_storage, os.environ.get("AGENTHER_S3_ENDPOINT"))} \
        if p.result_storage else {}
    return t.with_options(retries=p.retries, retry_delay_seconds=exponential_backoff(backoff_factor=p.retry_backoff_s),
                          retry_jitter_factor=p.retry_jitter, **storage)


@functools.cache  # one block document per storage (and S3 endpoint) and process, not one per batch
def result_storage(url: str, endpoint: str | None = None) -> WritableFileSystem:
    """Where the batch cache (Prefect's persisted task results) lives when every worker must read
    it: s3://bucket/prefix through fsspec (s3fs), or a folder all workers mount; saved as a block
    (Prefect wants result storage persisted server-side). The block holds the endpoint only: s3fs
    takes the keys from each process's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or
    boto's chain), so no key is in a block document, a task parameter or a log. (`endpoint` keys
    the cache: agenther.s3 reads it from AGENTHER_S3_ENDPOINT.)"""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if url.startswith("s3://"):
        from agenther.s3 import s3_settings

        settings = s3_settings()
        client = {"region_name": settings.region} | ({"endpoint_url": settings.endpoint} if settings.endpoint else {})
        block: WritableFileSystem = RemoteFileSystem(basepath=url.rstrip("/"), settings={"client_kwargs": client})
    elif "://" in url:
        raise ValueError(f"prefect.result_storage {url!r}: expected s3://bucket/prefix or a folder")
    else:
        block = LocalFileSystem(basepath=str(Path(url).resolve()))
    digest = hashlib.sha256(json.dumps(block.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
    block.save(f"agenther-results-{digest}", overwrite=True)
    return block


# -- the executor -------------------------------------------------------------------------------
class PrefectExecutor(LocalExecutor):
    """agenther.runner's executor with every step a Prefect task run (cached, retried): in the
    flow's thread, or, given a DaskTaskRunner, on its cluster (`run` names the run's cluster-wide limits)."""

    def __init__(self, task_runner: DaskTaskRunner | None = None, run: str = "local") -> None:
        self.task_runner, self.run = task_runner, run

    def batch_rows(self, params: Params) -> int:
        return params.prefect.batch_size

    def map_steps(self, stages: tuple[str, ...], table: Path, params: Params,
                  llms: LLMs) -> Iterator[tuple[int, dict[str, BatchResult]]]:
        (stage,) = stages  # the flow does not fuse: each stage's batches are cached on their own
        size, total = self.batch_rows(params), count_rows(table)
        if not total:
            return  # no step for an empty table: no model is started for it
        task_ = configured(BATCH_TASKS[stage], params)
        args = {"table": str(table), "table_digest": file_digest(table), "params": params, "llms": llms}
        if self.task_runner is not None:
            from tasks.dask import WorkerLLMs, check_reachable

            # Workers get the clients' description; the model server (if any) is started here, once
            args["llms"] = WorkerLLMs.of(llms, self.run, runner.uses_llm(stage, params))
            check_reachable(args["llms"], self.task_runner.client.scheduler.address)
        runs = [(task_.with_options(task_run_name=f"{stage}[{start}:{min(start + size, total)}]"),
                 args | {"rows": (start, min(size, total - start))}) for start in range(0, total, size)]
        for (_, kwargs), state in zip(runs, self._in_order(runs), strict=True):
            yield kwargs["rows"][1], {stage: _settled(state)}

    def spread(self, fn: Callable[[Any], Any], jobs: list, stage: str = "shard") -> Iterator[Any]:
        """Each shard a task run (`<stage>[<its function> <i>]`: package[rows 3], package[merge_runs 0]),
        on the cluster when there is one."""
        kind = fn.__name__.removesuffix("_shard")
        runs = [(shard_task.with_options(task_run_name=f"{stage}[{kind} {i}]"), {"fn": fn, "job": job})
                for i, job in enumerate(jobs)]
        return (state.result() for state in self._in_order(runs))

    def spread_in_task(self, fn: Callable[[Any], Any], jobs: list) -> Iterator[Any]:
        """spread() for the shards of a stage that runs as one cached task (ingest's): a task run cannot
        submit task runs to the cluster (its context does not pickle), so there they are plain Dask
        tasks on the workers (retried if a worker dies); without a cluster, one after another here."""
        if self.task_runner is None:
            return in_process(fn, jobs)
        futures = self.task_runner.client.map(fn, jobs, pure=False, retries=2)
        return (future.result() for future in futures)

    def _in_order(self, runs: list[tuple[Task, dict]]) -> Iterator[State]:
        """Each task run's final state, in the order given: in the flow's thread one after another, or
        submitted to the cluster at most two per worker thread ahead of the one waited for (the flow's
        memory stays flat and a worker never waits for its next task)."""
        if self.task_runner is None:
            for task_, kwargs in runs:
                yield task_(**kwargs, return_state=True)
            return
        ahead = 2 * sum(self.task_runner.client.nthreads().values())
        todo, pending = iter(runs), deque()
        try:
            for task_, kwargs in todo:
                pending.append(self.task_runner.submit(task_, kwargs))
                if len(pending) > ahead:
                    yield pending.popleft().wrapped_future.result()
            while pending:
                yield pending.popleft().wrapped_future.result()
        finally:  # a failed task stops the stage: the ones still queued behind it are not run
            for future in pending:
                future.wrapped_future.cancel()

    def ingest(self, params: Params, work: Path) -> dict:
        t = configured(ingest_task, params)
        result = t(params, str(work), self.spread_in_task)
        if not _restore_ingest(result, Path(work)):  # a cache hit whose tables are gone: ingest again
            result = t.with_options(refresh_cache=True)(params, str(work), self.spread_in_task)
        return result["stats"]



def _settled(state: State) -> BatchResult:
    """A batch task's final state as the stage loop takes it: its result (raises the task's error
    once its retries are spent); a cached batch's calls counted as cache hits."""
    result: BatchResult = state.result()
    if state.name == "Cached":  # no call was made now: what it once cost is now a cache hit
        usage = Usage(**result.usage)
        result = BatchResult(result.kept, result.rejected, vars(Usage(cache_hits=usage.calls + usage.cache_hits)).copy(),
                             result.n_in)
    return result


@contextmanager
def executor(params: Params, run: str) -> Iterator[PrefectExecutor]:
    """The flow's executor for params' `prefect.task_runner`: "local" (batches in the flow's thread)
    or "dask" (on `prefect.dask_address`, or on a LocalCluster of `prefect.dask_workers` processes,
    closed when the block ends)."""
    p = params.prefect
    if p.task_runner == "local":
        yield PrefectExecutor()
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import dask  # distributed and prefect-dask: imported only for a run on Dask

    dask.check_llm_params(params.llm)
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    # Task runs carry the flow's settings to the workers: with Prefect's temporary local API (no
    # PREFECT_API_URL) they would each start a temporary API of their own, so name the flow's.
    with (temporary_settings(updates={PREFECT_API_URL: api_url}),
          dask.task_runner(p.dask_address, p.dask_workers) as task_runner):
        yield PrefectExecutor(task_runner, run)


def push(out: Path, url: str, params: Params) -> list[str]:
    return configured(push_task, params)(str(out), url)
