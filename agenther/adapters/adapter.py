"""What a log format is (agenther/adapters/registry.py holds the registry of them).

An `Adapter` is a log format: `looks_like(record, ctx)` says whether a file's first record is in
it, `read(path, ctx)` turns one file into trajectory rows and `Quarantined` rows. `ReadContext`
is what reading one log needs beyond the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agenther.adapters.common import LogFile, Quarantined, Repairs
from agenther.adapters.grammar import Grammar


@dataclass
class ReadContext:
    """What reading one log needs beyond the file: the chat-log mapping (a messages.MessagesMapping:
    given and detected), the text-action grammar chosen for the log (None: text stays text), and
    where the records whose lone surrogates were repaired are noted (common.iter_records)."""
    mapping: Any
    grammar: Grammar | None = None
    repairs: Repairs = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    name: str  # the `source_format` of its rows and the --format / ingest.format value
    looks_like: Callable[[Any, ReadContext], bool]  # is this (a file's first record) in the format?
    read: Callable[[LogFile, ReadContext], Iterator[dict | Quarantined]]
    expects: str  # what a record of the format holds, for the "cannot tell the format" message
    # Its logs say why a run failed (ground-truth actions, a finish type), which the rule
    # classifier reads; False: a success flag or a reward is the only failure signal.
    failure_signals: bool = False
    # Detection order: specific formats first; the generic chat-log reader (which any record with
    # turns fits) last. `catch_all`: the suffix of files it takes when no format claims them.
    generic: bool = False
    catch_all: str | None = None
