"""The stage loop, written once: `agenther run`, `agenther stage` (so `dvc repro`) and the Prefect
flow all run the stages through `run_stage` / `run_stages`.

For a stage over a table (classify, extract, relabel, verify) the loop is: skip the stage if it is
up to date (its stamp matches: agenther/workdir.py); gate its input table (Great Expectations,
agenther/gates.py); read it in batches; hand each batch to the executor's `step`; append each
result to the stage's tables as it comes (never a whole table in memory); write the stage's stats
(NN_<stage>.json) and stamp it. Ingest (logs in, not a table) and package (the run's files out) are
one call each, whose shards (ingest's parts of the logs; package's rows, buckets, file merges and
exporter finishes) the executor's `spread` runs. Which stage is which, what it reads and writes and
which function does it: its record (agenther/stages/__init__.py).

What differs between the callers is only how a step runs, the executor (datatrove's idea):
`LocalExecutor` calls `step()` in this process, in `io.batch_rows` batches; the Prefect flow's
executor (tasks/stages.py) runs it as a cached, retried task per `prefect.batch_size` batch,
on a Dask cluster several batches at once. Either way `map_steps` hands the results back in
input order, so the tables are the same whoever ran the steps.

Relabel and verify may run fused (`run_stages(..., fuse=True)`, `agenther run` without an LLM
budget): one pass over the extracted table in which each record is judged as soon as its relabel
passes, the same step functions and tables; the relabeled table passes verify's input gate
before any verify table is written.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from agenther import schema
from agenther.llm import LLMs, Usage
from agenther.params import Params
from agenther.progress import Progress
from agenther.stages import FUSED, FUSED_STEP, STAGES, Spread, Stage, in_process, load, stage
from agenther.tables import CONTRACTS, TableWriter, count_rows, gate_table, iter_batches
from agenther.workdir import TABLES, stamp_stage, unchanged_stage, unstamp, write_stats

TABLE_STAGES = {s.name: s for s in STAGES.values() if s.batched}


@dataclass
class BatchResult:
    """One stage's output for one batch, and what its LLM calls cost."""
    kept: pl.DataFrame
    rejected: pl.DataFrame | None  # None for classify, which rejects nothing
    usage: dict = field(default_factory=lambda: vars(Usage()).copy())  # agenther.llm.Usage fields
    n_in: int = 0  # the batch's rows that are the stage's input (extract's: the failures)


# -- the step: one batch through one stage (or relabel + verify fused) --------------------------------
def uses_llm(name: str, params: Params) -> bool:
    return stage(name).uses_llm(params)


def step(stages: tuple[str, ...], batch: pl.DataFrame, params: Params, llms: LLMs) -> dict[str, BatchResult]:
    """Run `stages` (one stage, or relabel and verify fused) on one batch: {stage: its result}.
    The calls go through a view of `llms` (same clients and cache, counters of its own), so each
    result carries exactly what its batch cost; no model is started for a stage without calls."""
    view = llms.view() if any(uses_llm(s, params) for s in stages) else None

    def usage(name: str) -> dict:
        return vars(view.usage().get(name, Usage())).copy() if view is not None else vars(Usage()).copy()

    if stages == FUSED:
        main = view.main()
        concurrency = params.llm.concurrency
        # Two records per request slot when every call waits for the run's in-flight limit
        # (llm.concurrency requests open at most, whatever the number of threads).
        shared = main.inflight is not None and main.inflight is llms.inflight and concurrency > 1
        relabeled, verified = load(FUSED_STEP)(batch, params, main, view.judge,
                                               workers=2 * concurrency if shared else concurrency)
        return {"relabel": BatchResult(relabeled.kept, relabeled.rejected, usage("relabel"), batch.height),
                "verify": BatchResult(verified.kept, verified.rejected, usage("verify"), relabeled.kept.height)}
    (name,) = stages
    if name not in TABLE_STAGES:
        raise ValueError(f"{name!r} is not a table stage; table stages: {', '.join(TABLE_STAGES)}")
    out = TABLE_STAGES[name].load()(batch, params, view)
    return {name: BatchResult(out.kept, out.rejected, usage(name), _count_in(TABLE_STAGES[name], batch))}


def _count_in(stage: Stage, batch: pl.DataFrame) -> int:
    """How many of the batch's rows are the stage's input (extract's: the failures; successes pass
    through classify only)."""
    return int(batch[stage.counted].sum()) if stage.counted else batch.height


