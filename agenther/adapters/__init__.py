"""Adapters: one small reader per log format, each turning one file into trajectory dicts.

`tau_bench`, `toolbench` and `messages` each expose `read(path)` (a generator of trajectory
dicts and `Quarantined` rows) and `looks_like(record)` for format detection.
"""

from pathlib import Path

from agenther.adapters.common import Quarantined, RecordError
from agenther.adapters.messages import MessagesMapping

FORMATS = ("tau-bench", "toolbench", "messages")
SUFFIXES = (".json", ".jsonl")  # the files of a log folder that are read


def input_files(root: Path) -> list[Path]:
    """The log files under `root` (itself, if a file), in reading order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


__all__ = ["FORMATS", "SUFFIXES", "MessagesMapping", "Quarantined", "RecordError", "input_files"]
