"""Ingest: agent logs (a file or a folder, local or on S3) -> the TRAJECTORY and QUARANTINE tables.

An s3:// input is an object or a prefix read as a folder; objects are streamed (agenther/s3.py
S3Object), never held whole unless a JSON array file must be, as a local file is.

Only whole-input problems raise (IngestError: missing path, unknown format, nothing to read).
A bad record never raises: it lands in quarantine with its file, pointer and reason, and
`records_in == len(trajectories) + len(quarantine)` always holds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import polars as pl

from agenther import schema
from agenther.adapters import LogInput, log_input, messages
from agenther.adapters.adapter import ReadContext
from agenther.adapters.common import (
    LogFile,
    LogPart,
    Quarantined,
    UnreadableFile,
    excerpt,
    first_record,
    iter_records,
)
from agenther.adapters.grammars import AUTO, GrammarChoice, choose
from agenther.adapters.grammars import grammars as grammars_named
from agenther.adapters.messages import MessagesMapping
from agenther.adapters.registry import adapter, adapters, format_names
from agenther.params import Ingest, Params
from agenther.stages import Spread, in_process
from agenther.tables import TableWriter, iter_batches
from agenther.workdir import TABLES


class IngestError(Exception):
    """The input as a whole cannot be ingested (bad records are quarantined instead)."""


DETECT_FROM = 50  # records sampled from the start of the logs to detect where chat-log fields are


@dataclass
class IngestReport:
    """What ingest found out on the way, for the person running it and for the stage's stats."""
    mapping: MessagesMapping | None = None  # the chat-log mapping used (given + detected)
    sampled: int = 0  # records detection looked at
    duplicates: int = 0  # byte-identical repeats of a record, dropped (counted, never lost silently)
    trials: int = 0  # records sharing an id with different content: kept, as trials of one task
    partial: dict[str, list[int]] = field(default_factory=dict)  # path -> [records it resolved in, records]
    grammar: GrammarChoice | None = None  # how text actions are read (chat logs only)
    repaired: list[str] = field(default_factory=list)  # "file pointer" of records whose lone surrogates were repaired

    def describe(self) -> list[str]:
        """What a person should know before trusting the run: detected fields, repeats, partial paths."""
        lines = []
        if self.mapping is not None and self.mapping.detected:
            found = ", ".join(f"{k.removesuffix('_path')} <- {v!r}" for k, v in self.mapping.detected.items())
            lines.append(f"ingest: detected from the first {self.sampled} records: {found} "
                         "(--map KEY=VALUE / ingest.messages overrides)")
        if self.trials:
            lines.append(f"ingest: {self.trials} records share an id with another but differ: kept as trials of "
                         "one task (ids suffixed #2, #3, ...)")
        if self.duplicates:
            lines.append(f"ingest: {self.duplicates} records repeat another byte for byte: dropped, counted")
        for path, (hits, records) in self.partial.items():
            lines.append(f"ingest: warning: {path!r} is in {hits} of {records} records only")
        if self.grammar is not None:
            lines.append(f"ingest: {self.grammar.describe()}")
        if self.repaired:
            lines.append(f"ingest: {len(self.repaired)} records held a lone surrogate escape (\\ud800 ...), which no "
                         f"UTF-8 file can hold: kept as its escape text, e.g. {self.repaired[0]}")
        return lines

    def stats(self) -> dict:
        detected = dict(self.mapping.detected) if self.mapping else {}
        grammar = None if self.grammar is None else {
            "name": self.grammar.grammar.name if self.grammar.grammar else None, "how": self.grammar.how,
            "scores": self.grammar.scores}
        return {"duplicates": self.duplicates, "trials": self.trials, "detected": detected,
                "partial_paths": self.partial, "text_actions": grammar, "repaired": len(self.repaired)}