# -- executors: how a step (and the two whole-run stages) run ---------------------------------------
class LocalExecutor:
    """Every step in this process, `io.batch_rows` rows at a time."""

    def batch_rows(self, params: Params) -> int:
        return params.io.batch_rows

    def step(self, stages: tuple[str, ...], batch: pl.DataFrame, params: Params, llms: LLMs) -> dict[str, BatchResult]:
        return step(stages, batch, params, llms)

    def map_steps(self, stages: tuple[str, ...], table: Path, params: Params,
                  llms: LLMs) -> Iterator[tuple[int, dict[str, BatchResult]]]:
        """(rows, the step's results) for each batch of the (gated) input table, in its order; no step
        for an empty table (no model is started for it). Here one batch after another, read in this
        process; an executor that runs steps elsewhere may run several at once and let each read its
        rows of the table itself (tasks/stages.py), but yields in this order."""
        for batch in iter_batches(table, self.batch_rows(params)):
            if batch.height:
                yield batch.height, self.step(stages, batch, params, llms)

    def spread(self, fn: Callable[[Any], Any], jobs: list, stage: str = "") -> Iterator[Any]:
        """fn(job) for each job, results in order (the shards of `stage`, a whole-run stage): here one
        after another."""
        return in_process(fn, jobs)

    def ingest(self, params: Params, work: Path) -> dict:
        return stage("ingest").load()(params, work, spread=self.spread_for("ingest"))

    def package(self, params: Params, work: Path, out_dir: Path, llms: LLMs) -> dict:
        return stage("package").load()(params, work, out_dir, llms, self.spread_for("package"))

    def spread_for(self, name: str) -> Spread:
        """How `name`'s shards run: `spread`, named after the stage where an executor names its runs."""
        return functools.partial(self.spread, stage=name)


LOCAL = LocalExecutor()


# -- the loop -------------------------------------------------------------------------------------
class _Outputs:
    """A table stage's writers and counts while its batches come in."""

    def __init__(self, stage: Stage, work: Path, stack: ExitStack):
        self.stage, self.n_in, self.usage = stage, 0, Usage()
        self.kept = stack.enter_context(TableWriter(work / TABLES[stage.kept], CONTRACTS[stage.kept]))
        self.rejected = (stack.enter_context(TableWriter(work / TABLES[stage.writes[1]], schema.REJECTION))
                         if stage.rejects else None)

    def add(self, result: BatchResult) -> None:
        self.n_in += result.n_in
        self.usage.add(Usage(**result.usage))
        self.kept.write(result.kept)
        if self.rejected is not None:
            self.rejected.write(result.rejected)

    def finish(self, work: Path, seconds: float) -> dict:
        """Close the tables (renamed into place) and write the stage's stats."""
        self.kept.close()
        stats = {"in": self.n_in, "usage": vars(self.usage).copy(), "seconds": round(seconds, 3)}
        if self.rejected is not None:
            self.rejected.close()
            stats |= {"out": self.kept.rows, "rejected": self.rejected.rows}
        write_stats(work, self.stage.name, stats)
        return stats


def _run_table_stages(names: tuple[str, ...], params: Params, work: Path, llms: LLMs,
                      executor: LocalExecutor) -> dict[str, dict]:
    """One table stage, or relabel + verify fused: each batch of the first stage's input goes
    through the executor's step; the fused verify's input is relabel's kept rows."""
    stages = [TABLE_STAGES[n] for n in names]
    started = time.monotonic()
    with ExitStack() as stack:
        outputs = [_Outputs(s, work, stack) for s in stages]
        source = gate_table(work, stages[0].reads[0], params)  # the gate runs before anything is written
        progress = stack.enter_context(Progress("+".join(names), count_rows(source),
                                                lambda: sum(u.calls for u in llms.usage().values())))
        for rows, results in executor.map_steps(names, source, params, llms):
            last = results[names[-1]].kept  # verify keeps every judged row: "kept" is the accepted ones
            progress.advance(rows, kept=int(last["verified"].sum()) if "verified" in last.columns else last.height)
            for out in outputs:
                out.add(results[out.stage.name])
        stats = {}
        for out in outputs:
            stats[out.stage.name] = out.finish(work, time.monotonic() - started)
            stamp_stage(out.stage.name, params, work)
            if out is not outputs[-1]:  # the fused verify's input passes its gate before verify's tables are written
                gate_table(work, out.stage.kept, params)
    return stats


def run_stage(name: str, params: Params, work: Path, out_dir: Path, llms: LLMs,
              executor: LocalExecutor = LOCAL) -> dict:
    """Run one stage, unless it is up to date. Returns its stats (package: the run summary)."""
    return run_stages((name,), params, work, out_dir, llms, executor)[name]


def run_stages(names: tuple[str, ...], params: Params, work: Path, out_dir: Path, llms: LLMs,
               executor: LocalExecutor = LOCAL, fuse: bool = False) -> dict[str, dict]:
    """Run `names` in order, each unless up to date; with `fuse`, relabel and verify as one pass
    when both are to run. Returns {stage: its stats}."""
    for name in names:
        stage(name)  # an unknown name is a ValueError before anything runs
    work, out_dir = Path(work), Path(out_dir)
    results: dict[str, dict] = {}
    for name in names:
        if name in results:
            continue  # verify, run fused with relabel
        done = unchanged_stage(name, params, work, out_dir)
        if done is not None:
            results[name] = done
            continue
        together = FUSED if fuse and name == FUSED[0] and FUSED[1] in names else (name,)
        unstamp(work, *together)  # a stage stopped half-way leaves no stamp: its rerun runs it again
        if STAGES[name].batched:
            results |= _run_table_stages(together, params, work, llms, executor)
            continue
        if not STAGES[name].reads:  # ingest: the logs in
            started = time.monotonic()
            results[name] = {**executor.ingest(params, work), "seconds": round(time.monotonic() - started, 3)}
            write_stats(work, name, results[name])
        else:  # package: the output folder out
            results[name] = executor.package(params, work, out_dir, llms)
        stamp_stage(name, params, work, out_dir)
    return results
