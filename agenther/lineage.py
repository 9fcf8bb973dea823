"""The lineages of incremental rounds (agenther/rounds.py) and their manifests:

    <root>/<lineage>/manifest.json      the rounds: counts, when, input, the files each read
                   /round-0001/ ...     a run folder per round
                   /published/          the union of every round, packaged as one run (+ manifest.json)

A **lineage** is what produces the data: the params hash (without `ingest.input` and `ingest.limit`,
which say which logs, not how they are processed) and the prompt templates' hashes. A change of
either is another lineage, with its own folder: rounds never mix data made by different settings,
and the old lineage stays as it was. Rounds of one lineage run one at a time (`locked`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agenther import prompts
from agenther.params import Params, params_hash

MANIFEST = "manifest.json"
PUBLISHED = "published"


def round_name(number: int) -> str:
    return f"round-{number:04d}"


def lineage_of(params: Params) -> dict:
    """What produced the data: the params hash without the input's path and limit, and the prompts'
    hashes. Its `id` names the lineage's folder."""
    hashed = params_hash(params, leave_out={"ingest": ("input", "limit")})
    prompt_hashes = prompts.all_hashes()
    prompts_digest = hashlib.sha256(json.dumps(prompt_hashes, sort_keys=True).encode()).hexdigest()[:8]
    return {"id": f"{hashed}-{prompts_digest}", "params_hash": hashed, "prompt_hashes": prompt_hashes}


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def list_lineages(root: str | Path) -> list[dict]:
    """Every lineage's manifest under `root`, oldest first."""
    found = [m for d in sorted(Path(root).glob("*/")) if (m := read_manifest(d)) is not None]
    return sorted(found, key=lambda m: (m["created"], m["lineage"]))


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One round of a lineage at a time: the OS releases the lock when its process dies."""
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