def _detect_file(path: LogFile, ctx: ReadContext) -> str:
    """The format of one file: the first registered format its first record looks like."""
    try:
        record = first_record(path)  # JSONL: reads up to the first good line only
    except UnreadableFile as exc:
        raise IngestError(str(exc)) from exc
    known = adapters()
    if record is None:
        return next(a.name for a in known if a.generic)  # an empty file: nothing to read, any reader will do
    for a in known:
        if a.looks_like(record, ctx):
            return a.name
    for a in known:
        if a.catch_all and path.suffix == a.catch_all:
            return a.name
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    expected = "; ".join(a.expects for a in known)
    raise IngestError(
        f"{path}: cannot tell the format (first record: {keys}); expected {expected}. "
        "Pass the format explicitly or fix the mapping."
    )


def detect_format(path: str | Path, mapping: MessagesMapping | None = None) -> str:
    """The format of a file (a registered format's name), or of a folder whose readable files agree."""
    root, ctx = _resolve(path), ReadContext(mapping or MessagesMapping())
    if root.single:
        return _detect_file(root.files[0], ctx)
    found: dict[str, LogFile] = {}
    for f in root.files:
        try:
            found.setdefault(_detect_file(f, ctx), f)
        except IngestError:
            continue  # ingest quarantines such files; they do not decide the folder's format
    if len(found) != 1:
        what = ", ".join(f"{fmt} ({f})" for fmt, f in found.items()) or "no recognisable .json/.jsonl file"
        raise IngestError(f"{path}: cannot tell one format for the folder: {what}")
    return next(iter(found))


def _read_file(path: LogFile, fmt: str, ctx: ReadContext) -> Iterator[dict | Quarantined]:
    # A part of a file has the file's format: told from the file's first record.
    whole = path.path if isinstance(path, LogPart) else path
    return adapter(_detect_file(whole, ctx) if fmt == "auto" else fmt).read(path, ctx)


def read_logs(
    path: str | Path,
    fmt: str = "auto",
    mapping: MessagesMapping | None = None,
    limit: int | None = None,
    max_trajectory_mb: float | None = Ingest().max_trajectory_mb,
    report: IngestReport | None = None,
    files: list[Path] | None = None,
    text_actions: str = AUTO,
    grammars: dict[str, dict] | None = None,
) -> Iterator[dict | Quarantined]:
    """Every raw record of a file or a folder (*.json / *.jsonl, recursive, sorted), in reading
    order: a trajectory row (schema.TRAJECTORY) or a Quarantined row. One record at a time
    (JSONL is read line by line), so a caller can write them out in batches. The ingest stage reads
    the same records in parts, spread over an executor's workers (`write_tables`).

    `limit` keeps the first N good trajectories in reading order and stops reading there.
    Chat logs: the fields not mapped are detected from the first records (`messages.detect`); a
    mapped or detected path that resolves in no record is an IngestError naming the keys records
    do have, one that resolves in only some is counted in `report.partial`.
    A later record with an id already seen is a trial of the same task when its content differs
    (kept, id suffixed #2, #3, ...) and a repeat when it is the same (dropped, counted in `report`).
    A trajectory whose text (contents, tool arguments, tool schemas) exceeds `max_trajectory_mb`
    is quarantined. `files`: read only these of the input's files (a round reads the new and changed
    ones: agenther/rounds.py), in the input's reading order. `text_actions` / `grammars` (params
    ingest.text_actions, ingest.grammars): how chat logs' text actions are read; `auto` detects the
    grammar from the first records (agenther/adapters/grammars.py). A record a decoder, an adapter or
    its grammar cannot read is quarantined; one with a lone surrogate is repaired (`report.repaired`).
    """
    report = report if report is not None else IngestReport()
    if limit is not None and limit < 0:
        raise IngestError(f"limit must be >= 0, not {limit}")
    root, files, ctx = _opened(path, fmt, mapping, files, text_actions, grammars, report)
    seen = Repeats()
    for item, digest in _admitted(_records(files, fmt, ctx, root.single, max_trajectory_mb), seen, limit):
        yield item if digest is None else seen.named(item, digest)
    report.duplicates, report.trials = seen.duplicates, seen.trials
    if report.mapping is not None:
        check_paths(report.mapping, report)


