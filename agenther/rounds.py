"""Incremental rounds: new logs processed on their own, published as one growing dataset.

Users rerun on a growing pile of logs (a watch trigger, a schedule, `dvc repro` on a grown
data/incoming). A round processes only what no earlier round of its lineage processed:

    <root>/<lineage>/manifest.json      the rounds: counts, when, input, the files each read
                   /round-0001/         a run folder of the round's new trajectories only: the
                   /round-0002/ ...     stage tables and stats, the round's own exports and summary
                   /published/          the union of every round, packaged as one run (+ manifest.json)

- A **lineage** is what produces the data (agenther/lineage.py: the params hash without the input's
  path and limit, and the prompts' hashes): rounds never mix data made by different settings.
- A round reads only the input files that are new or changed since the rounds before
  (path and sha256); of what they hold, a trajectory already processed (same id and the same
  content digest) or a record already quarantined is skipped and counted. The new
  trajectories go through classify .. package in the round's folder by the one stage loop
  (agenther/runner.py run_stages). Nothing new: no round.
- **Published** (agenther/publish.py) = the package stage over the concatenation of every round's
  tables: the union holds the same samples as a single run on all the logs.
- Counts reconcile per round: records read = new trajectories + quarantined + dropped repeats
  + skipped as seen; the round's and the published summary.json check the stages as every run does.

Rounds of one lineage run one at a time (a lock file in the lineage folder): two triggers at
once give two rounds one after the other, never two round-0003. A round that stops half-way
(Ctrl-C, a crash) leaves its folder without a manifest entry; the next round reuses that folder
and its stamped stages are skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

import agenther
from agenther import schema
from agenther.adapters import LogFile, log_input
from agenther.lineage import MANIFEST, PUBLISHED, lineage_of, locked, read_manifest, round_name
from agenther.llm import LLMs
from agenther.params import Params
from agenther.publish import publish
from agenther.runner import LOCAL, LocalExecutor, run_stages
from agenther.stages import PIPELINE
from agenther.stages.ingest import IngestError, content_digest, write_tables
from agenther.tables import TableWriter, iter_batches
from agenther.workdir import TABLES, log_file_version, write_stats, write_text_atomic

SEEN = "seen.parquet"  # per round: (id, digest) of the trajectories it processed
SEEN_SCHEMA = {"id": pl.String, "digest": pl.String}
# The stages a round runs on its new trajectories (ingest is the round's own: only new files, then
# only unseen records).
ROUND_STAGES = tuple(s.name for s in PIPELINE if s.reads)


# -- which files and records are new ---------------------------------------------------------------
def _file_id(f: LogFile | str) -> str:
    """A log file's name across rounds: an object's s3:// URL, a local file's absolute path."""
    return str(f) if str(f).startswith("s3://") else str(Path(f).resolve())


def _quarantine_key(row: dict) -> str:
    return json.dumps([_file_id(row["source_file"]), row["record_pointer"], row["reason"]])


# -- a round ----------------------------------------------------------------------------------------
@dataclass
class RoundResult:
    lineage: str
    folder: Path  # the lineage's folder
    round: int | None  # None: nothing new, no round
    message: str
    entry: dict = field(default_factory=dict)  # the round's manifest entry
    summary: dict | None = None  # the round's own package summary
    published: dict | None = None  # the union's summary

    @property
    def round_dir(self) -> Path | None:
        return self.folder / round_name(self.round) if self.round else None

    @property
    def reconciled(self) -> bool:
        return self.round is None or bool(self.entry.get("reconciled"))


def run_round(params: Params, root: str | Path, llms: LLMs, executor: LocalExecutor = LOCAL,
              fuse: bool = False) -> RoundResult:
    """One round on `params.ingest.input` under `root` (see the module docstring)."""
    source = params.ingest.input
    if not log_input(source).exists:  # before any folder is made for it
        raise IngestError(f"input not found: {source}")
    lineage = lineage_of(params)
    folder = Path(root) / lineage["id"]
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        return _round(params, folder, lineage, llms, executor, fuse)


