"""The published union of a lineage's rounds (agenther/rounds.py): the package stage
(agenther/stages/package.py package_run) over the concatenation of every round's tables, so
preference pairs and prompt dedup see every round and the union holds the same samples as a single
run on all the logs; each sample's metadata also says its round. A trajectory that a later round
saw with other content (same id: the log was corrected) counts in its latest version only.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from agenther.lineage import PUBLISHED, round_name
from agenther.llm import LLMs, Usage
from agenther.params import Params
from agenther.stages import PIPELINE
from agenther.stages.package import package_run
from agenther.workdir import STATS, TABLES, read_stats, write_stats

# The tables the published union concatenates: every table the stages after ingest write (package reads
# them), and the quarantine (for the counts).
UNION_TABLES = (*(t for s in PIPELINE if s.reads for t in s.writes), "quarantine")


def publish(params: Params, folder: Path, rounds: list[dict], llms: LLMs) -> dict:
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
