"""The export files, written with bounded memory and sorted by sample id.

The package stage hands the sink annotated rows (`sft.jsonl`, `dpo.jsonl`, `sharegpt.jsonl`: rows
with `weight` and `metadata`, the lineage of every sample); the sink derives each consumer's rows
from them as they come (every exporter's `rows`, agenther.export.registry) and, on close, writes
the files and lets each exporter `finish` (the Parquet dataset, LLaMA-Factory's dataset_info.json).

- Rows are serialized as they come; every `buffer_rows` rows of a file are sorted into a run file,
  and close() merges the runs into the file (an external merge sort). The sort key is the sample id
  and the row's place among the rows derived from its annotated row: a sample's rows stay in order.
- A file with no rows is not written (`datasets.load_dataset("json")` cannot load a 0-byte file),
  and a file of the layout left from an earlier run that has no rows now is removed:
  `not_written` says which and why.
- Every file is written through a temporary file renamed into place, and comes back with its
  sha256: identical rows give byte-identical files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from agenther.export import formats
from agenther.export.exporter import ANNOTATED
from agenther.export.registry import exporters
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


class SortedJsonlSink:
    """Annotated rows in (`add`), every export file of the layout out (`close`), in `out_dir`."""

    def __init__(self, out_dir: Path, buffer_rows: int = DEFAULT_BATCH_ROWS):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.buffer_rows = buffer_rows
        self._tmp = tempfile.TemporaryDirectory(prefix="agenther-exports-", dir=self.out)
        self.buffers: dict[str, list[tuple[list, str]]] = {}  # JSONL file -> [(sort key, line)]
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
        self.buffers.setdefault(name, []).append((key, formats.dumps(row)))
        self.runs.setdefault(name, [])
        self.rows[name] += 1
        if len(self.buffers[name]) >= self.buffer_rows:
            self._spill(name)

    def _spill(self, name: str) -> None:
        run = Path(self._tmp.name) / f"{name.replace('/', '__')}.{len(self.runs[name]):05d}"
        with run.open("w", encoding="utf-8") as fh:
            # json.dumps escapes tabs and newlines, so "<key>\t<line>" splits unambiguously
            fh.writelines(f"{json.dumps(key)}\t{line}\n" for key, line in sorted(self.buffers[name]))
        self.runs[name].append(run)
        self.buffers[name] = []

    def _sorted_lines(self, name: str) -> Iterator[str]:
        runs = [_read_run(path) for path in self.runs[name]]
        return (line for _, line in heapq.merge(*runs, iter(sorted(self.buffers[name])), key=lambda kv: kv[0]))

    def close(self) -> dict[str, str]:
        """Write the export files; returns {file: sha256} of the files written."""
        digests = {}
        try:
            for name in sorted(self.buffers):
                digests[name] = _write_lines_atomic(self.out / name, self._sorted_lines(name))
            for exporter in exporters():
                if exporter.finish is None:
                    continue
                for name, n in exporter.finish(self.out, self._lines, set(digests)).items():
                    self.rows[name] = n
                    digests[name] = file_sha256(self.out / name)
        finally:
            self._tmp.cleanup()
        for name in self.layout:
            if not any(fnmatch.fnmatch(f, name) for f in digests):
                self.not_written[name] = NO_ROWS
                for path in self.out.glob(name):  # an earlier run's file must not pass for this one's
                    path.unlink()
        for name in LEGACY:
            (self.out / name).unlink(missing_ok=True)
        return digests

    def _lines(self, name: str) -> Iterator[str]:
        if not self.rows.get(name) or name not in self.buffers:
            return
        with (self.out / name).open(encoding="utf-8") as fh:
            for line in fh:
                yield line.rstrip("\n")


def _read_run(path: Path) -> Iterator[tuple[list, str]]:
    with path.open(encoding="utf-8") as fh:
        for entry in fh:
            key, line = entry.rstrip("\n").split("\t", 1)
            yield json.loads(key), line


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
