"""The stage loop, written once: `agenther run`, `agenther stage` (so `dvc repro`) and the Prefect
flow all run the stages through `run_stage` / `run_stages`.

For a stage over a table (classify, extract, relabel, verify) the loop is: skip the stage if it is
up to date (its stamp matches: agenther/workdir.py); gate its input table (Great Expectations,
agenther/gates.py); read it in batches; hand each batch to the executor's `step`; append each
result to the stage's tables as it comes (never a whole table in memory); write the stage's stats
(NN_<stage>.json) and stamp it. Ingest (logs in, not a table) and package (the run's files out) are
one call each.

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

import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import polars as pl

from agenther import schema
from agenther.adapters.common import Quarantined, excerpt
from agenther.llm import LLMs, Usage
from agenther.progress import Progress
from agenther.tables import CONTRACTS, TableWriter, count_rows, gate_table, iter_batches
from agenther.workdir import STAGES, TABLES, stamp_stage, unchanged_stage, unstamp, write_stats


@dataclass(frozen=True)
class TableStage:
    """A stage that maps its input table, batch by batch, to a kept table (and a rejected one)."""
    name: str
    source: str  # the table it reads
    kept: str  # the table it writes
    rejects: bool  # it also writes <name>_rejected

    def count_in(self, batch: pl.DataFrame) -> int:
        # extract's input is the failures (successes pass through classify only); the others' every row
        return int(batch["is_failure"].sum()) if self.name == "extract" else batch.height


TABLE_STAGES = {s.name: s for s in (
    TableStage("classify", "trajectories", "classified", rejects=False),
    TableStage("extract", "classified", "extracted", rejects=True),
    TableStage("relabel", "extracted", "relabeled", rejects=True),
    TableStage("verify", "relabeled", "verified", rejects=True),
)}
FUSED = ("relabel", "verify")


@dataclass
class BatchResult:
    """One stage's output for one batch, and what its LLM calls cost."""
    kept: pl.DataFrame
    rejected: pl.DataFrame | None  # None for classify, which rejects nothing
    usage: dict = field(default_factory=lambda: vars(Usage()).copy())  # agenther.llm.Usage fields


# -- the step: one batch through one stage (or relabel + verify fused) --------------------------------
def uses_llm(stage: str, params: dict) -> bool:
    return stage in ("relabel", "verify") or params[stage]["mode"] == "llm"


def step(stages: tuple[str, ...], batch: pl.DataFrame, params: dict, llms: LLMs) -> dict[str, BatchResult]:
    """Run `stages` (one stage, or relabel and verify fused) on one batch: {stage: its result}.
    The calls go through a view of `llms` (same clients and cache, counters of its own), so each
    result carries exactly what its batch cost; no model is started for a stage without calls."""
    view = llms.view() if any(uses_llm(s, params) for s in stages) else None

    def usage(stage: str) -> dict:
        return vars(view.usage().get(stage, Usage())).copy() if view is not None else vars(Usage()).copy()

    if stages == FUSED:
        main = view.main()
        concurrency = params["llm"]["concurrency"]
        # Two records per request slot when every call waits for the run's in-flight limit
        # (llm.concurrency requests open at most, whatever the number of threads).
        shared = main.inflight is not None and main.inflight is llms.inflight and concurrency > 1
        relabeled, verified = _stage_module("verify").relabel_verify(batch, params, main, view.judge,
                                                    workers=2 * concurrency if shared else concurrency)
        return {"relabel": BatchResult(relabeled.kept, relabeled.rejected, usage("relabel")),
                "verify": BatchResult(verified.kept, verified.rejected, usage("verify"))}
    (stage,) = stages
    llm = view.main() if view is not None else None
    if stage == "classify":
        return {stage: BatchResult(_stage_module(stage).classify(batch, params, llm), None, usage(stage))}
    if stage == "extract":
        out = _stage_module(stage).extract(batch, params, llm)
    elif stage == "relabel":
        out = _stage_module(stage).relabel(batch, params, llm)
    elif stage == "verify":
        out = _stage_module(stage).verify(batch, params, llm, view.judge())
    else:
        raise ValueError(f"{stage!r} is not a table stage; table stages: {', '.join(TABLE_STAGES)}")
    return {stage: BatchResult(out.kept, out.rejected, usage(stage))}