def _opened(path: str | Path, fmt: str, mapping: MessagesMapping | None, files: list[LogFile] | None,
            text_actions: str, grammars: dict[str, dict] | None,
            report: IngestReport) -> tuple[LogInput, list[LogFile], ReadContext]:
    """The input, the files to read (all, or `files` of them) and how to read them: the chat-log
    mapping and text-action grammar detected from the first records (noted in `report`)."""
    root, mapping = _resolve(path), mapping or MessagesMapping()
    if fmt not in ("auto", *format_names()):
        raise IngestError(f"unknown format {fmt!r} (expected auto, {', '.join(format_names())})")
    all_files = root.files
    if not all_files:
        raise IngestError(f"{path}: no .json or .jsonl files under it")
    if files is not None:
        chosen = set(files)  # Paths or S3Objects, as the input lists them
        if not chosen <= set(all_files):
            raise IngestError(f"{sorted(map(str, chosen - set(all_files)))[0]}: not a log file under {path}")
        all_files = [f for f in all_files if f in chosen]
    ctx = ReadContext(mapping, repairs=report.repaired)
    if fmt in ("auto", messages.FORMAT):
        ctx.mapping, report.grammar = _detected(all_files, fmt, mapping, report, text_actions, grammars)
        report.mapping = ctx.mapping
        ctx.grammar = report.grammar.grammar if report.grammar is not None else None
    return root, all_files, ctx


def _records(files: Iterable[LogFile], fmt: str, ctx: ReadContext, single: bool,
             max_trajectory_mb: float | None) -> Iterator[dict | Quarantined]:
    """The records of `files` in order, a trajectory too big or a file that cannot be read quarantined
    (`single`: the input is that one file, whose problem stops the run)."""
    max_chars = None if max_trajectory_mb is None else max_trajectory_mb * 1e6
    for f in files:
        try:
            for item in _read_file(f, fmt, ctx):
                if (not isinstance(item, Quarantined) and max_chars is not None
                        and (size := trajectory_chars(item)) > max_chars):
                    reason = (f"{item['record_pointer'] or 'record'}: trajectory text is {size / 1e6:.1f} MB, over "
                              f"ingest.max_trajectory_mb = {max_trajectory_mb:g} (raise it to keep such records)")
                    item = Quarantined(str(f), item["record_pointer"], reason, excerpt(item["goal"]))
                yield item
        except (IngestError, UnreadableFile) as exc:
            if single:
                raise IngestError(str(exc)) from exc
            # Inside a folder one unreadable file must not sink the others.
            with f.open("rb") as fh:
                yield Quarantined(str(f), "", str(exc), excerpt(fh.read(400)))


def _admitted(records: Iterable[dict | Quarantined], seen: Repeats,
              limit: int | None) -> Iterator[tuple[dict | Quarantined, str | None]]:
    """`records` without the repeats `seen` finds (counted there), up to `limit` trajectories; each
    with its content digest (None: a Quarantined row)."""
    kept = 0
    if limit == 0:
        return
    for item in records:
        digest = None
        if not isinstance(item, Quarantined):
            digest = content_digest(item)
            if seen.admit(item["id"], digest) is None:
                continue
            kept += 1
        yield item, digest
        if limit is not None and kept >= limit:
            return


class Repeats:
    """Records that share an id, in reading order: the same content again is a repeat (dropped,
    counted); other content is another trial of the task (kept: `named` gives it id#2, #3, ...)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}  # id -> its distinct contents' digests, in reading order
        self.duplicates = self.trials = 0

    def admit(self, record_id: str, digest: str) -> int | None:
        """None for a repeat, else which trial of the id this is (1, 2, ...)."""
        digests = self.seen.setdefault(record_id, [])
        if digest in digests:
            self.duplicates += 1
            return None
        digests.append(digest)
        self.trials += len(digests) > 1
        return len(digests)

    def named(self, row: dict, digest: str) -> dict:
        """An admitted row under its trial's id (task_key: the id its trials share)."""
        trial = self.seen[row["id"]].index(digest) + 1
        return row if trial == 1 else row | {"task_key": row["id"], "id": f"{row['id']}#{trial}"}