def _round(params: Params, folder: Path, lineage: dict, llms: LLMs, executor: LocalExecutor, fuse: bool) -> RoundResult:
    manifest = read_manifest(folder) or {
        "lineage": lineage["id"], "params_hash": lineage["params_hash"], "prompt_hashes": lineage["prompt_hashes"],
        "agenther_version": agenther.__version__, "created": _now(), "rounds": []}
    rounds = manifest["rounds"]
    number = len(rounds) + 1
    work = folder / round_name(number)
    started, started_at = time.monotonic(), _now()

    source = params.ingest.input
    known = {path: digest for r in rounds for path, digest in r["files"].items()}
    digests = {f: log_file_version(f) for f in log_input(source).files}
    if not digests:
        raise IngestError(f"{source}: no .json or .jsonl files under it")
    todo = [f for f, d in digests.items() if known.get(_file_id(f)) != d]
    if not todo:
        return RoundResult(lineage["id"], folder, None, f"no new or changed log files in {source} "
                           f"({len(digests)} files, all read by rounds 1-{len(rounds)}): no new round")

    # Ingest the new and changed files into a scratch folder, then keep what no round has seen.
    scratch = work / "ingest"
    shutil.rmtree(scratch, ignore_errors=True)
    ingested = write_tables(params, scratch, files=todo, spread=executor.spread_for("ingest"))  # parts on the executor
    seen = _seen(folder, rounds)
    seen_quarantine = {_quarantine_key(r) for r in rounds_rows(folder, rounds, "quarantine")}
    new, skipped = 0, 0
    batch = params.io.batch_rows
    with (TableWriter(work / TABLES["trajectories"], schema.TRAJECTORY) as kept,
          TableWriter(work / SEEN, SEEN_SCHEMA) as keys):
        for frame in iter_batches(scratch / TABLES["trajectories"], batch):
            rows = frame.to_dicts()
            digests_now = [content_digest(r) for r in rows]
            fresh = [i for i, (r, d) in enumerate(zip(rows, digests_now, strict=True)) if (r["id"], d) not in seen]
            skipped += len(rows) - len(fresh)
            new += len(fresh)
            kept.write(frame[fresh])
            keys.write_rows([{"id": rows[i]["id"], "digest": digests_now[i]} for i in fresh])
    quarantine = pl.read_parquet(scratch / TABLES["quarantine"])
    fresh_q = [i for i, r in enumerate(quarantine.to_dicts()) if _quarantine_key(r) not in seen_quarantine]
    skipped_q = quarantine.height - len(fresh_q)
    with TableWriter(work / TABLES["quarantine"], schema.QUARANTINE) as q:
        q.write(quarantine[fresh_q])
    shutil.rmtree(scratch)
    if new == 0:
        shutil.rmtree(work)
        return RoundResult(lineage["id"], folder, None,
                           f"no new trajectories in {len(todo)} new or changed files of {source} "
                           f"({skipped} already processed, {skipped_q} already quarantined): no new round")

    limited = params.ingest.limit is not None  # a limited read may stop inside a file: not all of it read
    # The stages' view of ingest: what reached them (so their summary reconciles as every run's does);
    # the records skipped as seen are counted beside it.
    write_stats(work, "ingest", {
        **{k: v for k, v in ingested.items() if k not in ("records_in", "trajectories", "quarantined")},
        "records_in": new + len(fresh_q) + ingested["duplicates"], "trajectories": new, "quarantined": len(fresh_q),
        "records_read": ingested["records_in"], "skipped_seen": skipped + skipped_q,
        "files_read": len(todo), "files_unchanged": len(digests) - len(todo)})
    stages = run_stages(ROUND_STAGES, params, work, work, llms, executor, fuse=fuse)
    summary = stages["package"]
    published = publish(params, folder, [*rounds, {"round": number}], llms)

    counts = {"records_read": ingested["records_in"], "new_trajectories": new, "skipped_seen": skipped + skipped_q,
              "quarantined": len(fresh_q), "duplicates": ingested["duplicates"],
              "failures": summary["stages"]["classify"]["failures"],
              "accepted": summary["gates"]["passed_judges"],
              "hindsight_samples": summary["gates"]["exported_hindsight_samples"],
              "llm_calls": summary["llm"]["total"]["calls"]}
    checks = {
        "records read = new + quarantined + repeats + skipped as seen":
            counts["records_read"] == new + len(fresh_q) + ingested["duplicates"] + skipped + skipped_q,
        "round: stages reconcile": summary["reconciliation"]["ok"],
        "published: stages reconcile": published["reconciliation"]["ok"],
    }
    entry = {
        "round": number, "started": started_at, "finished": _now(), "seconds": round(time.monotonic() - started, 3),
        "input": str(source), "files": {_file_id(f): digests[f] for f in todo} if not limited else {},
        "params_hash": summary["lineage"]["params_hash"], "counts": counts,
        "published": {"hindsight_samples": published["gates"]["exported_hindsight_samples"],
                      **{k: published["exports"][k] for k in ("sft", "dpo", "sharegpt")}},
        "checks": checks, "reconciled": all(checks.values()),
    }
    manifest["rounds"] = [*rounds, entry]
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_text_atomic(folder / PUBLISHED / MANIFEST, text)  # the union says which rounds it holds (pushed with it)
    write_text_atomic(folder / MANIFEST, text)  # last: the round counts once it is in the lineage's manifest
    return RoundResult(lineage["id"], folder, number,
                       f"round {number}: {new} new trajectories ({skipped + skipped_q} skipped as seen), "
                       f"{counts['hindsight_samples']} hindsight samples; published: "
                       f"{entry['published']['hindsight_samples']} hindsight samples over {number} rounds",
                       entry, summary, published)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _seen(folder: Path, rounds: list[dict]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for r in rounds:
        path = folder / round_name(r["round"]) / SEEN
        found |= set(pl.read_parquet(path).iter_rows())
    return found


def rounds_rows(folder: Path, rounds: list[dict], table: str) -> list[dict]:
    """A small table (quarantine) of every round, as rows."""
    frames = [pl.read_parquet(p) for r in rounds if (p := folder / round_name(r["round"]) / TABLES[table]).exists()]
    return pl.concat(frames).to_dicts() if frames else []


# -- pushing --------------------------------------------------------------------------------------
def push_targets(result: RoundResult, push_url: str) -> list[tuple[Path, str]]:
    """(local folder, S3 URL) pairs a round's outputs go to: the round under
    <push_url>/<lineage>/round-NNNN, the union under <push_url>/<lineage>/published, the manifest beside."""
    if result.round is None:
        return []
    base = f"{push_url.rstrip('/')}/{result.lineage}"
    return [(result.round_dir, f"{base}/{round_name(result.round)}"), (result.folder / PUBLISHED, f"{base}/{PUBLISHED}")]