def _stage_module(name: str) -> ModuleType:
    """agenther.stages.<name>, imported when its first batch comes: by name, so that the runner's
    own imports are not every stage's (dvc.yaml lists each stage's code: tests/test_layout.py)."""
    return importlib.import_module(f"agenther.stages.{name}")


# -- executors: how a step (and the two whole-run stages) run ---------------------------------------
class LocalExecutor:
    """Every step in this process, `io.batch_rows` rows at a time."""

    def batch_rows(self, params: dict) -> int:
        return params["io"]["batch_rows"]

    def step(self, stages: tuple[str, ...], batch: pl.DataFrame, params: dict, llms: LLMs) -> dict[str, BatchResult]:
        return step(stages, batch, params, llms)

    def map_steps(self, stages: tuple[str, ...], batches: Iterator[pl.DataFrame], params: dict,
                  llms: LLMs) -> Iterator[tuple[pl.DataFrame, dict[str, BatchResult]]]:
        """(batch, its step's results) for each batch, in input order. Here one after another;
        an executor that runs steps elsewhere may run several at once, but yields in this order."""
        for batch in batches:
            yield batch, self.step(stages, batch, params, llms)

    def ingest(self, params: dict, work: Path) -> dict:
        return ingest_tables(params, work)

    def package(self, params: dict, work: Path, out_dir: Path, llms: LLMs) -> dict:
        return _stage_module("package").package_run(params, work, out_dir, llms)


LOCAL = LocalExecutor()


def ingest_tables(params: dict, work: Path, files: list[Path] | None = None) -> dict:
    """The logs into the trajectories and quarantine tables, `io.batch_rows` records at a time
    (`files`: only these files of the input, as agenther/rounds.py reads the new ones). A row the
    table writer refuses is quarantined with the writer's reason; the others of its batch go on."""
    ingest, p = _stage_module("ingest"), params["ingest"]
    report = ingest.IngestReport()
    logs = ingest.read_logs(p["input"], fmt=p["format"], mapping=ingest.MessagesMapping.from_params(p["messages"] or {}),
                            limit=p["limit"], max_trajectory_mb=p["max_trajectory_mb"], report=report, files=files,
                            text_actions=p["text_actions"], grammars=p["grammars"])
    size = params["io"]["batch_rows"]
    pending: dict[str, list[dict]] = {"trajectories": [], "quarantine": []}
    with (TableWriter(Path(work) / TABLES["trajectories"], schema.TRAJECTORY) as good,
          TableWriter(Path(work) / TABLES["quarantine"], schema.QUARANTINE) as bad):

        def flush(table: str) -> None:
            rows, pending[table] = pending[table], []
            if table == "quarantine":
                bad.write_rows(rows)
            else:
                pending["quarantine"] += _write_or_quarantine(good, rows)

        for item in logs:
            table = "quarantine" if isinstance(item, Quarantined) else "trajectories"
            pending[table].append(item.row() if isinstance(item, Quarantined) else item)
            if len(pending[table]) >= size:
                flush(table)
        flush("trajectories")
        flush("quarantine")
    for line in report.describe():
        print(line, file=sys.stderr)
    return {"records_in": good.rows + bad.rows + report.duplicates, "trajectories": good.rows,
            "quarantined": bad.rows, **report.stats()}


def _write_or_quarantine(writer: TableWriter, rows: list[dict]) -> list[dict]:
    """Write `rows`; if the writer refuses the batch, write them one by one and return the
    quarantine rows of those it refuses (whatever it raises: no record ends the run)."""
    try:
        writer.write_rows(rows)
        return []
    except Exception:  # noqa: BLE001 - found out row by row below
        pass
    refused = []
    for row in rows:
        try:
            writer.write_rows([row])
        except Exception as exc:  # noqa: BLE001
            refused.append(Quarantined(row["source_file"], row["record_pointer"],
                                       f"{row['record_pointer'] or 'record'}: cannot be written to the trajectories "
                                       f"table ({type(exc).__name__}: {exc})"[:500], excerpt(row.get("goal"))).row())
    return refused


