"""The stages as Prefect tasks: thin wrappers around agenther's frame-level stage functions.

Each stage gates its input table in the work folder (`agenther.runner.gate_table`), reads
it in batches of `prefect.batch_size` rows, runs one task per batch (never one per
trajectory: a task run costs milliseconds to tens of ms of API traffic) and appends each
batch's result to the stage's tables as it comes, under the names `agenther.runner` uses
(TABLES/STATS), so `agenther.stages.summary.package_run` works unchanged and no stage holds a
whole table. Ingest is one task that streams the logs into the tables; its cached result is
their digests, and a cache hit copies them from the folder they were written to.

Batch tasks:
- cache key: content of the batch + the stage's params + code and prompt versions (caching.py);
  results are persisted, so an identical rerun is a cache hit for every batch and calls no LLM;
- retries: exponential backoff with jitter, transient errors only (retry.py);
- each batch gets its own view of the LLM clients (shared server and response cache, its own
  usage counters), so per-stage LLM accounting stays exact; a cached batch's calls count as
  cache hits, as the LLM response cache counts them.
Batches of one stage run one after another: `llm.concurrency` already bounds the calls in
flight inside a batch, and running batches side by side would multiply that bound.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from agenther import schema
from agenther.llm import Usage
from agenther.providers import LLMs
from agenther.runner import (
    KEPT,
    TABLES,
    classify_stats,
    filtered_stats,
    gate_table,
    ingest_stats,
    stage_ingest,
)
from agenther.stages.classify import classify as classify_frame
from agenther.stages.extract import extract as extract_frame
from agenther.stages.relabel import relabel as relabel_frame
from agenther.stages.summary import package_run
from agenther.stages.verify import verify as verify_frame
from agenther.tables import TableWriter, iter_batches
from agenther.workdir import file_digest
from tasks.caching import files_digest, frame_digest, stage_key
from tasks.retry import retry_if_transient


@dataclass
class BatchResult:
    kept: pl.DataFrame
    rejected: pl.DataFrame | None  # None for classify, which rejects nothing
    usage: dict[str, Any]  # agenther.llm.Usage fields, for this batch's own calls


# Defaults; the flow applies params' `prefect:` section with `configured()`.
RETRY = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5,
         "retry_condition_fn": retry_if_transient}
CACHED = {"persist_result": True, "cache_expiration": timedelta(days=30)}


def _batch_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return stage_key(stage, parameters["params"], frame_digest(parameters["batch"]))

    return key


def _ingest_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    params = parameters["params"]
    return stage_key("ingest", params, files_digest(params["ingest"]["input"]))


def _view(llms: LLMs, params: dict) -> LLMs:
    """This batch's own clients: same model server and response cache, fresh usage counters."""
    main = llms.main()
    judge = llms.judge()
    mine = dataclasses.replace(main, usage={}, _lock=threading.Lock())
    judge_mine = mine if judge is main else dataclasses.replace(judge, usage={}, _lock=threading.Lock())
    return LLMs.of(params, mine, judge_mine)


def _usage(view: LLMs | None, stage: str) -> dict[str, Any]:
    return vars(view.usage().get(stage, Usage())).copy() if view is not None else vars(Usage()).copy()


# -- the tasks: one call into agenther each -----------------------------------------------------
@task(name="ingest", task_run_name="ingest", cache_key_fn=_ingest_key, **CACHED, **RETRY)
def ingest_task(params: dict, work: str) -> dict:
    """Streams the logs into the work folder's tables (agenther.runner.stage_ingest); the
    result (kept by Prefect) is small: the stats, where the tables were written and their digests."""
    stats = stage_ingest(params, Path(work))
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


@task(name="classify-batch", cache_key_fn=_batch_key("classify"), **CACHED, **RETRY)
def classify_batch(batch: pl.DataFrame, params: dict, llms: LLMs) -> BatchResult:
    view = _view(llms, params) if params["classify"]["mode"] == "llm" else None
    return BatchResult(classify_frame(batch, params, view.main() if view else None), None, _usage(view, "classify"))


@task(name="extract-batch", cache_key_fn=_batch_key("extract"), **CACHED, **RETRY)
def extract_batch(batch: pl.DataFrame, params: dict, llms: LLMs) -> BatchResult:
    view = _view(llms, params) if params["extract"]["mode"] == "llm" else None
    out = extract_frame(batch, params, view.main() if view else None)
    return BatchResult(out.kept, out.rejected, _usage(view, "extract"))


@task(name="relabel-batch", cache_key_fn=_batch_key("relabel"), **CACHED, **RETRY)
def relabel_batch(batch: pl.DataFrame, params: dict, llms: LLMs) -> BatchResult:
    view = _view(llms, params)
    out = relabel_frame(batch, params, view.main())
    return BatchResult(out.kept, out.rejected, _usage(view, "relabel"))


@task(name="verify-batch", cache_key_fn=_batch_key("verify"), **CACHED, **RETRY)
def verify_batch(batch: pl.DataFrame, params: dict, llms: LLMs) -> BatchResult:
    view = _view(llms, params)
    out = verify_frame(batch, params, view.main(), view.judge())
    return BatchResult(out.kept, out.rejected, _usage(view, "verify"))


