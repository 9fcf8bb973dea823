"""The work folder of a run: what each stage's files are called, the stages' stats files, and
the stamps that let a rerun skip a stage that is up to date.

Standard library only (and agenther.llm's light names): a rerun on which every stage is up to
date (agenther/pipeline.py checks with `unchanged_stage` before importing the stages) reads
stamps and digests files, and imports neither the stages' libraries (polars, pyarrow) nor
Great Expectations, litellm or Prefect.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from agenther.llm import BUDGET_EXHAUSTED, Usage
from agenther.params import Params
from agenther.stages import NAMES, PIPELINE

STAGES = NAMES  # the stages in pipeline order (their records: agenther/stages/__init__.py)

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
STATS = {s.name: s.stats for s in PIPELINE if s.stats}  # every stage's but package's (summary.json)


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file (stats, summary, card, stamp) through a temporary file renamed
    into place: a run stopped at any moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_stats(work: Path, stage: str, stats: dict) -> None:
    write_text_atomic(Path(work) / STATS[stage], json.dumps(stats, indent=2, sort_keys=True) + "\n")


def read_stats(work: Path, stage: str) -> dict:
    return json.loads((Path(work) / STATS[stage]).read_text())


# -- skipping a stage whose inputs, params, code and outputs are unchanged ----------------------------
# Like `dvc repro` for a stage that is up to date: a rerun in the same work folder reads no
# table, runs no gate and asks no LLM (not even its cache) when the stage's stamp
# (<work>/stamps/<stage>.json, written when the stage ran to the end) still matches: the
# sha256 of its inputs (tables that passed the stage's input gate when it ran; for ingest, the
# log files), of the whole params, of agenther's code and prompts, and of its outputs. So a
# rerun on which every stage is up to date imports neither Great Expectations nor litellm.
# A stage that left records undone for a spent budget is never stamped: its rerun must try
# them again.
STAMPED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # stage: (input tables, output tables)
    s.name: (s.reads, s.writes) for s in PIPELINE}
# What package may write into its output folder (agenther/stages/package.py package_run; the export
# layout is agenther.export.files.LAYOUT, checked equal by tests/test_exports.py). An export with no
# rows is not written: a stamp digests the files that are there (a pattern: the files matching it).
PACKAGE_FILES = ("sft.jsonl", "dpo.jsonl", "sharegpt.jsonl", "openai/sft.jsonl", "trl/sft.jsonl", "trl/dpo.jsonl",
                 "llamafactory/hindsight.jsonl", "llamafactory/success.jsonl", "llamafactory/dataset_info.json",
                 "hf/data/hindsight-*.parquet", "hf/data/success-*.parquet", "hf/data/preference-*.parquet",
                 "hf/README.md", "rejected.parquet", "summary.json", "dataset_card.md", "report.html")
# Stats entries that say how a stage ran this time, not what it produced: not part of a stamp.
RUN_ONLY_STATS = ("usage", "unchanged", "budget_carried_in", "seconds")
_CODE_DIGEST: list[str] = []


def code_digest() -> str:
    """sha256 of agenther's source and prompt files and the versions of litellm and polars
    (computed once per process: code does not change under a running process)."""
    if not _CODE_DIGEST:
        from importlib.metadata import version

        root = Path(__file__).resolve().parent
        h = hashlib.sha256(f"litellm {version('litellm')} polars {version('polars')}".encode())
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".txt") and p.is_file()):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_DIGEST.append(h.hexdigest())
    return _CODE_DIGEST[0]


def logs_digest(params: Params) -> str:
    """sha256 of the log files ingest reads: their names under the input and their bytes; for
    S3 objects their ETags and sizes (reading every object back to digest it would cost a
    download per rerun, and a new upload gets a new ETag)."""
    from agenther.adapters import log_input

    found = log_input(params.ingest.input)
    h = hashlib.sha256()
    for f in found.files:
        h.update(f"{found.name_of(f)}\0{log_file_version(f)}\0".encode())
    return h.hexdigest()


def log_file_version(f: Any) -> str:
    """What changes when a log file does: a local file's sha256, an S3 object's ETag and size."""
    return file_digest(f) if isinstance(f, Path) else f.signature


def _stamp_path(work: Path, stage: str) -> Path:
    return Path(work) / "stamps" / f"{stage}.json"


def _counts(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in RUN_ONLY_STATS}


def _outputs(stage: str, work: Path, out_dir: Path) -> dict[str, Path]:
    if stage == "package":
        return {str(path.relative_to(out_dir)): path for name in PACKAGE_FILES
                for path in sorted(Path(out_dir).glob(name)) if path.is_file()}
    return {name: Path(work) / TABLES[name] for name in STAMPED[stage][1]}


def _stamp(stage: str, params: Params, work: Path, out_dir: Path) -> dict:
    work = Path(work)
    stamp = {"stage": stage, "code": code_digest(),
             "params": hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest(),
             "inputs": {name: file_digest(work / TABLES[name]) for name in STAMPED[stage][0]}}
    if stage == "ingest":
        stamp["inputs"]["logs"] = logs_digest(params)
    if stage == "package":  # it also reads the earlier stages' counts, and writes to out_dir
        stamp["inputs"]["counts"] = {s: _counts(read_stats(work, s)) for s in STATS}
        stamp["out"] = str(Path(out_dir).resolve())
    return stamp


def unstamp(work: Path, *stages: str) -> None:
    """Before a stage rewrites its outputs: a run that dies half-way leaves no stamp."""
    for stage in stages:
        _stamp_path(work, stage).unlink(missing_ok=True)


def _left_undone(stage: str, work: Path) -> bool:
    """The stage left records undone for a spent LLM budget (its rerun must try them again)."""
    if stage in STATS and (read_stats(work, stage).get("usage") or {}).get("budget_refused"):
        return True
    rejected = f"{stage}_rejected"
    if rejected not in TABLES:
        return False
    import polars as pl  # loaded by then: the stage has just run

    return bool((pl.read_parquet(Path(work) / TABLES[rejected], columns=["reason"])["reason"]
                 == BUDGET_EXHAUSTED).any())


def stamp_stage(stage: str, params: Params, work: Path, out_dir: Path | None = None) -> None:
    """Record that the stage ran to the end on its current inputs (see STAMPED)."""
    work = Path(work)
    out_dir = Path(out_dir) if out_dir is not None else work
    if _left_undone(stage, work):
        return
    entry = {"stamp": _stamp(stage, params, work, out_dir),
             "outputs": {name: file_digest(path) for name, path in _outputs(stage, work, out_dir).items()},
             "stats": read_stats(work, stage) if stage in STATS else {}}
    path = _stamp_path(work, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(entry, indent=2, sort_keys=True) + "\n")


def unchanged_stage(stage: str, params: Params, work: Path, out_dir: Path | None = None) -> dict | None:
    """What the stage returns when its stamp still matches (it is then skipped); None otherwise.
    A skipped stage's stats file says `"unchanged": true` and zero LLM usage, as nothing was
    asked; a skipped package returns the summary.json it wrote, with `"unchanged": true`."""
    work = Path(work)
    out_dir = Path(out_dir) if out_dir is not None else work
    try:
        saved = json.loads(_stamp_path(work, stage).read_text())
        if saved["stamp"] != _stamp(stage, params, work, out_dir):
            return None
        outputs = _outputs(stage, work, out_dir)
        if saved["outputs"].keys() != outputs.keys() or any(
                file_digest(path) != saved["outputs"][name] for name, path in outputs.items()):
            return None
        if stage == "package":
            return json.loads((out_dir / "summary.json").read_text()) | {"unchanged": True}
        stats = _counts(saved["stats"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no stamp or file, a bad stamp
        return None
    if "usage" in saved["stats"]:
        stats["usage"] = vars(Usage()).copy()
    stats["unchanged"] = True
    write_stats(work, stage, stats)
    return stats
