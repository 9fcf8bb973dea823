"""Adapters: one small reader per log format, each turning one file into trajectory dicts.

`tau_bench`, `toolbench` and `messages` each expose `read(path)` (a generator of trajectory
dicts and `Quarantined` rows) and `looks_like(record)` for format detection.
"""

from agenther.adapters.common import Quarantined, RecordError
from agenther.adapters.messages import MessagesMapping

FORMATS = ("tau-bench", "toolbench", "messages")

__all__ = ["FORMATS", "MessagesMapping", "Quarantined", "RecordError"]
