"""What an exporter is: a consumer's file(s), derived from the annotated rows (agenther.export.registry
lists them). A leaf module: the exporters import it, the registry imports the exporters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The package stage's own rows, every exporter's input: each sample with its `weight` (the sample's),
# its per-turn weights (0/1 on assistant messages; sharegpt: metadata.turn_weights) and lineage.
ANNOTATED = ("sft.jsonl", "dpo.jsonl", "sharegpt.jsonl")

Rows = Callable[[str, dict], Iterable[tuple[str, dict]]]  # (annotated file, annotated row) -> (file, row)
Lines = Callable[[str], Iterator[str]]  # a file of the output folder written so far -> its JSONL lines
Finish = Callable[[Path, Lines, set[str]], dict[str, int]]  # (out, lines, files written) -> {file: rows}
Publish = Callable[[Path, dict, str], None]  # (out, run summary, dataset card) -> None


def _no_rows(name: str, row: dict) -> list[tuple[str, dict]]:
    return []


@dataclass(frozen=True)
class Exporter:
    """A consumer's file(s), derived from the annotated rows.

    name: short name (`trl`). files: every file it may write, relative to the output folder (glob
    patterns for names that carry a digest); a file with no rows is not written. rows: its JSONL
    rows of one annotated row, in order (the sink sorts them by sample, stably). finish: files it
    writes once the JSONL files are written, from their lines (returns {file: rows}). publish: files
    it writes after the run summary and the dataset card (`published`). describe: the card's files
    table, {file pattern: (format, who reads it as it is)}. training: the card's paragraph on what
    its files train (which turns, by which mechanism of the consumer) and how to apply
    `sample_weight`. loading: the card's loading snippet, from the summary's `exports`. measured:
    files whose rows are conversations a trainer tokenizes (their token lengths are measured).
    """

    name: str
    files: tuple[str, ...]
    rows: Rows = _no_rows
    finish: Finish | None = None
    publish: Publish | None = None
    published: tuple[str, ...] = ()
    describe: dict[str, tuple[str, str]] = field(default_factory=dict)
    training: str = ""
    loading: Callable[[dict], str] | None = None
    measured: tuple[str, ...] = ()
