"""The stages as file-to-file steps: each reads its upstream Parquet tables from a work
folder and writes its own. The CLI (`agenther run`, `agenther stage`), `dvc repro` and
the Prefect flow all run these, so there is one implementation of each stage.

Every stage also writes `NN_<stage>.json`: what the summary needs from it (counts,
LLM usage), so the package stage can summarize a run whose stages ran in other processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from agenther import gates, schema
from agenther.classify import classify
from agenther.extract import extract
from agenther.ingest import IngestResult, MessagesMapping, ingest
from agenther.llm import Usage
from agenther.providers import LLMs
from agenther.relabel import relabel
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


def read_table(work: Path, name: str, contract: dict, params: dict) -> pl.DataFrame:
    """Read a table for the next stage. A gated table (gates.CONTRACTS) first passes its
    Great Expectations gate: on failure GateFailed stops the run here, before the next stage
    writes anything; the result is kept in <work>/gates/<name>.json either way."""
    path = Path(work) / TABLES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    df = pl.read_parquet(path)
    if name in gates.CONTRACTS:
        results = Path(work) / "gates"
        if gates.gate_params(params)["enabled"]:
            # Before validate_columns: the gate checks the contract too, and this way a missing
            # column is reported (and recorded) by the gate like every other broken expectation.
            gates.check(df, name, params, results, source=str(path))
        else:
            (results / f"{name}.json").unlink(missing_ok=True)  # no stale verdict from an earlier run
    schema.validate_columns(df, contract, str(path))
    return df


def _write_stats(work: Path, stage: str, stats: dict) -> None:
    (Path(work) / STATS[stage]).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def read_stats(work: Path, stage: str) -> dict:
    return json.loads((Path(work) / STATS[stage]).read_text())


KEPT = {"extract": "extracted", "relabel": "relabeled", "verify": "verified"}  # each filter's kept table


def _usage(llms: LLMs, stage: str) -> Usage:
    return llms.usage().get(stage, Usage())


# -- writing a stage's results: shared with the Prefect tasks, which compute them in batches --
def save_ingest(result: IngestResult, work: Path) -> dict:
    write_table(result.trajectories, Path(work) / TABLES["trajectories"])
    write_table(result.quarantine, Path(work) / TABLES["quarantine"])
    stats = {"records_in": result.records_in, "trajectories": result.trajectories.height,
             "quarantined": result.quarantine.height}
    _write_stats(work, "ingest", stats)
    return stats


def save_classified(classified: pl.DataFrame, work: Path, n_in: int, usage: Usage) -> dict:
    write_table(classified, Path(work) / TABLES["classified"])
    stats = {"in": n_in, "usage": vars(usage).copy()}
    _write_stats(work, "classify", stats)
    return stats


def save_filtered(stage: str, out: schema.StageOutput, work: Path, n_in: int, usage: Usage) -> dict:
    write_table(out.kept, Path(work) / TABLES[KEPT[stage]])
    write_table(out.rejected, Path(work) / TABLES[f"{stage}_rejected"])
    stats = {"in": n_in, "out": out.kept.height, "rejected": out.rejected.height, "usage": vars(usage).copy()}
    _write_stats(work, stage, stats)
    return stats


# -- the stages, file to file ----------------------------------------------------------------------
def ingest_input(params: dict) -> IngestResult:
    p = params["ingest"]
    return ingest(p["input"], fmt=p["format"], mapping=MessagesMapping.from_params(p.get("messages") or {}),
                  limit=p["limit"])


def stage_ingest(params: dict, work: Path) -> dict:
    return save_ingest(ingest_input(params), work)


def stage_classify(params: dict, work: Path, llms: LLMs) -> dict:
    trajectories = read_table(work, "trajectories", schema.TRAJECTORY, params)
    llm = llms.main() if params["classify"]["mode"] == "llm" else None
    return save_classified(classify(trajectories, params, llm), work, trajectories.height, _usage(llms, "classify"))


def stage_extract(params: dict, work: Path, llms: LLMs) -> dict:
    classified = read_table(work, "classified", schema.CLASSIFIED, params)
    llm = llms.main() if params["extract"]["mode"] == "llm" else None
    out = extract(classified, params, llm)
    return save_filtered("extract", out, work, int(classified["is_failure"].sum()), _usage(llms, "extract"))


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