# Never cached: they write files and objects (a cache hit would skip the writing) and are cheap.
@task(name="package", task_run_name="package", cache_policy=NO_CACHE, persist_result=False)
def package_task(params: dict, work: str, out: str, llms: LLMs) -> dict:
    return package_run(params, Path(work), Path(out), llms)


@task(name="push", task_run_name="push", cache_policy=NO_CACHE, persist_result=False, **RETRY)
def push_task(local: str, url: str) -> list[str]:
    from agenther.s3 import push_dir  # settings from AGENTHER_S3_ENDPOINT / AWS_* env

    return push_dir(Path(local), url)


# -- the stages: batches in, the stage's tables out --------------------------------------------
def configured(t: Task, params: dict) -> Task:
    """`t` with the retry settings of params' `prefect:` section."""
    p = params["prefect"]
    return t.with_options(retries=int(p["retries"]),
                          retry_delay_seconds=exponential_backoff(backoff_factor=float(p["retry_backoff_s"])),
                          retry_jitter_factor=float(p["retry_jitter"]))


def _run_batches(stage: str, t: Task, batches: Iterable[pl.DataFrame], params: dict, llms: LLMs,
                 write: Callable[[BatchResult], None]) -> Usage:
    """One task run per batch, in order; each result is written as it comes (never all held)."""
    t = configured(t, params)
    usage = Usage()
    start = 0
    for batch in batches:
        named = t.with_options(task_run_name=f"{stage}[{start}:{start + batch.height}]")
        state = named(batch, params, llms, return_state=True)
        result: BatchResult = state.result()  # raises the task's error once its retries are spent
        batch_usage = Usage(**result.usage)
        if state.name == "Cached":  # no call was made now: what it once cost is now a cache hit
            batch_usage = Usage(cache_hits=batch_usage.calls + batch_usage.cache_hits)
        usage.add(batch_usage)
        write(result)
        start += batch.height
    return usage


def _batches(work: Path, table: str, contract: dict, params: dict) -> Iterator[pl.DataFrame]:
    """The input table, gated, in batches of `prefect.batch_size` rows (same bounds as slicing
    the whole table, so batch cache keys do not depend on how the table is stored)."""
    return iter_batches(gate_table(work, table, contract, params), max(1, int(params["prefect"]["batch_size"])))


def ingest(params: dict, work: Path) -> dict:
    t = configured(ingest_task, params)
    result = t(params, str(work))
    if not _restore_ingest(result, Path(work)):  # a cache hit whose tables are gone: ingest again
        result = t.with_options(refresh_cache=True)(params, str(work))
    stats = result["stats"]
    return ingest_stats(Path(work), stats["records_in"], stats["trajectories"], stats["quarantined"])


def classify(params: dict, work: Path, llms: LLMs) -> dict:
    with TableWriter(Path(work) / TABLES["classified"], schema.CLASSIFIED) as out:
        usage = _run_batches("classify", classify_batch, _batches(work, "trajectories", schema.TRAJECTORY, params),
                             params, llms, lambda r: out.write(r.kept))
    return classify_stats(work, out.rows, usage)


def _filtering(stage: str, t: Task, source: str, contract: dict, params: dict, work: Path, llms: LLMs) -> dict:
    n_in = 0

    def write(result: BatchResult) -> None:
        kept.write(result.kept)
        rejected.write(result.rejected)

    def counted(batches: Iterable[pl.DataFrame]) -> Iterator[pl.DataFrame]:
        nonlocal n_in
        for batch in batches:  # extract's input is the failures; the others' is every row
            n_in += int(batch["is_failure"].sum()) if stage == "extract" else batch.height
            yield batch

    with (TableWriter(Path(work) / TABLES[KEPT[stage]], contract) as kept,
          TableWriter(Path(work) / TABLES[f"{stage}_rejected"], schema.REJECTION) as rejected):
        usage = _run_batches(stage, t, counted(_batches(work, source, CONTRACT_OF[source], params)),
                             params, llms, write)
    return filtered_stats(stage, work, n_in, kept.rows, rejected.rows, usage)


CONTRACT_OF = {"classified": schema.CLASSIFIED, "extracted": schema.EXTRACTED, "relabeled": schema.RELABELED}


def extract(params: dict, work: Path, llms: LLMs) -> dict:
    return _filtering("extract", extract_batch, "classified", schema.EXTRACTED, params, work, llms)


def relabel(params: dict, work: Path, llms: LLMs) -> dict:
    return _filtering("relabel", relabel_batch, "extracted", schema.RELABELED, params, work, llms)


def verify(params: dict, work: Path, llms: LLMs) -> dict:
    return _filtering("verify", verify_batch, "relabeled", schema.VERIFIED, params, work, llms)


def package(params: dict, work: Path, out: Path, llms: LLMs) -> dict:
    return package_task(params, str(work), str(out), llms)


def push(out: Path, url: str, params: dict) -> list[str]:
    return configured(push_task, params)(str(out), url)
