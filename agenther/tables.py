"""Parquet tables read and written in batches, so a stage's memory is bounded by a batch.

A stage table is one Parquet file with one row group per written batch. `TableWriter`
appends batches and renames the file into place on close (a killed stage never leaves a
half-written table); `iter_batches` reads it back a batch at a time; `scan_columns` reads
only the named columns (the light ones: ids, flags, scores) of the whole table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from agenther import schema

DEFAULT_BATCH_ROWS = 500  # params io.batch_rows


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
        if self._writer is None:  # no rows: an empty table with the contract's columns
            self.path.parent.mkdir(parents=True, exist_ok=True)
            schema.empty(self.contract).write_parquet(self.tmp, statistics=False)
        else:
            self._writer.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def iter_batches(path: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS,
                 columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
    """The table at `path`, `batch_rows` rows at a time (the last batch may be shorter)."""
    parquet = pq.ParquetFile(path)
    try:
        for batch in parquet.iter_batches(batch_size=max(1, int(batch_rows)), columns=columns):
            yield pl.from_arrow(pa.Table.from_batches([batch]))  # type: ignore[misc]
    finally:
        parquet.close()


def count_rows(path: str | Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def scan_columns(path: str | Path, columns: list[str]) -> pl.DataFrame:
    """Only `columns` of the whole table: cheap for scalar columns, whatever the table's size."""
    return pl.scan_parquet(path).select(columns).collect()


def batch_rows(params: dict) -> int:
    return max(1, int((params.get("io") or {}).get("batch_rows") or DEFAULT_BATCH_ROWS))