def _resolve(path: str | Path) -> LogInput:
    """The input's files (an S3 prefix is listed here); IngestError if there is no such input."""
    try:
        found = log_input(path)
    except (OSError, ValueError) as exc:  # an unreachable store, a bucket we may not list, a bad URL
        raise IngestError(str(exc)) from exc  # it names the input
    if not found.exists:
        raise IngestError(f"input not found: {path}")
    return found


def content_digest(row: dict) -> str:
    """What a record says, apart from where it was read."""
    body = {k: v for k, v in row.items() if k not in ("source_file", "record_pointer")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _detected(files: list[LogFile], fmt: str, mapping: MessagesMapping, report: IngestReport, text_actions: str,
              grammars: dict[str, dict] | None) -> tuple[MessagesMapping, GrammarChoice | None]:
    """The mapping with chat-log fields detected from the first records of the logs, and the
    grammar their text actions are read with (None: not chat logs)."""
    sample: list = []
    for f in files:
        try:
            for _, record in iter_records(f):
                if not isinstance(record, Quarantined):
                    sample.append(record)
                if len(sample) >= DETECT_FROM:
                    break
        except UnreadableFile:
            continue  # reading it says so, with the file's name
        if len(sample) >= DETECT_FROM:
            break
    report.sampled = len(sample)
    detected = messages.detect(sample, mapping)
    if fmt == "auto" and not any(messages.looks_like(r, detected) for r in sample):
        return mapping, None  # not chat logs (tau-bench, ToolBench): nothing to detect
    turns = [t for t in (messages.turns_of(r, detected) for r in sample) if t is not None]
    try:
        return detected, choose(text_actions, grammars, turns)
    except ValueError as exc:  # a grammar name no grammar has
        raise IngestError(str(exc)) from exc


def check_paths(mapping: MessagesMapping, report: IngestReport) -> None:
    """After reading: a given or detected path that resolved in no record stops the run (IngestError
    naming the keys the records have); one that resolved in some only goes to `report.partial`."""
    keys = sorted((k.removeprefix("key ") for k in mapping.resolved if k.startswith("key ")),
                  key=lambda k: -mapping.resolved[f"key {k}"])
    for name, path in mapping.checked_paths().items():
        # the turns: over every record read; the other fields: over the records that became trajectories
        records = mapping.resolved["records" if name == "messages_path" else "converted"]
        hits = mapping.resolved[f"path {path}"]
        how = "mapped" if name in mapping.given else "detected"
        if records and hits == 0:
            raise IngestError(f"ingest.messages.{name} = {path!r} ({how}) is in none of the {records} records; "
                              f"their keys: {', '.join(keys[:20])}")
        if hits < records:
            report.partial[path] = [hits, records]


def trajectory_chars(row: dict) -> int:
    """The size of a trajectory's text: message contents, tool-call arguments, tool schemas."""
    total = len(row.get("tools") or "")
    for m in row["messages"]:
        total += len(m.get("content") or "")
        total += sum(len(c.get("arguments") or "") for c in m.get("tool_calls") or [])
    return total


# -- the stage: the logs read in parts (spread over an executor's workers), then merged ----------------
@dataclass(frozen=True)
class IngestPart:
    """What one shard of ingest reads and where it writes (small: handed to a worker as is)."""
    pieces: tuple[LogFile, ...]  # files, or parts of a big JSONL file, in reading order
    folder: Path  # the shard's tables and keys, in the work folder's scratch (every worker sees it)
    fmt: str
    mapping: MessagesMapping  # detected once, before the parts are read
    grammar: str | None  # the text-action grammar's name (rebuilt by name: a user's regex grammar is a closure)
    grammar_specs: dict[str, dict] | None  # params ingest.grammars
    single: bool
    limit: int | None
    max_trajectory_mb: float | None
    batch_rows: int


@dataclass
class PartResult:
    folder: Path
    repeats: int  # repeats inside the part (dropped there; repeats across parts are dropped by the merge)
    repaired: list[str]
    resolved: Counter  # the chat-log paths resolved in its records (MessagesMapping.resolved)


KEYS = "keys.parquet"  # a shard's (id, content digest) per written trajectory: what the merge dedups on


def part_shard(part: IngestPart) -> PartResult:
    """One shard: its pieces' records into its own trajectories and quarantine tables, repeats inside
    the part dropped; the ids and digests of what it kept to KEYS."""
    grammar = None if part.grammar is None else grammars_named(part.grammar_specs)[part.grammar]
    ctx = ReadContext(replace(part.mapping, resolved=Counter()), grammar)
    seen = Repeats()
    records = _admitted(_records(part.pieces, part.fmt, ctx, part.single, part.max_trajectory_mb), seen, part.limit)
    keys: dict[str, list[str]] = {"id": [], "digest": []}
    with (TableWriter(part.folder / TABLES["trajectories"], schema.TRAJECTORY) as good,
          TableWriter(part.folder / TABLES["quarantine"], schema.QUARANTINE) as bad):
        while batch := list(islice(records, part.batch_rows)):
            rows = [(item, digest) for item, digest in batch if digest is not None]
            refused = _write_or_quarantine(good, [row for row, _ in rows])
            refused_at = {(r["source_file"], r["record_pointer"]) for r in refused}
            for row, digest in rows:
                if (str(row["source_file"]), row["record_pointer"]) not in refused_at:
                    keys["id"].append(row["id"])
                    keys["digest"].append(digest)
            bad.write_rows([item.row() for item, digest in batch if digest is None] + refused)
    pl.DataFrame(keys, schema={"id": pl.String, "digest": pl.String}).write_parquet(part.folder / KEYS)
    return PartResult(part.folder, seen.duplicates, ctx.repairs, ctx.mapping.resolved)


def write_tables(params: Params, work: Path, files: list[LogFile] | None = None, spread: Spread = in_process) -> dict:
    """The stage (agenther/stages/__init__.py): the logs into the trajectories and quarantine tables.
    The input is cut into parts of about `io.part_mb` (files, and big JSONL files at line starts),
    each read by a shard (`spread`: in this process, or an executor's workers) into the work folder's
    scratch, `io.batch_rows` records at a time; the merge then writes the tables in reading order,
    dropping the repeats that span parts and naming the trials, so the tables are the ones one
    process reading the whole input writes. A row the table writer refuses is quarantined with the
    writer's reason; the others of its batch go on. `files`: only these files of the input, as
    agenther/rounds.py reads the new ones. Returns the stage's stats."""
    p, work = params.ingest, Path(work)
    grammar_specs = {name: g.model_dump() for name, g in p.grammars.items()}
    report = IngestReport()
    root, chosen, ctx = _opened(p.input, p.format, MessagesMapping.from_params(p.messages or {}), files,
                                p.text_actions, grammar_specs, report)
    scratch = work / "ingest-parts"
    shutil.rmtree(scratch, ignore_errors=True)  # a crashed run's parts
    part_bytes = int(params.io.part_mb * 1e6) if p.limit is None else None  # a limit reads in one part
    jobs = [IngestPart(tuple(pieces), scratch / f"part-{i:05d}", p.format, ctx.mapping,
                       ctx.grammar.name if ctx.grammar else None, grammar_specs, root.single, p.limit,
                       p.max_trajectory_mb, params.io.batch_rows)
            for i, pieces in enumerate(parts_of(chosen, p.format, ctx, part_bytes))]
    seen = Repeats()
    try:
        parts = list(spread(part_shard, jobs))
        for part in parts:
            report.repaired += part.repaired
            if report.mapping is not None:
                report.mapping.resolved.update(part.resolved)
        if report.mapping is not None:
            check_paths(report.mapping, report)  # a path that resolved nowhere stops the run before any table
        with (TableWriter(work / TABLES["trajectories"], schema.TRAJECTORY) as good,
              TableWriter(work / TABLES["quarantine"], schema.QUARANTINE) as bad):
            for part in parts:
                _merge_part(part.folder, seen, good, bad, params.io.batch_rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.duplicates, report.trials = seen.duplicates + sum(part.repeats for part in parts), seen.trials
    for line in report.describe():
        print(line, file=sys.stderr)
    return {"records_in": good.rows + bad.rows + report.duplicates, "trajectories": good.rows,
            "quarantined": bad.rows, **report.stats()}


def _merge_part(folder: Path, seen: Repeats, good: TableWriter, bad: TableWriter, batch_rows: int) -> None:
    """A shard's tables appended to the stage's: its trajectories without the repeats of earlier parts'
    records, trials under their trial's id."""
    keys = pl.read_parquet(folder / KEYS)
    trials = [seen.admit(i, d) for i, d in zip(keys["id"], keys["digest"], strict=True)]
    offset = 0
    for batch in iter_batches(folder / TABLES["trajectories"], batch_rows):
        trial = pl.Series("trial", trials[offset:offset + batch.height], dtype=pl.Int64)
        offset += batch.height
        renamed = pl.col("trial") > 1
        good.write(batch.with_columns(trial).filter(pl.col("trial").is_not_null()).with_columns(
            task_key=pl.when(renamed).then(pl.col("id")).otherwise(pl.col("task_key")),
            id=pl.when(renamed).then(pl.format("{}#{}", pl.col("id"), pl.col("trial"))).otherwise(pl.col("id")),
        ).drop("trial"))
    for batch in iter_batches(folder / TABLES["quarantine"], batch_rows):
        bad.write(batch)


def parts_of(files: list[LogFile], fmt: str, ctx: ReadContext, part_bytes: int | None) -> list[list[LogFile]]:
    """The files in reading order cut into parts of about `part_bytes` (None: one part): small files
    grouped, a big local JSONL file cut at line starts (LogPart; its format told first, so a file that
    cannot be read is quarantined once, whole)."""
    if part_bytes is None:
        return [list(files)]
    pieces: list[LogFile] = []
    for f in files:
        big = isinstance(f, Path) and f.suffix == ".jsonl" and _size(f) > part_bytes
        pieces += _cut(f, part_bytes) if big and _readable(f, fmt, ctx) else [f]
    parts: list[list[LogFile]] = [[]]
    size = 0
    for piece in pieces:
        if parts[-1] and size >= part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(piece)
        size += _size(piece)
    return parts


def _size(piece: LogFile) -> int:
    return piece.stat().st_size if isinstance(piece, Path) else piece.size


def _readable(path: Path, fmt: str, ctx: ReadContext) -> bool:
    try:
        return fmt != "auto" or bool(_detect_file(path, ctx))
    except IngestError:
        return False


def _cut(path: Path, part_bytes: int) -> list[LogFile]:
    """A JSONL file as LogParts of about `part_bytes`, each from a line's start (and its line number)."""
    size = path.stat().st_size
    starts = [0]
    with path.open("rb") as fh:
        for target in range(part_bytes, size, part_bytes):
            if target <= starts[-1]:
                continue  # one line longer than a part
            fh.seek(target - 1)
            fh.readline()  # to the start of the next line
            if fh.tell() < size:
                starts.append(fh.tell())
        if len(starts) == 1:
            return [path]
        first_lines, read, newlines = [], 0, 0
        fh.seek(0)
        for start in starts:
            while read < start:
                chunk = fh.read(min(1 << 23, start - read))
                read, newlines = read + len(chunk), newlines + chunk.count(b"\n")
            first_lines.append(newlines + 1)
    ends = starts[1:] + [size]
    return [LogPart(path, a, b, line) for a, b, line in zip(starts, ends, first_lines, strict=True)]


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
