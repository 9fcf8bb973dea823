"""Incremental rounds: new logs processed on their own, published as one growing dataset.

Users rerun on a growing pile of logs (a watch trigger, a schedule, `dvc repro` on a grown
data/incoming). A round processes only what no earlier round of its lineage processed:

    <root>/<lineage>/manifest.json      the rounds: counts, when, input, the files each read
                   /round-0001/         a run folder of the round's new trajectories only: the
                   /round-0002/ ...     stage tables and stats, the round's own exports and summary
                   /published/          the union of every round, packaged as one run (+ manifest.json)

- A **lineage** is what produces the data: the params hash (without `ingest.input` and
  `ingest.limit`, which say which logs, not how they are processed) and the prompt templates'
  hashes. A change of either is another lineage, with its own folder: rounds never mix data
  made by different settings, and the old lineage stays as it was.
- A round reads only the input files that are new or changed since the rounds before
  (path and sha256); of what they hold, a trajectory already processed (same id and the same
  content digest) or a record already quarantined is skipped and counted. The new
  trajectories go through classify .. package in the round's folder by the one stage loop
  (agenther/runner.py run_stages). Nothing new: no round.
- **Published** = the package stage (agenther/stages/package.py package_run) over the
  concatenation of every round's tables: preference pairs and prompt dedup see every round, so
  the union holds the same samples as a single run on all the logs; each sample's metadata also
  says its round. A trajectory that a later round saw with other content (same id: the log was
  corrected) counts in its latest version only.
- Counts reconcile per round: records read = new trajectories + quarantined + dropped repeats
  + skipped as seen; the round's and the published summary.json check the stages as every run does.

Rounds of one lineage run one at a time (a lock file in the lineage folder): two triggers at
once give two rounds one after the other, never two round-0003. A round that stops half-way
(Ctrl-C, a crash) leaves its folder without a manifest entry; the next round reuses that folder
and its stamped stages are skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

import agenther
from agenther import prompts, schema
from agenther.adapters import LogFile, log_input
from agenther.llm import LLMs, Usage
from agenther.params import params_hash
from agenther.runner import LOCAL, LocalExecutor, ingest_tables, run_stages
from agenther.stages.ingest import IngestError, content_digest
from agenther.stages.package import package_run
from agenther.tables import TableWriter, iter_batches
from agenther.workdir import STATS, TABLES, log_file_version, read_stats, write_stats, write_text_atomic

MANIFEST = "manifest.json"
PUBLISHED = "published"
SEEN = "seen.parquet"  # per round: (id, digest) of the trajectories it processed
SEEN_SCHEMA = {"id": pl.String, "digest": pl.String}
# The stages a round runs on its new trajectories (ingest is the round's own: only new files, then
# only unseen records).
ROUND_STAGES = ("classify", "extract", "relabel", "verify", "package")
# The tables the published union concatenates (package reads these; quarantine for the counts).
UNION_TABLES = ("classified", "extracted", "extract_rejected", "relabeled", "relabel_rejected", "verified",
                "verify_rejected", "quarantine")


def round_name(number: int) -> str:
    return f"round-{number:04d}"


# -- lineage --------------------------------------------------------------------------------------
def lineage_of(params: dict) -> dict:
    """What produced the data: the params hash without the input's path and limit, and the prompts'
    hashes. Its `id` names the lineage's folder."""
    neutral = {**params, "ingest": {k: v for k, v in params["ingest"].items() if k not in ("input", "limit")}}
    hashed = params_hash(neutral)
    prompt_hashes = prompts.all_hashes()
    prompts_digest = hashlib.sha256(json.dumps(prompt_hashes, sort_keys=True).encode()).hexdigest()[:8]
    return {"id": f"{hashed}-{prompts_digest}", "params_hash": hashed, "prompt_hashes": prompt_hashes}


def _file_id(f: LogFile | str) -> str:
    """A log file's name across rounds: an object's s3:// URL, a local file's absolute path."""
    return str(f) if str(f).startswith("s3://") else str(Path(f).resolve())


def _quarantine_key(row: dict) -> str:
    return json.dumps([_file_id(row["source_file"]), row["record_pointer"], row["reason"]])


