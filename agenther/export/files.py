"""The export files: rows sorted by sample id into sft.jsonl, dpo.jsonl and sharegpt.jsonl with
bounded memory (an external merge sort), and LLaMA-Factory's dataset_info.json. Every file is
written through a temporary file renamed into place, and comes back with its sha256: identical
rows give byte-identical files."""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from agenther.export import formats
from agenther.tables import DEFAULT_BATCH_ROWS

EXPORT_FILES = ("sft.jsonl", "dpo.jsonl", "sharegpt.jsonl")
DATASET_INFO = "dataset_info.json"


def sample_id(row: dict) -> str:
    return row["metadata"]["sample_id"]


def _write_atomic(path: Path, data: bytes) -> str:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written export
    return hashlib.sha256(data).hexdigest()


def _write_dataset_info(out: Path) -> str:
    """LLaMA-Factory's dataset_info.json for the ShareGPT export; returns its sha256."""
    info = json.dumps(formats.dataset_info(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return _write_atomic(out / DATASET_INFO, info.encode("utf-8"))


class SortedJsonlSink:
    """Export rows straight to sft.jsonl / dpo.jsonl / sharegpt.jsonl in `out_dir`, sorted by
    sample id  with bounded memory: an external merge sort.
    Rows are serialized as they come; every `buffer_rows` rows of a file are sorted into a run
    file, and close() merges the runs into the export (atomically renamed into place)."""

    def __init__(self, out_dir: Path, buffer_rows: int = DEFAULT_BATCH_ROWS):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.buffer_rows = buffer_rows
        self._tmp = tempfile.TemporaryDirectory(prefix="agenther-exports-", dir=self.out)
        self.buffers: dict[str, list[tuple[str, str]]] = {name: [] for name in EXPORT_FILES}
        self.runs: dict[str, list[Path]] = {name: [] for name in EXPORT_FILES}
        self.rows = dict.fromkeys(EXPORT_FILES, 0)

    def add(self, name: str, row: dict) -> None:
        self.buffers[name].append((sample_id(row), formats.dumps(row)))
        self.rows[name] += 1
        if len(self.buffers[name]) >= self.buffer_rows:
            self._spill(name)

    def _spill(self, name: str) -> None:
        run = Path(self._tmp.name) / f"{name}.{len(self.runs[name]):05d}"
        with run.open("w", encoding="utf-8") as fh:
            # json.dumps escapes tabs and newlines, so "<key>\t<line>" splits unambiguously
            fh.writelines(f"{json.dumps(key)}\t{line}\n" for key, line in sorted(self.buffers[name]))
        self.runs[name].append(run)
        self.buffers[name] = []

    def close(self) -> dict[str, str]:
        """Write the export files and dataset_info.json; returns {file name: sha256}."""
        digests = {}
        try:
            for name in EXPORT_FILES:
                runs = [_read_run(path) for path in self.runs[name]]
                merged = heapq.merge(*runs, iter(sorted(self.buffers[name])), key=lambda kv: kv[0])
                digests[name] = _write_lines_atomic(self.out / name, (line for _, line in merged))
            digests[DATASET_INFO] = _write_dataset_info(self.out)
        finally:
            self._tmp.cleanup()
        return digests


def _read_run(path: Path) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as fh:
        for entry in fh:
            key, line = entry.rstrip("\n").split("\t", 1)
            yield json.loads(key), line


def _write_lines_atomic(path: Path, lines: Iterable[str]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with tmp.open("wb") as fh:
        for line in lines:
            data = (line + "\n").encode("utf-8")
            digest.update(data)
            fh.write(data)
    os.replace(tmp, path)  # readers never see a half-written export
    return digest.hexdigest()