# -- the loop -------------------------------------------------------------------------------------
class _Outputs:
    """A table stage's writers and counts while its batches come in."""

    def __init__(self, stage: TableStage, work: Path, stack: ExitStack):
        self.stage, self.n_in, self.usage = stage, 0, Usage()
        self.kept = stack.enter_context(TableWriter(work / TABLES[stage.kept], CONTRACTS[stage.kept]))
        self.rejected = (stack.enter_context(TableWriter(work / TABLES[f"{stage.name}_rejected"], schema.REJECTION))
                         if stage.rejects else None)

    def add(self, result: BatchResult, n_in: int) -> None:
        self.n_in += n_in
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


def _batches(stage: TableStage, work: Path, params: dict, executor: LocalExecutor) -> Iterator[pl.DataFrame]:
    """The input table, gated, in the executor's batches. The gate runs before the first batch."""
    return iter_batches(gate_table(work, stage.source, params), executor.batch_rows(params))


def _run_table_stages(names: tuple[str, ...], params: dict, work: Path, llms: LLMs,
                      executor: LocalExecutor) -> dict[str, dict]:
    """One table stage, or relabel + verify fused: each batch of the first stage's input goes
    through the executor's step; the fused verify's input is relabel's kept rows."""
    stages = [TABLE_STAGES[n] for n in names]
    started = time.monotonic()
    with ExitStack() as stack:
        outputs = [_Outputs(s, work, stack) for s in stages]
        batches = _batches(stages[0], work, params, executor)
        progress = stack.enter_context(Progress("+".join(names), count_rows(work / TABLES[stages[0].source]),
                                                lambda: sum(u.calls for u in llms.usage().values())))
        nonempty = (b for b in batches if b.height)  # nothing to ask: no model is started for an empty table
        for batch, results in executor.map_steps(names, nonempty, params, llms):
            last = results[names[-1]].kept  # verify keeps every judged row: "kept" is the accepted ones
            progress.advance(batch.height, kept=int(last["verified"].sum()) if "verified" in last.columns else last.height)
            upstream = batch
            for out in outputs:
                result = results[out.stage.name]
                out.add(result, out.stage.count_in(upstream) if out is outputs[0] else upstream.height)
                upstream = result.kept
        stats = {}
        for out in outputs:
            stats[out.stage.name] = out.finish(work, time.monotonic() - started)
            stamp_stage(out.stage.name, params, work)
            if out is not outputs[-1]:  # the fused verify's input passes its gate before verify's tables are written
                gate_table(work, out.stage.kept, params)
    return stats


def run_stage(name: str, params: dict, work: Path, out_dir: Path, llms: LLMs,
              executor: LocalExecutor = LOCAL) -> dict:
    """Run one stage, unless it is up to date. Returns its stats (package: the run summary)."""
    return run_stages((name,), params, work, out_dir, llms, executor)[name]


def run_stages(names: tuple[str, ...], params: dict, work: Path, out_dir: Path, llms: LLMs,
               executor: LocalExecutor = LOCAL, fuse: bool = False) -> dict[str, dict]:
    """Run `names` in order, each unless up to date; with `fuse`, relabel and verify as one pass
    when both are to run. Returns {stage: its stats}."""
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
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
        if name == "ingest":
            started = time.monotonic()
            results[name] = {**executor.ingest(params, work), "seconds": round(time.monotonic() - started, 3)}
            write_stats(work, name, results[name])
        elif name == "package":
            results[name] = executor.package(params, work, out_dir, llms)
        else:
            results |= _run_table_stages(together, params, work, llms, executor)
            continue
        stamp_stage(name, params, work, out_dir)
    return results
