"""The stages as file-to-file steps: each reads its upstream Parquet tables from a work
folder and writes its own. The CLI (`agenther run`, `agenther stage`), `dvc repro` and
the Prefect flow all run these, so there is one implementation of each stage.

Every stage also writes `NN_<stage>.json`: what the summary needs from it (counts,
LLM usage), so the package stage can summarize a run whose stages ran in other processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from agenther import gates, schema
from agenther.adapters.common import Quarantined
from agenther.classify import classify
from agenther.extract import extract
from agenther.ingest import MessagesMapping, read_logs
from agenther.llm import Usage
from agenther.providers import LLMs
from agenther.relabel import relabel
from agenther.tables import TableWriter, batch_rows, file_digest, iter_batches, write_text_atomic
from agenther.verify import verify

STAGES = ("ingest", "classify", "extract", "relabel", "verify", "package")

TABLES = {
    "trajectories": "00_trajectories.parquet",
    "quarantine": "quarantine.parquet",
    "classified": "01_classified.parquet",
    "extracted": "02_extracted.parquet",
    "extract_rejected": "02_extract_rejected.parquet",
    "relabeled": "03_relabeled.parquet",
    "relabel_rejected": "03_relabel_rejected.parquet",
    "verified": "04_verified.parquet",
    "verify_rejected": "04_verify_rejected.parquet",
}
STATS = {"ingest": "00_ingest.json", "classify": "01_classify.json", "extract": "02_extract.json",
         "relabel": "03_relabel.json", "verify": "04_verify.json"}


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


def _write_stats(work: Path, stage: str, stats: dict) -> None:
    write_text_atomic(Path(work) / STATS[stage], json.dumps(stats, indent=2, sort_keys=True) + "\n")


def read_stats(work: Path, stage: str) -> dict:
    return json.loads((Path(work) / STATS[stage]).read_text())


KEPT = {"extract": "extracted", "relabel": "relabeled", "verify": "verified"}  # each filter's kept table


def _usage(llms: LLMs, stage: str) -> Usage:
    return llms.usage().get(stage, Usage())


# -- a stage's stats: shared with the Prefect tasks, which compute the stages in batches --------
def ingest_stats(work: Path, records_in: int, trajectories: int, quarantined: int) -> dict:
    stats = {"records_in": records_in, "trajectories": trajectories, "quarantined": quarantined}
    _write_stats(work, "ingest", stats)
    return stats


def classify_stats(work: Path, n_in: int, usage: Usage) -> dict:
    stats = {"in": n_in, "usage": vars(usage).copy()}
    _write_stats(work, "classify", stats)
    return stats


def save_filtered(stage: str, out: schema.StageOutput, work: Path, n_in: int, usage: Usage) -> dict:
    write_table(out.kept, Path(work) / TABLES[KEPT[stage]])
    write_table(out.rejected, Path(work) / TABLES[f"{stage}_rejected"])
    return filtered_stats(stage, work, n_in, out.kept.height, out.rejected.height, usage)


def filtered_stats(stage: str, work: Path, n_in: int, n_out: int, n_rejected: int, usage: Usage) -> dict:
    stats = {"in": n_in, "out": n_out, "rejected": n_rejected, "usage": vars(usage).copy()}
    _write_stats(work, stage, stats)
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
    done = unchanged_stage("relabel", params, work)  # inputs, params, code and outputs as stamped
    if done is not None:
        return done
    extracted = read_table(work, "extracted", schema.EXTRACTED, params)
    unstamp(work, "relabel")
    if extracted.height:
        out = relabel(extracted, params, llms.main())
    else:  # nothing to relabel: no LLM is started at all
        out = schema.StageOutput(schema.empty(schema.RELABELED), schema.empty(schema.REJECTION))
    stats = save_filtered("relabel", out, work, extracted.height, _usage(llms, "relabel"))
    stamp_stage("relabel", params, work)
    return stats


def stage_verify(params: dict, work: Path, llms: LLMs) -> dict:
    done = unchanged_stage("verify", params, work)
    if done is not None:
        return done
    relabeled = read_table(work, "relabeled", schema.RELABELED, params)
    unstamp(work, "verify")
    if relabeled.height:
        out = verify(relabeled, params, llms.main(), llms.judge())
    else:
        out = schema.StageOutput(schema.empty(schema.VERIFIED), schema.empty(schema.REJECTION))
    stats = save_filtered("verify", out, work, relabeled.height, _usage(llms, "verify"))
    stamp_stage("verify", params, work)
    return stats


def stage_package(params: dict, work: Path, out_dir: Path, llms: LLMs) -> dict:
    from agenther.summary import package_run  # the last stage: exports, summary, card

    return package_run(params, Path(work), Path(out_dir), llms)


def run_stage(name: str, params: dict, work: Path, out_dir: Path, llms: LLMs) -> dict:
    if name == "ingest":
        return stage_ingest(params, work)
    if name == "package":
        return stage_package(params, work, out_dir, llms)
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return {"classify": stage_classify, "extract": stage_extract, "relabel": stage_relabel,
            "verify": stage_verify}[name](params, work, llms)


# -- relabel + verify in one pass (agenther run) ------------------------------------------------------
def stage_relabel_verify(params: dict, work: Path, llms: LLMs) -> dict:
    """stage_relabel then stage_verify as one concurrent map over the records
    (agenther.verify.relabel_verify): each record is judged as soon as its relabel passes,
    instead of every judge waiting for the slowest relabel of the table. Writes the tables,
    stats, stamps and gate results the two stages write one after the other; the relabeled
    table passes verify's input gate before any verify output is written (its judges have
    been asked by then: a failed gate stops the run with their answers only in the LLM cache).
    Returns {"relabel": stats, "verify": stats}."""
    from agenther.verify import relabel_verify

    work = Path(work)
    done = unchanged_stage("relabel", params, work)
    if done is not None:
        return {"relabel": done, "verify": stage_verify(params, work, llms)}
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


# -- skipping an LLM stage whose inputs, params, code and outputs are unchanged -----------------------
# Like `dvc repro` for a stage that is up to date: a rerun in the same work folder reads no
# table, runs no gate and asks no LLM (not even its cache) when the stage's stamp
# (<work>/stamps/<stage>.json, written when the stage ran to the end) still matches: the
# sha256 of its input table (which passed the stage's input gate when it ran), of the whole
# params, of agenther's code and prompts, and of its output tables. A stage that left records
# undone for a spent budget is never stamped: its rerun must try them again.
STAMPED = {"relabel": ("extracted", ("relabeled", "relabel_rejected")),
           "verify": ("relabeled", ("verified", "verify_rejected"))}
_CODE_DIGEST: list[str] = []


def code_digest() -> str:
    """sha256 of agenther's source and prompt files and the versions of litellm and polars
    (computed once per process: code does not change under a running process)."""
    if not _CODE_DIGEST:
        import hashlib
        from importlib.metadata import version

        root = Path(__file__).resolve().parent
        h = hashlib.sha256(f"litellm {version('litellm')} polars {pl.__version__}".encode())
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".txt") and p.is_file()):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_DIGEST.append(h.hexdigest())
    return _CODE_DIGEST[0]


def _stamp_path(work: Path, stage: str) -> Path:
    return Path(work) / "stamps" / f"{stage}.json"


def _stamp(stage: str, params: dict, work: Path) -> dict:
    import hashlib

    return {"stage": stage, "code": code_digest(),
            "params": hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest(),
            "input": file_digest(Path(work) / TABLES[STAMPED[stage][0]])}


def unstamp(work: Path, *stages: str) -> None:
    """Before a stage rewrites its outputs: a run that dies half-way leaves no stamp."""
    for stage in stages:
        _stamp_path(work, stage).unlink(missing_ok=True)


def stamp_stage(stage: str, params: dict, work: Path) -> None:
    """Record that the stage ran to the end on its current inputs (see STAMPED)."""
    from agenther.llm import BUDGET_EXHAUSTED

    work = Path(work)
    rejected = pl.read_parquet(work / TABLES[f"{stage}_rejected"], columns=["reason"])["reason"]
    if (rejected == BUDGET_EXHAUSTED).any():
        return
    entry = {"stamp": _stamp(stage, params, work),
             "outputs": {name: file_digest(work / TABLES[name]) for name in STAMPED[stage][1]},
             "stats": read_stats(work, stage)}
    path = _stamp_path(work, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def unchanged_stage(stage: str, params: dict, work: Path) -> dict | None:
    """The stage's stats when its stamp still matches (the stage is then skipped: its stats
    file says `"unchanged": true` and zero LLM usage, as nothing was asked); None otherwise."""
    work = Path(work)
    try:
        saved = json.loads(_stamp_path(work, stage).read_text())
        if saved["stamp"] != _stamp(stage, params, work):
            return None
        if any(file_digest(work / TABLES[name]) != digest for name, digest in saved["outputs"].items()):
            return None
        stats = {key: saved["stats"][key] for key in ("in", "out", "rejected")}
    except (OSError, ValueError, KeyError, TypeError):  # no stamp, no input or output table, a bad stamp
        return None
    stats |= {"usage": vars(Usage()).copy(), "unchanged": True}
    _write_stats(work, stage, stats)
    return stats
