"""Ingest: agent logs (a file or a folder) -> the TRAJECTORY and QUARANTINE tables.

Only whole-input problems raise (IngestError: missing path, unknown format, nothing to read).
A bad record never raises: it lands in quarantine with its file, pointer and reason, and
`records_in == len(trajectories) + len(quarantine)` always holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from agenther.adapters import FORMATS, input_files, messages, tau_bench, toolbench
from agenther.adapters.common import Quarantined, UnreadableFile, excerpt, first_record
from agenther.adapters.messages import MessagesMapping

# A trajectory bigger than this is quarantined (params ingest.max_trajectory_mb): no model
# context holds it, and one 50 MB tool dump would otherwise flow into every export.
DEFAULT_MAX_TRAJECTORY_MB = 8.0


class IngestError(Exception):
    """The input as a whole cannot be ingested (bad records are quarantined instead)."""


def _detect_file(path: Path, mapping: MessagesMapping) -> str:
    try:
        record = first_record(path)  # JSONL: reads up to the first good line only
    except UnreadableFile as exc:
        raise IngestError(str(exc)) from exc
    if record is None:
        return "messages"  # an empty file: nothing to read, any reader will do
    if tau_bench.looks_like(record):
        return "tau-bench"
    if toolbench.looks_like(record):
        return "toolbench"
    if path.suffix == ".jsonl" or messages.looks_like(record, mapping):
        return "messages"  # JSONL is chat logs unless a line says otherwise
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    raise IngestError(
        f"{path}: cannot tell the format (first record: {keys}); expected tau-bench (traj, task_id), "
        f"toolbench (answer_generation) or chat turns at {mapping.messages_path!r}, 'messages' or "
        "'conversations'. Pass the format explicitly or fix the mapping."
    )


def detect_format(path: str | Path, mapping: MessagesMapping | None = None) -> str:
    """The format of a file ("tau-bench", "toolbench" or "messages"), or of a folder whose readable files agree."""
    root, mapping = Path(path), mapping or MessagesMapping()
    if not root.exists():
        raise IngestError(f"input not found: {path}")
    if root.is_file():
        return _detect_file(root, mapping)
    found: dict[str, Path] = {}
    for f in input_files(root):
        try:
            found.setdefault(_detect_file(f, mapping), f)
        except IngestError:
            continue  # ingest quarantines such files; they do not decide the folder's format
    if len(found) != 1:
        what = ", ".join(f"{fmt} ({f})" for fmt, f in found.items()) or "no recognisable .json/.jsonl file"
        raise IngestError(f"{path}: cannot tell one format for the folder: {what}")
    return next(iter(found))


def _read_file(path: Path, fmt: str, mapping: MessagesMapping) -> Iterator[dict | Quarantined]:
    if fmt == "auto":
        fmt = _detect_file(path, mapping)
    if fmt == "tau-bench":
        return tau_bench.read(path)
    if fmt == "toolbench":
        return toolbench.read(path)
    return messages.read(path, mapping)


def read_logs(
    path: str | Path,
    fmt: str = "auto",
    mapping: MessagesMapping | None = None,
    limit: int | None = None,
    max_trajectory_mb: float | None = DEFAULT_MAX_TRAJECTORY_MB,
) -> Iterator[dict | Quarantined]:
    """Every raw record of a file or a folder (*.json / *.jsonl, recursive, sorted), in reading
    order: a trajectory row (schema.TRAJECTORY) or a Quarantined row. One record at a time
    (JSONL is read line by line), so a caller can write them out in batches.

    `limit` keeps the first N good trajectories in reading order and stops reading there.
    A later record with an id already seen is quarantined as a duplicate; so is a trajectory
    whose text (contents, tool arguments, tool schemas) exceeds `max_trajectory_mb`.
    """
    root, mapping = Path(path), mapping or MessagesMapping()
    if not root.exists():
        raise IngestError(f"input not found: {path}")
    if fmt not in ("auto", *FORMATS):
        raise IngestError(f"unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    if limit is not None and limit < 0:
        raise IngestError(f"limit must be >= 0, not {limit}")
    files = input_files(root)
    if not files:
        raise IngestError(f"{path}: no .json or .jsonl files under it")

    max_chars = None if max_trajectory_mb is None else max_trajectory_mb * 1e6
    seen: dict[str, str] = {}  # id -> where (ids only: small next to the trajectories)
    kept = 0
    for f in files:
        if limit is not None and kept >= limit:
            break
        try:
            for item in _read_file(f, fmt, mapping):
                if isinstance(item, Quarantined):
                    yield item
                elif item["id"] in seen:
                    reason = f"duplicate id {item['id']!r} (first seen at {seen[item['id']]})"
                    yield Quarantined(str(f), item["record_pointer"], reason, excerpt(item["goal"]))
                elif max_chars is not None and (size := trajectory_chars(item)) > max_chars:
                    reason = (f"{item['record_pointer'] or 'record'}: trajectory text is {size / 1e6:.1f} MB, over "
                              f"ingest.max_trajectory_mb = {max_trajectory_mb:g} (raise it to keep such records)")
                    yield Quarantined(str(f), item["record_pointer"], reason, excerpt(item["goal"]))
                else:
                    seen[item["id"]] = f"{f} {item['record_pointer']}".strip()
                    kept += 1
                    yield item
                    if limit is not None and kept >= limit:
                        break
        except (IngestError, UnreadableFile) as exc:
            if root.is_file():
                raise IngestError(str(exc)) from exc
            # Inside a folder one unreadable file must not sink the others.
            with f.open("rb") as fh:
                yield Quarantined(str(f), "", str(exc), excerpt(fh.read(400)))


def trajectory_chars(row: dict) -> int:
    """The size of a trajectory's text: message contents, tool-call arguments, tool schemas."""
    total = len(row.get("tools") or "")
    for m in row["messages"]:
        total += len(m.get("content") or "")
        total += sum(len(c.get("arguments") or "") for c in m.get("tool_calls") or [])
    return total

