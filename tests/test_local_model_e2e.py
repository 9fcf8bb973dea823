"""End to end through the real local models: llama.cpp serving SmolLM2-135M (fast, weak: the real
path, whatever it answers) and the embedded default Qwen2.5-Coder-1.5B (real samples from real logs),
each started by agenther."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import TAU, write_params

from agenther.cli import main
from agenther.export.schemas import validate_dpo, validate_sft, validate_sharegpt
from agenther.stages.relabel import ruled_and_written

pytestmark = pytest.mark.slow  # whole runs on the real local models

JUDGES = ["replay", "coverage", "grounding", "coherence", "policy", "trajectory", "evidence"]


def test_run_through_the_real_local_model(tmp_path):
    write_params(tmp_path / "params.yaml", llm={"model": "local", "local_model": "smollm2-135m", "context_tokens": 1536,
                                                "max_tokens": 200, "concurrency": 1},
                 relabel={"max_attempts": 2})
    out = tmp_path / "out"
    code = main(["run", "--input", str(TAU), "--out", str(out), "--limit", "6", "--params", str(tmp_path / "params.yaml")])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    relabel = summary["llm"]["relabel"]
    # the model really answered, for each conversation that needed a writer (the others: rules)
    extracted = pl.read_parquet(out / "02_extracted.parquet").to_dicts()
    written = sum(bool(ruled_and_written(r)[1]) for r in extracted)
    assert written > 0 and relabel["calls"] + relabel["cache_hits"] >= written
    assert relabel["prompt_tokens"] > 0 and relabel["completion_tokens"] > 0
    assert summary["lineage"]["models"]["relabel"] == "local/smollm2-135m"
    assert any("small embedded model" in note for note in summary["notes"])
    # Whatever the small model produced, nothing unverified reaches the dataset.
    verified = pl.read_parquet(out / "04_verified.parquet")
    for row in verified.iter_rows(named=True):
        if row["verified"]:
            assert all(j["accept"] for j in row["judgements"])
            assert [j["judge"] for j in row["judgements"]] == JUDGES
    for name, validate in (("sft.jsonl", validate_sft), ("dpo.jsonl", validate_dpo),
                           ("sharegpt.jsonl", validate_sharegpt)):
        # a file with no rows is not written (6 records, one trial per task: no pairs, no dpo.jsonl)
        lines = (out / name).read_text().splitlines() if (out / name).exists() else []
        assert lines or name in summary["exports"]["not_written"], name
        for line in lines:
            validate(json.loads(line))


# tau-bench tasks whose failed runs achieved a short goal (a cabin upgrade; an upgrade with a flight
# change): the embedded model got them through every judge in bench/quality.py.
DEFAULT_MODEL_TASKS = (4, 22)


def test_the_embedded_default_model_yields_accepted_samples_from_real_logs(tmp_path):
    records = [r for r in json.loads(TAU.read_text()) if r["task_id"] in DEFAULT_MODEL_TASKS]
    logs = tmp_path / "logs" / "gpt-4o-airline.json"  # the shipped file's name: the same record ids
    logs.parent.mkdir()
    logs.write_text(json.dumps(records))
    write_params(tmp_path / "params.yaml")  # the LLM cache in tmp_path; everything else: the shipped params.yaml
    out = tmp_path / "out"
    code = main(["run", "--input", str(logs), "--format", "tau-bench", "--out", str(out),
                 "--params", str(tmp_path / "params.yaml")])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lineage"]["models"]["relabel"] == "local/qwen2.5-coder-1.5b"
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    verified = pl.read_parquet(out / "04_verified.parquet").filter(pl.col("verified"))
    assert verified.height >= 1, pl.read_parquet(out / "rejected.parquet").to_dicts()
    for row in verified.iter_rows(named=True):  # every judge was asked, and accepted
        assert [j["judge"] for j in row["judgements"]] == JUDGES
        assert all(j["accept"] for j in row["judgements"])
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    hindsight = [r for r in sft if r["metadata"]["kind"] == "hindsight"]
    assert hindsight and all(validate_sft(r) is None for r in hindsight)
