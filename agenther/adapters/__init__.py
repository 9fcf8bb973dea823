"""Adapters: one small reader per log format, each turning one file into trajectory dicts.

Each format is an `Adapter` in one registry (agenther/adapters/registry.py): `tau_bench`,
`toolbench` and `messages` are registered as a plugin's would be. An adapter's `read(path, ctx)`
yields trajectory dicts and `Quarantined` rows; `looks_like(record, ctx)` detects its format. A
"file" is a local path or an S3 object (`LogFile`): the adapters read both alike. Agents that
act by writing text are read by a grammar (agenther/adapters/grammars.py).
"""

from dataclasses import dataclass
from pathlib import Path

from agenther.adapters.common import LogFile, Quarantined, RecordError
from agenther.adapters.messages import MessagesMapping
from agenther.s3 import S3Object, find_logs, is_s3_url

SUFFIXES = (".json", ".jsonl")  # the files of a log folder that are read


def input_files(root: Path) -> list[Path]:
    """The log files under `root` (itself, if a file), in reading order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


@dataclass(frozen=True)
class LogInput:
    """What an ingest input names: a local file or folder, or an s3:// object or prefix (a
    prefix is read as a folder: every .json/.jsonl object under it, in key order)."""
    given: str  # as given (params ingest.input, --input)
    files: list[LogFile]  # in reading order
    single: bool  # one file named directly (its problems stop the run), not a folder
    exists: bool

    def name_of(self, f: LogFile) -> str:
        """The file's name relative to the input (a single file: its own name): what digests of
        the input record, so the same logs give the same digest wherever they are."""
        if self.single:
            return f.name
        if isinstance(f, S3Object):
            return f.key.removeprefix(_prefix_of(self.given))
        return str(f.relative_to(Path(self.given)))


def _prefix_of(url: str) -> str:
    from agenther.s3 import folder_prefix, parse_s3_url

    return folder_prefix(parse_s3_url(url)[1])


def log_input(path: str | Path) -> LogInput:
    """Resolve an ingest input: the files it names, local or on S3 (listed, not read)."""
    if is_s3_url(str(path)):
        objects, single = find_logs(str(path))
        files = objects if single else [o for o in objects if o.suffix in SUFFIXES]
        return LogInput(str(path), files, single, exists=bool(objects))
    root = Path(path)
    return LogInput(str(path), input_files(root) if root.exists() else [], root.is_file(), root.exists())


__all__ = ["SUFFIXES", "LogFile", "LogInput", "MessagesMapping", "Quarantined", "RecordError",
           "input_files", "log_input"]
