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
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agenther import schema
from agenther.adapters import LogInput, log_input, messages
from agenther.adapters.adapter import ReadContext
from agenther.adapters.common import LogFile, Quarantined, UnreadableFile, excerpt, first_record, iter_records
from agenther.adapters.grammars import AUTO, GrammarChoice, choose
from agenther.adapters.messages import MessagesMapping
from agenther.adapters.registry import adapter, adapters, format_names
from agenther.params import Params
from agenther.tables import TableWriter
from agenther.workdir import TABLES

# A trajectory bigger than this is quarantined (params ingest.max_trajectory_mb): no model
# context holds it, and one 50 MB tool dump would otherwise flow into every export.
DEFAULT_MAX_TRAJECTORY_MB = 8.0


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
    return adapter(_detect_file(path, ctx) if fmt == "auto" else fmt).read(path, ctx)


def read_logs(
    path: str | Path,
    fmt: str = "auto",
    mapping: MessagesMapping | None = None,
    limit: int | None = None,
    max_trajectory_mb: float | None = DEFAULT_MAX_TRAJECTORY_MB,
    report: IngestReport | None = None,
    files: list[Path] | None = None,
    text_actions: str = AUTO,
    grammars: dict[str, dict] | None = None,
) -> Iterator[dict | Quarantined]:
    """Every raw record of a file or a folder (*.json / *.jsonl, recursive, sorted), in reading
    order: a trajectory row (schema.TRAJECTORY) or a Quarantined row. One record at a time
    (JSONL is read line by line), so a caller can write them out in batches.

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
    root, mapping = _resolve(path), mapping or MessagesMapping()
    if fmt not in ("auto", *format_names()):
        raise IngestError(f"unknown format {fmt!r} (expected auto, {', '.join(format_names())})")
    if limit is not None and limit < 0:
        raise IngestError(f"limit must be >= 0, not {limit}")
    all_files = root.files
    if not all_files:
        raise IngestError(f"{path}: no .json or .jsonl files under it")
    if files is not None:
        chosen = set(files)  # Paths or S3Objects, as the input lists them
        if not chosen <= set(all_files):
            raise IngestError(f"{sorted(map(str, chosen - set(all_files)))[0]}: not a log file under {path}")
        all_files = [f for f in all_files if f in chosen]
    files = all_files

    ctx = ReadContext(mapping, repairs=report.repaired)
    if fmt in ("auto", messages.FORMAT):
        ctx.mapping, report.grammar = _detected(files, fmt, mapping, report, text_actions, grammars)
        report.mapping = ctx.mapping
        ctx.grammar = report.grammar.grammar if report.grammar is not None else None
    max_chars = None if max_trajectory_mb is None else max_trajectory_mb * 1e6
    seen: dict[str, set[str]] = {}  # id -> digests of its records' content (small next to the trajectories)
    kept = 0
    for f in files:
        if limit is not None and kept >= limit:
            break
        try:
            for item in _read_file(f, fmt, ctx):
                if isinstance(item, Quarantined):
                    yield item
                    continue
                digest = content_digest(item)
                repeats = seen.setdefault(item["id"], set())
                if digest in repeats:
                    report.duplicates += 1  # the same record again: once is enough
                    continue
                if max_chars is not None and (size := trajectory_chars(item)) > max_chars:
                    reason = (f"{item['record_pointer'] or 'record'}: trajectory text is {size / 1e6:.1f} MB, over "
                              f"ingest.max_trajectory_mb = {max_trajectory_mb:g} (raise it to keep such records)")
                    yield Quarantined(str(f), item["record_pointer"], reason, excerpt(item["goal"]))
                    continue
                if repeats:  # another run of the same task: trial 2, 3, ... with an id of its own
                    report.trials += 1
                    item = item | {"task_key": item["id"], "id": f"{item['id']}#{len(repeats) + 1}"}
                repeats.add(digest)
                kept += 1
                yield item
                if limit is not None and kept >= limit:
                    break
        except (IngestError, UnreadableFile) as exc:
            if root.single:
                raise IngestError(str(exc)) from exc
            # Inside a folder one unreadable file must not sink the others.
            with f.open("rb") as fh:
                yield Quarantined(str(f), "", str(exc), excerpt(fh.read(400)))
    if report.mapping is not None:
        check_paths(report.mapping, report)


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


def write_tables(params: Params, work: Path, files: list[LogFile] | None = None) -> dict:
    """The stage (agenther/stages/__init__.py): the logs into the trajectories and quarantine tables,
    `io.batch_rows` records at a time (`files`: only these files of the input, as agenther/rounds.py
    reads the new ones). A row the table writer refuses is quarantined with the writer's reason; the
    others of its batch go on. Returns the stage's stats."""
    p = params.ingest
    report = IngestReport()
    logs = read_logs(p.input, fmt=p.format, mapping=MessagesMapping.from_params(p.messages or {}),
                     limit=p.limit, max_trajectory_mb=p.max_trajectory_mb, report=report, files=files,
                     text_actions=p.text_actions, grammars={name: g.model_dump() for name, g in p.grammars.items()})
    size = params.io.batch_rows
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
