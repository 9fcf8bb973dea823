"""The export files, written with bounded memory and sorted by sample id.

The package stage hands the sink annotated rows (`sft.jsonl`, `dpo.jsonl`, `sharegpt.jsonl`: rows
with `weight` and `metadata`, the lineage of every sample); the sink derives each consumer's rows
from them as they come (every exporter's `rows`, agenther.export.registry) and, on close, writes
the files and lets each exporter `finish` (the Parquet dataset, LLaMA-Factory's dataset_info.json).

- Rows are serialized as they come; every `buffer_rows` rows (or SPILL_CHARS characters) of a file
  are sorted into a run file, extending the sink's last run when they all sort after it, and close()
  merges the runs into the file (an external merge sort), a job per file (`merge_runs`), then lets
  each exporter finish, a job per exporter (`finish_exporter`): an executor may spread both over
  its workers. The sort key is the sample id
  and the row's place among the rows derived from its annotated row: a sample's rows stay in order.
- A file with no rows is not written (`datasets.load_dataset("json")` cannot load a 0-byte file),
  and a file of the layout left from an earlier run that has no rows now is removed:
  `not_written` says which and why.
- Every file is written through a temporary file renamed into place, and comes back with its
  sha256: identical rows give byte-identical files.
- Rows may be added by several sinks, in other processes (the package stage's shards): each shard's
  sink writes its sorted runs into a folder of the main sink's `scratch` (`shard_sink`, `finish_runs`),
  and the main sink merges them with its own (`adopt`). Keys are unique, so the files are the same
  bytes whichever sink added a row.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agenther.export import formats
from agenther.export.exporter import ANNOTATED
from agenther.export.registry import exporters
from agenther.stages import Spread, in_process
from agenther.tables import DEFAULT_BATCH_ROWS

EXPORT_FILES = ANNOTATED  # what the package stage adds rows to
LEGACY = ("dataset_info.json",)  # before the per-consumer folders: a mapping that did not match its rows
NO_ROWS = "no rows (a 0-byte JSONL file is not loadable by datasets.load_dataset)"


def sink_layout() -> tuple[str, ...]:
    """Every file the sink may write (paths relative to the output folder; the Parquet files are glob
    patterns: their names carry their digest): the annotated files and every exporter's."""
    return (*ANNOTATED, *(f for e in exporters() for f in e.files))


def sample_id(row: dict) -> str:
    return row["metadata"]["sample_id"]


