"""Parquet tables read and written in batches, so a stage's memory is bounded by a batch.

A stage table is one Parquet file with one row group per written batch. `TableWriter`
appends batches and renames the file into place on close (a killed stage never leaves a
half-written table); `iter_batches` reads it back a batch at a time; `scan_columns` reads
only the named columns (the light ones: ids, flags, scores) of the whole table.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from agenther import gates, schema
from agenther.params import IO, Params
from agenther.workdir import TABLES

DEFAULT_BATCH_ROWS = IO().batch_rows  # params io.batch_rows's default
# The work folder's tables (workdir.TABLES) and their contracts (the *_rejected ones: schema.REJECTION).
CONTRACTS = {"trajectories": schema.TRAJECTORY, "quarantine": schema.QUARANTINE, "classified": schema.CLASSIFIED,
             "extracted": schema.EXTRACTED, "relabeled": schema.RELABELED, "verified": schema.VERIFIED}


class TableWriter:
    """Write a table with exactly `contract`'s columns, batch by batch; atomic on close.

    Use as a context manager: on an exception the partial file is removed and the table
    at `path` (if any) is left as it was."""

    def __init__(self, path: str | Path, contract: dict[str, pl.DataType]):
        self.path = Path(path)
        self.contract = contract
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.schema = schema.empty(contract).to_arrow().schema
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self.closed = False

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        schema.validate_columns(df, self.contract, str(self.path))
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", write_statistics=False)
        self._writer.write_table(df.select(list(self.contract)).to_arrow().cast(self.schema))
        self.rows += df.height

    def write_rows(self, rows: list[dict]) -> None:
        self.write(schema.frame(rows, self.contract))

    def close(self) -> None:
        if self.closed:  # closed before its `with` block ends (the runner closes tables in order)
            return
        self.closed = True
        if self._writer is None:  # no rows: an empty table with the contract's columns
            self.path.parent.mkdir(parents=True, exist_ok=True)
            schema.empty(self.contract).write_parquet(self.tmp, statistics=False)
        else:
            self._writer.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def iter_batches(path: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS,
                 columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
    """The table at `path`, `batch_rows` rows at a time (the last batch may be shorter)."""
    parquet = pq.ParquetFile(path)
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            yield pl.from_arrow(pa.Table.from_batches([batch]))  # type: ignore[misc]
    finally:
        parquet.close()


def read_rows(path: str | Path, offset: int, rows: int) -> pl.DataFrame:
    """Rows [offset, offset + rows) of the table: only the row groups that hold them are read (a worker
    reads its batch of a table on shared storage, tasks/stages.py)."""
    return pl.scan_parquet(path).slice(offset, rows).collect()


def count_rows(path: str | Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def scan_columns(path: str | Path, columns: list[str]) -> pl.DataFrame:
    """Only `columns` of the whole table: cheap for scalar columns, whatever the table's size."""
    return pl.scan_parquet(path).select(columns).collect()


def batch_rows(params: Params) -> int:
    return params.io.batch_rows


def gate_table(work: Path, name: str, params: Params) -> Path:
    """Check a table before the next stage reads it; returns its path. A gated table
    (gates.CONTRACTS) passes its Great Expectations gate on a lazy scan (only its scalar
    columns are collected, whatever its size): on failure GateFailed stops the run here,
    before the next stage writes anything; the result is kept in <work>/gates/<name>.json."""
    path = Path(work) / TABLES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    scan = pl.scan_parquet(path)
    if name in gates.CONTRACTS:
        results = Path(work) / "gates"
        if params.gates.enabled:
            # Before validate_columns: the gate checks the contract too, and this way a missing
            # column is reported (and recorded) by the gate like every other broken expectation.
            for warning in gates.check(scan, name, params, results, source=str(path))["warnings"]:
                print(f"warning: {warning} (gates.distributions: warn)", file=sys.stderr)
        else:
            (results / f"{name}.json").unlink(missing_ok=True)  # no stale verdict from an earlier run
    schema.validate_columns(pl.DataFrame(schema=scan.collect_schema()), CONTRACTS.get(name, schema.REJECTION), str(path))
    return path


def read_table(work: Path, name: str, params: Params) -> pl.DataFrame:
    """The whole table, gated (`gate_table`): for the tables that stay small."""
    return pl.read_parquet(gate_table(work, name, params))


def write_table(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.write_parquet(tmp, statistics=False)
    tmp.replace(path)  # never leave a half-written table for the next stage
