"""Stages that stream: the outputs must not depend on how many rows a batch holds.

`io.batch_rows` bounds what ingest, classify, extract and package hold in memory (the
memory itself is measured by bench/stages_scale.py). Here: tiny batches (many Parquet row
groups, many package buckets, many sorted runs merged into each export) give exactly the
outputs of one batch holding everything.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import TAU, package, write_params
from test_package import LINEAGE, PARAMS, tau_inputs

from agenther import schema
from agenther.cli import main
from agenther.export.files import EXPORT_FILES, SortedJsonlSink, sample_id
from agenther.stages.packaging import measure_lengths
from agenther.tables import TableWriter, iter_batches


def test_package_in_tiny_batches_equals_one_batch():
    verified, classified = tau_inputs(range(200), with_tools=True)
    whole = package(verified, classified, PARAMS, LINEAGE, batch_rows=10_000)
    tiny = package(verified, classified, PARAMS, LINEAGE, batch_rows=3)
    assert whole.counts["dpo_natural"] > 10 and whole.counts["success_samples"] > 50  # pairs and successes to lose
    assert tiny.counts == whole.counts
    assert tiny.sft == whole.sft and tiny.dpo == whole.dpo and tiny.sharegpt == whole.sharegpt
    assert tiny.rejections.equals(whole.rejections)


def test_a_package_split_in_shards_run_by_other_processes_is_the_single_process_package_byte_for_byte(tmp_path):
    # The package stage's shards (agenther/stages/packaging.py), run by a pool of worker processes that
    # share only the output folder, against one shard in this process: every file, byte for byte.
    verified, classified = tau_inputs(range(200), with_tools=True)
    whole = package(verified, classified, PARAMS, LINEAGE, batch_rows=10_000, out=tmp_path / "whole", measure_tokens=True)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ran: set[int] = set()

        def spread(fn, jobs):
            for result, pid in pool.map(_in_worker, [fn] * len(jobs), jobs):
                ran.add(pid)
                yield result

        shards = package(verified, classified, PARAMS, LINEAGE, batch_rows=16, out=tmp_path / "shards",
                         measure_tokens=True, spread=spread)
    assert len(ran) == 2 and os.getpid() not in ran  # every shard ran elsewhere, on both workers
    assert whole.counts["dpo_natural"] > 10 and whole.counts["success_samples"] > 50 and whole.counts["dpo_hindsight"]
    assert shards.counts == whole.counts and shards.rejections.equals(whole.rejections)
    files = sorted(str(p.relative_to(tmp_path / "whole")) for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "shards")) for p in (tmp_path / "shards").rglob("*") if p.is_file())
    assert {"sft.jsonl", "dpo.jsonl", "trl/sft.jsonl", "llamafactory/hindsight.jsonl"} <= set(files)
    for name in files:
        assert (tmp_path / "shards" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # measured shard by shard, as the whole files measure
    assert shards.exported.token_lengths == whole.exported.token_lengths == measure_lengths(
        tmp_path / "whole", whole.digests, None)
    assert whole.exported.token_lengths["files"]["trl/sft.jsonl"]["rows"] > 50


def _in_worker(fn, job):
    return fn(job), os.getpid()


def test_sorted_sink_merges_reversed_runs_into_the_files_one_buffer_writes(tmp_path):
    verified, classified = tau_inputs(range(60), with_tools=True)
    packaged = package(verified, classified, PARAMS, LINEAGE, batch_rows=10_000, out=tmp_path / "memory")
    expected = packaged.digests

    sink = SortedJsonlSink(tmp_path / "streamed", buffer_rows=4)
    rows = {"sft.jsonl": packaged.sft, "dpo.jsonl": packaged.dpo, "sharegpt.jsonl": packaged.sharegpt}
    for name in EXPORT_FILES:
        for row in reversed(rows[name]):  # worst case: every run is in reverse order
            sink.add(name, row)
    assert len(sink.runs["sft.jsonl"]) == len(packaged.sft) // 4 >= 5
    assert sink.close() == expected
    for name in expected:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
    written = sorted(str(p.relative_to(tmp_path / "streamed")) for p in (tmp_path / "streamed").rglob("*") if p.is_file())
    assert written == sorted(expected)  # runs cleaned up


def test_a_sink_extends_its_own_last_run_never_a_run_it_adopted(tmp_path):
    # Rows in order extend the sink's last run (one run, not one per spill); a shard's run adopted
    # in between is never appended to, even when the sink's next rows sort before that run's end.
    verified, classified = tau_inputs(range(60), with_tools=True)
    packaged = package(verified, classified, PARAMS, LINEAGE, batch_rows=10_000, out=tmp_path / "memory")
    ordered = sorted(packaged.sft, key=sample_id)  # the sink's order
    own, theirs = ordered[0::2], ordered[1::2]  # interleaved keys: the shard's run spans the sink's
    sink = SortedJsonlSink(tmp_path / "streamed", buffer_rows=4)
    shard = SortedJsonlSink(tmp_path / "unused", buffer_rows=4, runs_dir=sink.scratch / "shard")
    for row in theirs:
        shard.add("sft.jsonl", row)
    half = len(own) // 2
    for row in own[:half]:
        sink.add("sft.jsonl", row)
    sink.adopt(*shard.finish_runs())
    adopted = {p: p.read_bytes() for p in sink.runs["sft.jsonl"] if p.parent.name == "shard"}
    for row in own[half:]:
        sink.add("sft.jsonl", row)
    sink.finish_runs()
    assert len(adopted) == 1 and len(sink.runs["sft.jsonl"]) == 2  # its own run, and the shard's
    assert all(p.read_bytes() == data for p, data in adopted.items())
    digests = sink.close()
    memory = (tmp_path / "memory" / "sft.jsonl").read_bytes()
    assert (tmp_path / "streamed" / "sft.jsonl").read_bytes() == memory and "sft.jsonl" in digests


def test_table_writer_is_atomic_and_batches_read_back(tmp_path):
    classified = tau_inputs(range(10))[1].head(10)
    path = tmp_path / "t.parquet"
    with TableWriter(path, schema.CLASSIFIED) as writer:
        for start in range(0, 10, 3):
            writer.write(classified.slice(start, 3))
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    assert pl.concat(list(iter_batches(path, 4))).equals(classified)
    assert [b.height for b in iter_batches(path, 4)] == [4, 4, 2]

    with pytest.raises(RuntimeError), TableWriter(path, schema.CLASSIFIED) as writer:
        writer.write(classified.head(2))
        raise RuntimeError("killed mid-stage")
    assert pl.read_parquet(path).equals(classified)  # the old table stands, no temp file left
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]

    with TableWriter(tmp_path / "empty.parquet", schema.CLASSIFIED):
        pass
    assert pl.read_parquet(tmp_path / "empty.parquet").schema == schema.empty(schema.CLASSIFIED).schema


def test_table_writer_rejects_a_batch_that_breaks_the_contract(tmp_path):
    _, classified = tau_inputs(range(2))
    with pytest.raises(schema.SchemaError, match="severity"), TableWriter(tmp_path / "t.parquet", schema.CLASSIFIED) as w:
        w.write(classified.with_columns(pl.col("severity").cast(pl.String)))
    assert not list(tmp_path.iterdir())


def _run(tmp_path, server, out: str, batch_rows: int) -> None:
    path = write_params(tmp_path / f"params-{out}.yaml", server, llm={"concurrency": 4}, io={"batch_rows": batch_rows})
    assert main(["run", "--input", str(TAU), "--out", str(tmp_path / out), "--limit", "120",
                 "--params", str(path)]) == 0


@pytest.mark.slow
def test_a_run_in_batches_of_7_rows_gives_the_same_dataset(tmp_path, llm_server):
    _run(tmp_path, llm_server, "whole", 100_000)
    calls = len(llm_server.requests)
    _run(tmp_path, llm_server, "batched", 7)
    assert len(llm_server.requests) == calls  # same prompts: every answer came from the cache
    whole, batched = tmp_path / "whole", tmp_path / "batched"
    assert pq.ParquetFile(batched / "01_classified.parquet").metadata.num_row_groups == 120 // 7 + 1
    a = json.loads((whole / "summary.json").read_text())
    assert set(a["exports"]["files"]) >= {"sft.jsonl", "dpo.jsonl", "sharegpt.jsonl", "llamafactory/dataset_info.json",
                                           "trl/sft.jsonl", "trl/dpo.jsonl"}
    assert any(name.startswith("hf/data/preference-") for name in a["exports"]["files"])
    for name in a["exports"]["files"]:
        assert (whole / name).read_bytes() == (batched / name).read_bytes(), name
    for name in ("00_trajectories.parquet", "01_classified.parquet", "02_extracted.parquet", "04_verified.parquet",
                 "quarantine.parquet", "rejected.parquet"):
        assert pl.read_parquet(whole / name).equals(pl.read_parquet(batched / name)), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, batched))
    assert a["reconciliation"]["ok"] and b["stages"] == a["stages"] and b["exports"] == a["exports"]
    assert a["exports"]["dpo"] > 0 and a["stages"]["package"]["success_samples"] > 0