def derived(name: str, row: dict) -> list[tuple[str, dict]]:
    """The consumer rows of one annotated row, every exporter's, in order: [(file, row)]."""
    if name not in ANNOTATED:
        raise ValueError(f"not an annotated export: {name}")
    return [pair for e in exporters() for pair in e.rows(name, row)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SPILL_CHARS = 8 * 1024 * 1024  # a file's buffered rows beyond this go to a sorted run on disk


class SortedJsonlSink:
    """Annotated rows in (`add`), every export file of the layout out (`close`), in `out_dir`."""

    def __init__(self, out_dir: Path, buffer_rows: int = DEFAULT_BATCH_ROWS, runs_dir: Path | None = None):
        self.out = Path(out_dir)
        self.buffer_rows = buffer_rows
        if runs_dir is None:  # the main sink: its runs, and its shards' (scratch), removed on close
            self.out.mkdir(parents=True, exist_ok=True)
            self._tmp: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(
                prefix="agenther-exports-", dir=self.out)
            self.scratch = Path(self._tmp.name)
        else:  # a shard's sink: runs only, into runs_dir (finish_runs)
            self._tmp, self.scratch = None, Path(runs_dir)
            self.scratch.mkdir(parents=True, exist_ok=True)
        self.buffers: dict[str, list[tuple[list, str]]] = {}  # JSONL file -> [(sort key, line)]
        self.buffered: dict[str, int] = {}  # JSONL file -> characters buffered
        self.last_run: dict[str, Path] = {}  # JSONL file -> the last run this sink wrote (not adopted)
        self.last_key: dict[str, list] = {}  # JSONL file -> the sort key of the last row that run holds
        self.runs: dict[str, list[Path]] = {}
        self.layout = sink_layout()
        self.rows = dict.fromkeys(self.layout, 0)  # rows per file (dataset_info.json: datasets named)
        self.not_written: dict[str, str] = {}

    def add(self, name: str, row: dict) -> None:
        key = sample_id(row)
        self._add(name, [key, 0], row)
        for place, (file, consumer_row) in enumerate(derived(name, row)):
            self._add(file, [key, place], consumer_row)

    def _add(self, name: str, key: list, row: dict) -> None:
        if name not in self.rows:
            raise ValueError(f"{name} is no file of the export layout")
        line = formats.dumps(row)
        self.buffers.setdefault(name, []).append((key, line))
        self.buffered[name] = self.buffered.get(name, 0) + len(line)
        self.runs.setdefault(name, [])
        self.rows[name] += 1
        # by rows, and by size: one row per trained turn repeats the conversation before it, so a
        # huge tool result would otherwise sit in memory once per later turn
        if len(self.buffers[name]) >= self.buffer_rows or self.buffered[name] >= SPILL_CHARS:
            self._spill(name)

    def _spill(self, name: str) -> None:
        rows = sorted(self.buffers[name])
        runs = self.runs[name]
        # Rows that come after everything this sink's last run holds extend it (one sample's rows arrive
        # in order): the merge then holds one line per run in memory, not one per spill. Only a run this
        # sink wrote is extended, never one it adopted from a shard.
        last = self.last_run.get(name)
        extend = last is not None and rows[0][0] >= self.last_key[name]
        run = last if extend else self.scratch / f"{name.replace('/', '__')}.{len(runs):05d}"
        if not extend:
            runs.append(run)
        with run.open("a" if extend else "w", encoding="utf-8") as fh:
            # json.dumps escapes tabs and newlines, so "<key>\t<line>" splits unambiguously
            fh.writelines(f"{json.dumps(key)}\t{line}\n" for key, line in rows)
        self.last_run[name], self.last_key[name] = run, rows[-1][0]
        self.buffers[name] = []
        self.buffered[name] = 0

    def _spill_all(self) -> None:
        """Every buffered row to a sorted run."""
        for name in list(self.buffers):
            if self.buffers[name]:
                self._spill(name)

    def finish_runs(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        """A shard's sink: every row to a sorted run; ({file: its runs}, {file: rows}) for `adopt`."""
        self._spill_all()
        return ({name: [str(p) for p in runs] for name, runs in self.runs.items() if runs},
                {name: n for name, n in self.rows.items() if n})

    def adopt(self, runs: dict[str, list[str]], rows: dict[str, int]) -> None:
        """Take a shard's runs (finish_runs) into this sink's files."""
        for name, paths in runs.items():
            self.buffers.setdefault(name, [])
            self.runs.setdefault(name, []).extend(Path(p) for p in paths)
        for name, n in rows.items():
            self.rows[name] += n

    def close(self, spread: Spread = in_process) -> dict[str, str]:
        """Write the export files; returns {file: sha256} of the files written. Each file is merged
        from its sorted runs by a job of its own, then each exporter's finish (the Parquet dataset,
        dataset_info.json) by one of its own (`spread`: in this process, or an executor's workers,
        which see the runs and the output folder)."""
        digests = {}
        try:
            self._spill_all()  # a merge job reads runs only
            names = sorted(self.buffers)
            merges = [Merge(self.out, name, tuple(str(p) for p in self.runs[name])) for name in names]
            digests = dict(zip(names, spread(merge_runs, merges), strict=True))
            finishes = [Finish(self.out, e.name, frozenset(digests)) for e in exporters() if e.finish is not None]
            for written in spread(finish_exporter, finishes):
                for name, (n, digest) in written.items():
                    self.rows[name], digests[name] = n, digest
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
        for name in self.layout:
            if not any(fnmatch.fnmatch(f, name) for f in digests):
                self.not_written[name] = NO_ROWS
                for path in self.out.glob(name):  # an earlier run's file must not pass for this one's
                    path.unlink()
        for name in LEGACY:
            (self.out / name).unlink(missing_ok=True)
        return digests



@dataclass(frozen=True)
class Merge:
    """One export file's job in close(): its sorted runs into the file."""
    out: Path
    name: str
    runs: tuple[str, ...]


def merge_runs(job: Merge) -> str:
    """The file from its runs (an external merge sort's last pass); its sha256."""
    runs = [read_run(Path(path)) for path in job.runs]
    return _write_lines_atomic(job.out / job.name, (line for _, line in heapq.merge(*runs, key=lambda kv: kv[0])))


@dataclass(frozen=True)
class Finish:
    """One exporter's job in close(), once the JSONL files are written (`written`)."""
    out: Path
    exporter: str
    written: frozenset[str]

    def lines(self, name: str) -> Iterator[str]:
        if name not in self.written:
            return
        with (self.out / name).open(encoding="utf-8") as fh:
            for line in fh:
                yield line.rstrip("\n")


def finish_exporter(job: Finish) -> dict[str, tuple[int, str]]:
    """The files an exporter writes from the JSONL files: {file: (rows, sha256)}."""
    exporter = next(e for e in exporters() if e.name == job.exporter)
    return {name: (n, file_sha256(job.out / name)) for name, n in exporter.finish(job.out, job.lines, set(job.written)).items()}


def read_run(path: Path) -> Iterator[tuple[list, str]]:
    """A sorted run's (key, row line) pairs."""
    with path.open(encoding="utf-8") as fh:
        for entry in fh:
            tab = entry.index("\t")
            yield json.loads(entry[:tab]), entry[tab + 1 : -1]  # one copy of a long line, not two


def _write_lines_atomic(path: Path, lines: Iterable[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with tmp.open("wb") as fh:
        for line in lines:
            data = (line + "\n").encode("utf-8")
            digest.update(data)
            fh.write(data)
    os.replace(tmp, path)  # readers never see a half-written export
    return digest.hexdigest()