# -- the manifest ----------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def list_lineages(root: str | Path) -> list[dict]:
    """Every lineage's manifest under `root`, oldest first."""
    found = [m for d in sorted(Path(root).glob("*/")) if (m := read_manifest(d)) is not None]
    return sorted(found, key=lambda m: (m["created"], m["lineage"]))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One round of a lineage at a time: the OS releases the lock when its process dies."""
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


def run_round(params: dict, root: str | Path, llms: LLMs, executor: LocalExecutor = LOCAL,
              fuse: bool = False) -> RoundResult:
    """One round on `params["ingest"]["input"]` under `root` (see the module docstring)."""
    source = params["ingest"]["input"]
    if not log_input(source).exists:  # before any folder is made for it
        raise IngestError(f"input not found: {source}")
    lineage = lineage_of(params)
    folder = Path(root) / lineage["id"]
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        return _round(params, folder, lineage, llms, executor, fuse)


def _round(params: dict, folder: Path, lineage: dict, llms: LLMs, executor: LocalExecutor, fuse: bool) -> RoundResult:
    manifest = read_manifest(folder) or {
        "lineage": lineage["id"], "params_hash": lineage["params_hash"], "prompt_hashes": lineage["prompt_hashes"],
        "agenther_version": agenther.__version__, "created": _now(), "rounds": []}
    rounds = manifest["rounds"]
    number = len(rounds) + 1
    work = folder / round_name(number)
    started, started_at = time.monotonic(), _now()

    source = params["ingest"]["input"]
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
    ingested = ingest_tables(params, scratch, files=todo)
    seen = _seen(folder, rounds)
    seen_quarantine = {_quarantine_key(r) for r in rounds_rows(folder, rounds, "quarantine")}
    new, skipped = 0, 0
    batch = params["io"]["batch_rows"]
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

    limited = params["ingest"]["limit"] is not None  # a limited read may stop inside a file: not all of it read
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


# -- the published union --------------------------------------------------------------------------
def publish(params: dict, folder: Path, rounds: list[dict], llms: LLMs) -> dict:
    """The union of `rounds` packaged into <folder>/published (a run folder: tables and exports),
    each sample's metadata with its round. Returns its summary."""
    out = folder / PUBLISHED
    out.mkdir(parents=True, exist_ok=True)
    dirs = {r["round"]: folder / round_name(r["round"]) for r in rounds}
    # The latest round that processed each id: an id seen again with other content counts once, as last seen.
    owners = pl.concat([pl.scan_parquet(d / TABLES["classified"]).select("id", pl.lit(n).alias("round"))
                        for n, d in dirs.items()]).collect()
    latest = owners.group_by("id").agg(pl.col("round").max())
    superseded = owners.height - latest.height
    round_of = dict(latest.iter_rows())
    for table in UNION_TABLES:
        parts = []
        for n, d in dirs.items():
            scan = pl.scan_parquet(d / TABLES[table])
            if superseded and table != "quarantine":
                scan = scan.join(latest.filter(pl.col("round") == n).select("id").lazy(), on="id", how="semi")
            parts.append(scan)
        target = out / TABLES[table]
        tmp = target.with_name(target.name + ".tmp")
        pl.concat(parts).sink_parquet(tmp, statistics=False)
        tmp.replace(target)
    _union_stats(out, dirs, superseded)
    return package_run(params, out, out, llms, round_of=round_of)


def _rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


def _union_stats(out: Path, dirs: dict[int, Path], superseded: int) -> None:
    """The stages' stats of the union: counts from its tables, LLM usage and time summed over the rounds."""
    usage = {stage: Usage() for stage in STATS}
    seconds = dict.fromkeys(STATS, 0.0)
    ingest = {"duplicates": superseded, "skipped_seen": 0, "records_read": 0}
    for d in dirs.values():
        for stage in STATS:
            stats = read_stats(d, stage)
            usage[stage].add(Usage(**stats.get("usage", {})))
            seconds[stage] += stats.get("seconds", 0.0)
        for key in ingest:
            ingest[key] += read_stats(d, "ingest").get(key, 0)
    rows = {t: _rows(out / TABLES[t]) for t in UNION_TABLES}
    ingest |= {"trajectories": rows["classified"], "quarantined": rows["quarantine"]}
    ingest["records_in"] = ingest["trajectories"] + ingest["quarantined"] + ingest["duplicates"]
    write_stats(out, "ingest", ingest | {"seconds": round(seconds["ingest"], 3), "superseded": superseded})
    write_stats(out, "classify", {"in": rows["classified"], "usage": vars(usage["classify"]),
                                  "seconds": round(seconds["classify"], 3)})
    failures = pl.scan_parquet(out / TABLES["classified"]).select(pl.col("is_failure").sum()).collect().item()
    # each stage's input is the rows the one before kept (extract's: the failures), as in a run
    for stage, source, kept in (("extract", failures, "extracted"), ("relabel", rows["extracted"], "relabeled"),
                                ("verify", rows["relabeled"], "verified")):
        write_stats(out, stage, {"in": source, "out": rows[kept],
                                 "rejected": rows[f"{stage}_rejected"], "usage": vars(usage[stage]),
                                 "seconds": round(seconds[stage], 3)})


# -- pushing and listing ----------------------------------------------------------------------------
def push_targets(result: RoundResult, push_url: str) -> list[tuple[Path, str]]:
    """(local folder, S3 URL) pairs a round's outputs go to: the round under
    <push_url>/<lineage>/round-NNNN, the union under <push_url>/<lineage>/published, the manifest beside."""
    if result.round is None:
        return []
    base = f"{push_url.rstrip('/')}/{result.lineage}"
    return [(result.round_dir, f"{base}/{round_name(result.round)}"), (result.folder / PUBLISHED, f"{base}/{PUBLISHED}")]


def format_rounds(lineages: list[dict]) -> str:
    """The lineages and their rounds as a table for a person."""
    if not lineages:
        return "no rounds yet"
    head = ("round", "finished", "read", "new", "seen", "quar.", "accepted", "samples", "published", "ok", "input")
    lines = []
    for m in lineages:
        lines += ["", f"lineage {m['lineage']} (params {m['params_hash']}, agenther {m['agenther_version']}, "
                      f"since {m['created']})"]
        table = [head]
        for r in m["rounds"]:
            c = r["counts"]
            table.append((str(r["round"]), r["finished"], str(c["records_read"]), str(c["new_trajectories"]),
                          str(c["skipped_seen"]), str(c["quarantined"]), str(c["accepted"]), str(c["hindsight_samples"]),
                          str(r["published"]["hindsight_samples"]), "yes" if r["reconciled"] else "NO", r["input"]))
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines += ["  " + "  ".join(v.rjust(w) if i not in (1, 10) else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in table]
    lines.append("")
    lines.append("read: records read from new or changed files; seen: skipped as processed by an earlier round; "
                 "samples: the round's hindsight samples; published: hindsight samples in the union after the round")
    return "\n".join(lines[1:])
