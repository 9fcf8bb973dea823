"""The export files, written with bounded memory and sorted by sample id.

The package stage hands the sink annotated rows (`sft.jsonl`, `dpo.jsonl`, `sharegpt.jsonl`: rows
with `weight` and `metadata`, the lineage of every sample); the sink derives each consumer's file
from them as they come (agenther.export.openai_ft, .trl, .llamafactory) and, on close, the Parquet
dataset (agenther.export.parquet) and LLaMA-Factory's dataset_info.json.

- Rows are serialized as they come; every `buffer_rows` rows of a file are sorted into a run file,
  and close() merges the runs into the file (an external merge sort).
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

from agenther.export import formats, llamafactory, openai_ft, parquet, trl
from agenther.tables import DEFAULT_BATCH_ROWS

ANNOTATED = ("sft.jsonl", "dpo.jsonl", "sharegpt.jsonl")
EXPORT_FILES = ANNOTATED  # what the package stage adds rows to
DATASET_INFO = llamafactory.DATASET_INFO
JSONL_FILES = (*ANNOTATED, openai_ft.FILE, trl.SFT_FILE, trl.DPO_FILE, *llamafactory.FILES.values())
# Every file the sink may write (paths relative to the output folder; the Parquet files are glob
# patterns: their names carry their digest), and old names it removes.
LAYOUT = (*JSONL_FILES, DATASET_INFO, *parquet.FILES)
LEGACY = ("dataset_info.json",)  # before the per-consumer folders: a mapping that did not match its rows
NO_ROWS = "no rows (a 0-byte JSONL file is not loadable by datasets.load_dataset)"


def sample_id(row: dict) -> str:
    return row["metadata"]["sample_id"]


def derived(name: str, row: dict) -> list[tuple[str, dict]]:
    """The consumer rows of one annotated row: [(file, row)]."""
    if name == "sft.jsonl":
        return [(openai_ft.FILE, openai_ft.openai_row(row)), (trl.SFT_FILE, trl.sft_row(row))]
    if name == "dpo.jsonl":
        return [(trl.DPO_FILE, trl.dpo_row(row))]
    if name == "sharegpt.jsonl":
        return [(llamafactory.file_of(row), llamafactory.lf_row(row))]
    raise ValueError(f"not an annotated export: {name}")


def _write_atomic(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written export
    return hashlib.sha256(data).hexdigest()


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
        self.buffers: dict[str, list[tuple[str, str]]] = {name: [] for name in JSONL_FILES}
        self.runs: dict[str, list[Path]] = {name: [] for name in JSONL_FILES}
        self.rows = dict.fromkeys(LAYOUT, 0)  # rows per file (dataset_info.json: datasets named)
        self.not_written: dict[str, str] = {}

    def add(self, name: str, row: dict) -> None:
        key = sample_id(row)
        self._add(name, key, row)
        for file, consumer_row in derived(name, row):
            self._add(file, key, consumer_row)

    def _add(self, name: str, key: str, row: dict) -> None:
        self.buffers[name].append((key, formats.dumps(row)))
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
            for name in JSONL_FILES:
                if self.rows[name]:
                    digests[name] = _write_lines_atomic(self.out / name, self._sorted_lines(name))
            info = llamafactory.dataset_info(set(digests))
            if info:
                text = json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
                digests[DATASET_INFO] = _write_atomic(self.out / DATASET_INFO, text.encode("utf-8"))
                self.rows[DATASET_INFO] = len(info)
            written = parquet.write_parquet(self.out, self._lines("sft.jsonl"), self._lines("dpo.jsonl"))
            for name, n in written.items():
                self.rows[name] = n
                digests[name] = file_sha256(self.out / name)
        finally:
            self._tmp.cleanup()
        for name in LAYOUT:
            if not any(fnmatch.fnmatch(f, name) for f in digests):
                self.not_written[name] = NO_ROWS
                for path in self.out.glob(name):  # an earlier run's file must not pass for this one's
                    path.unlink()
        for name in LEGACY:
            (self.out / name).unlink(missing_ok=True)
        return digests

    def _lines(self, name: str) -> Iterator[str]:
        if not self.rows[name]:
            return
        with (self.out / name).open(encoding="utf-8") as fh:
            for line in fh:
                yield line.rstrip("\n")


def _read_run(path: Path) -> Iterator[tuple[str, str]]:
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
