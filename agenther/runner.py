"""The stages as file-to-file steps: each reads its upstream Parquet tables from a work
folder and writes its own. The CLI (`agenther run`, `agenther stage`), `dvc repro` and
the Prefect flow all run these, so there is one implementation of each stage.

Every stage also writes `NN_<stage>.json`: what the summary needs from it (counts,
LLM usage), so the package stage can summarize a run whose stages ran in other processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from agenther import gates, schema
from agenther.adapters.common import Quarantined
from agenther.llm import Usage
from agenther.providers import LLMs
from agenther.stages.classify import classify
from agenther.stages.extract import extract
from agenther.stages.ingest import MessagesMapping, read_logs
from agenther.stages.relabel import relabel
from agenther.stages.verify import verify
from agenther.tables import TableWriter, batch_rows, iter_batches
from agenther.workdir import (
    STAGES,
    TABLES,
    stamp_stage,
    unchanged_stage,
    unstamp,
    write_stats,
)


def write_table(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.write_parquet(tmp, statistics=False)
    tmp.replace(path)  # never leave a half-written table for the next stage


def gate_table(work: Path, name: str, contract: dict, params: dict) -> Path:
    """Check a table before the next stage reads it; returns its path. A gated table
    (gates.CONTRACTS) passes its Great Expectations gate on a lazy scan (only its scalar
    columns are collected, whatever its size): on failure GateFailed stops the run here,
    before the next stage writes anything; the result is kept in <work>/gates/<name>.json."""
    path = Path(work) / TABLES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    scan = pl.scan_parquet(path)
    if name in gates.CONTRACTS:
        results = Path(work) / "gates"
        if gates.gate_params(params)["enabled"]:
            # Before validate_columns: the gate checks the contract too, and this way a missing
            # column is reported (and recorded) by the gate like every other broken expectation.
            gates.check(scan, name, params, results, source=str(path))
        else:
            (results / f"{name}.json").unlink(missing_ok=True)  # no stale verdict from an earlier run
    schema.validate_columns(pl.DataFrame(schema=scan.collect_schema()), contract, str(path))
    return path


def read_table(work: Path, name: str, contract: dict, params: dict) -> pl.DataFrame:
    """The whole table, gated (`gate_table`): for the tables that stay small (LLM stages)."""
    return pl.read_parquet(gate_table(work, name, contract, params))


def read_batches(work: Path, name: str, contract: dict, params: dict) -> Iterator[pl.DataFrame]:
    """The table, gated, `io.batch_rows` rows at a time: a stage holds one batch in memory.
    The gate runs at the first `next()`, before any batch is handed out."""
    yield from iter_batches(gate_table(work, name, contract, params), batch_rows(params))


KEPT = {"extract": "extracted", "relabel": "relabeled", "verify": "verified"}  # each filter's kept table


def _usage(llms: LLMs, stage: str) -> Usage:
    return llms.usage().get(stage, Usage())


# -- a stage's stats: shared with the Prefect tasks, which compute the stages in batches --------
def ingest_stats(work: Path, records_in: int, trajectories: int, quarantined: int) -> dict:
    stats = {"records_in": records_in, "trajectories": trajectories, "quarantined": quarantined}
    write_stats(work, "ingest", stats)
    return stats


def classify_stats(work: Path, n_in: int, usage: Usage) -> dict:
    stats = {"in": n_in, "usage": vars(usage).copy()}
    write_stats(work, "classify", stats)
    return stats


def save_filtered(stage: str, out: schema.StageOutput, work: Path, n_in: int, usage: Usage) -> dict:
    write_table(out.kept, Path(work) / TABLES[KEPT[stage]])
    write_table(out.rejected, Path(work) / TABLES[f"{stage}_rejected"])
    return filtered_stats(stage, work, n_in, out.kept.height, out.rejected.height, usage)


def filtered_stats(stage: str, work: Path, n_in: int, n_out: int, n_rejected: int, usage: Usage) -> dict:
    stats = {"in": n_in, "out": n_out, "rejected": n_rejected, "usage": vars(usage).copy()}
    write_stats(work, stage, stats)
    return stats


# -- the stages, file to file: the non-LLM-bound ones stream batch by batch -------------------------
def stage_ingest(params: dict, work: Path) -> dict:
    p = params["ingest"]
    logs = read_logs(p["input"], fmt=p["format"], mapping=MessagesMapping.from_params(p.get("messages") or {}),
                     limit=p["limit"], max_trajectory_mb=p.get("max_trajectory_mb"))
    size = batch_rows(params)
    rows: list[dict] = []
    bad: list[dict] = []
    with (TableWriter(Path(work) / TABLES["trajectories"], schema.TRAJECTORY) as good,
          TableWriter(Path(work) / TABLES["quarantine"], schema.QUARANTINE) as quarantine):
        for item in logs:
            if isinstance(item, Quarantined):
                bad.append(item.row())
            else:
                rows.append(item)
            if len(rows) >= size:
                good.write_rows(rows)
                rows = []
            if len(bad) >= size:
                quarantine.write_rows(bad)
                bad = []
        good.write_rows(rows)
        quarantine.write_rows(bad)
    return ingest_stats(work, good.rows + quarantine.rows, good.rows, quarantine.rows)


def stage_classify(params: dict, work: Path, llms: LLMs) -> dict:
    llm = llms.main() if params["classify"]["mode"] == "llm" else None
    with TableWriter(Path(work) / TABLES["classified"], schema.CLASSIFIED) as out:
        for batch in read_batches(work, "trajectories", schema.TRAJECTORY, params):
            out.write(classify(batch, params, llm))
    return classify_stats(work, out.rows, _usage(llms, "classify"))


def stage_extract(params: dict, work: Path, llms: LLMs) -> dict:
    llm = llms.main() if params["extract"]["mode"] == "llm" else None
    n_failures = 0
    with (TableWriter(Path(work) / TABLES["extracted"], schema.EXTRACTED) as kept,
          TableWriter(Path(work) / TABLES["extract_rejected"], schema.REJECTION) as rejected):
        for batch in read_batches(work, "classified", schema.CLASSIFIED, params):
            n_failures += int(batch["is_failure"].sum())
            out = extract(batch, params, llm)
            kept.write(out.kept)
            rejected.write(out.rejected)
    return filtered_stats("extract", work, n_failures, kept.rows, rejected.rows, _usage(llms, "extract"))


def stage_relabel(params: dict, work: Path, llms: LLMs) -> dict:
    extracted = read_table(work, "extracted", schema.EXTRACTED, params)
    if extracted.height:
        out = relabel(extracted, params, llms.main())
    else:  # nothing to relabel: no LLM is started at all
        out = schema.StageOutput(schema.empty(schema.RELABELED), schema.empty(schema.REJECTION))
    return save_filtered("relabel", out, work, extracted.height, _usage(llms, "relabel"))


def stage_verify(params: dict, work: Path, llms: LLMs) -> dict:
    relabeled = read_table(work, "relabeled", schema.RELABELED, params)
    if relabeled.height:
        out = verify(relabeled, params, llms.main(), llms.judge())
    else:
        out = schema.StageOutput(schema.empty(schema.VERIFIED), schema.empty(schema.REJECTION))
    return save_filtered("verify", out, work, relabeled.height, _usage(llms, "verify"))


def stage_package(params: dict, work: Path, out_dir: Path, llms: LLMs) -> dict:
    from agenther.stages.summary import package_run  # the last stage: exports, summary, card

    return package_run(params, Path(work), Path(out_dir), llms)


def run_stage(name: str, params: dict, work: Path, out_dir: Path, llms: LLMs) -> dict:
    """Run one stage, unless it is up to date (its stamp matches: see `unchanged_stage`)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    work, out_dir = Path(work), Path(out_dir)
    done = unchanged_stage(name, params, work, out_dir)
    if done is not None:
        return done
    unstamp(work, name)  # a stage stopped half-way leaves no stamp: its rerun runs it again
    if name == "ingest":
        result = stage_ingest(params, work)
    elif name == "package":
        result = stage_package(params, work, out_dir, llms)
    else:
        result = {"classify": stage_classify, "extract": stage_extract, "relabel": stage_relabel,
                  "verify": stage_verify}[name](params, work, llms)
    stamp_stage(name, params, work, out_dir)
    return result


