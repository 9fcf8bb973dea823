"""End to end through the real local model: llama.cpp serving SmolLM2-135M, started by agenther."""

from __future__ import annotations

import json

import polars as pl
import yaml
from conftest import TAU

from agenther.cli import main
from agenther.export_schemas import validate_dpo, validate_sft, validate_sharegpt


def test_run_through_the_real_local_model(tmp_path):
    params = {
        "llm": {"model": "local", "local_model": "smollm2-135m", "cache_dir": str(tmp_path / "cache"),
                "context_tokens": 1536, "max_tokens": 200, "concurrency": 1},
        "relabel": {"max_attempts": 2},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    code = main(["run", "--input", str(TAU), "--out", str(out), "--limit", "6", "--params", str(tmp_path / "params.yaml")])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    relabel = summary["llm"]["relabel"]
    assert relabel["calls"] >= summary["stages"]["relabel"]["in"] > 0  # the model really answered
    assert relabel["prompt_tokens"] > 0 and relabel["completion_tokens"] > 0
    assert summary["lineage"]["models"]["relabel"] == "local/smollm2-135m"
    assert any("small embedded model" in note for note in summary["notes"])
    # Whatever the small model produced, nothing unverified reaches the dataset.
    verified = pl.read_parquet(out / "04_verified.parquet")
    for row in verified.iter_rows(named=True):
        if row["verified"]:
            assert all(j["accept"] for j in row["judgements"]) and len(row["judgements"]) == 3
    for name, validate in (("sft.jsonl", validate_sft), ("dpo.jsonl", validate_dpo),
                           ("sharegpt.jsonl", validate_sharegpt)):
        for line in (out / name).read_text().splitlines():
            validate(json.loads(line))