# -- relabel + verify in one pass (agenther run) ------------------------------------------------------
def stage_relabel_verify(params: dict, work: Path, llms: LLMs) -> dict:
    """stage_relabel then stage_verify as one concurrent map over the records
    (agenther.stages.verify.relabel_verify): each record is judged as soon as its relabel passes,
    instead of every judge waiting for the slowest relabel of the table. Writes the tables,
    stats, stamps and gate results the two stages write one after the other; the relabeled
    table passes verify's input gate before any verify output is written (its judges have
    been asked by then: a failed gate stops the run with their answers only in the LLM cache).
    Returns {"relabel": stats, "verify": stats}."""
    from agenther.stages.verify import relabel_verify

    work = Path(work)
    done = unchanged_stage("relabel", params, work)
    if done is not None:
        return {"relabel": done, "verify": run_stage("verify", params, work, work, llms)}
    extracted = read_table(work, "extracted", schema.EXTRACTED, params)
    unstamp(work, "relabel", "verify")
    if extracted.height:
        llm, concurrency = llms.main(), int(params["llm"]["concurrency"])
        # Two records per request slot when every call waits for the run's in-flight limit
        # (llm.concurrency requests open at most, whatever the number of threads).
        shared = llm.inflight is not None and llm.inflight is llms.inflight and concurrency > 1
        relabeled, verified = relabel_verify(extracted, params, llm, llms.judge,
                                             workers=2 * concurrency if shared else concurrency)
    else:  # nothing to relabel: no LLM is started at all
        relabeled = schema.StageOutput(schema.empty(schema.RELABELED), schema.empty(schema.REJECTION))
        verified = schema.StageOutput(schema.empty(schema.VERIFIED), schema.empty(schema.REJECTION))
    stats = {"relabel": save_filtered("relabel", relabeled, work, extracted.height, _usage(llms, "relabel"))}
    stamp_stage("relabel", params, work)
    gate_table(work, "relabeled", schema.RELABELED, params)
    stats["verify"] = save_filtered("verify", verified, work, relabeled.kept.height, _usage(llms, "verify"))
    stamp_stage("verify", params, work)
    return stats


