"""The LLM budget holds across the per-stage processes of `agenther stage` / `dvc repro`.

`agenther run` shares one Budget between the stages; `agenther stage NAME` starts every
stage with a fresh one, so it first charges it with what the earlier LLM stages of the work
folder recorded. The same token budget must then leave the same records undone both ways.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, write_params

from agenther.cli import main
from agenther.llm import BUDGET_EXHAUSTED
from agenther.workdir import STAGES, read_stats

LIMIT = 12


def _params(tmp_path: Path, api_base: str, name: str, **llm) -> str:
    return str(write_params(tmp_path / f"params-{name}.yaml", api_base, cache=tmp_path / f"cache-{name}",
                            ingest={"input": str(TAU), "limit": LIMIT},
                            llm={"max_retries": 1, "concurrency": 1} | llm))


def _run(tmp_path: Path, api_base: str, name: str, **llm) -> Path:
    out = tmp_path / name
    assert main(["run", "--out", str(out), "--params", _params(tmp_path, api_base, name, **llm)]) == 0
    return out


def _stages(tmp_path: Path, api_base: str, name: str, capsys, **llm) -> tuple[Path, dict]:
    """Every stage through the CLI entry point, each with its own LLMs (a fresh Budget), as dvc does."""
    params, work, out = _params(tmp_path, api_base, name, **llm), tmp_path / name, tmp_path / f"{name}-out"
    printed = {}
    for stage in STAGES:
        capsys.readouterr()
        assert main(["stage", stage, "--params", params, "--work", str(work), "--out", str(out)]) == 0
        printed |= json.loads(capsys.readouterr().out)
    return work, printed


def _outcome(folder: Path) -> tuple[dict, list]:
    rejected = pl.read_parquet(folder / "04_verify_rejected.parquet")
    verified = pl.read_parquet(folder / "04_verified.parquet").sort("id")
    return dict(Counter(rejected["reason"].to_list())), list(zip(verified["id"], verified["verified"], strict=True))


@pytest.mark.slow
def test_budget_spent_by_relabel_stops_verify_in_a_separate_stage_process(tmp_path, llm_server, capsys):
    full = _run(tmp_path, llm_server.api_base, "full")
    relabel_tokens = sum(read_stats(full, "relabel")["usage"][k] for k in ("prompt_tokens", "completion_tokens"))
    verify_calls = read_stats(full, "verify")["usage"]["calls"]
    assert relabel_tokens > 0 and verify_calls > 2
    # Relabel alone nearly exhausts it: one more call (verify's first) reaches the cap.
    budget = relabel_tokens + 1

    one = _run(tmp_path, llm_server.api_base, "one-process", budget_tokens=budget)
    work, printed = _stages(tmp_path, llm_server.api_base, "per-stage", capsys, budget_tokens=budget)

    for folder in (one, work):
        assert read_stats(folder, "relabel")["usage"] == read_stats(full, "relabel")["usage"]  # under the cap
        verify = read_stats(folder, "verify")["usage"]
        assert verify["calls"] == 1 and verify["budget_refused"] > 0, folder.name
        reasons, _ = _outcome(folder)
        assert reasons.get(BUDGET_EXHAUSTED, 0) > 0, (folder.name, reasons)
    assert _outcome(work) == _outcome(one)  # the same records left undone, the same verdicts

    # What each stage process started from is on record.
    carried = read_stats(work, "verify")["budget_carried_in"]
    assert carried == {"from": ["classify", "extract", "relabel"], "tokens": relabel_tokens, "usd": 0.0}
    assert printed["verify"]["budget_carried_in"] == carried
    assert read_stats(work, "relabel")["budget_carried_in"]["tokens"] == 0  # rule-mode classify/extract
    summary = json.loads((tmp_path / "per-stage-out" / "summary.json").read_text())
    assert summary["llm"]["budget"]["exhausted"] is True
    assert summary["llm"]["budget"]["records_left_undone"]["verify"] == _outcome(work)[0][BUDGET_EXHAUSTED]
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    assert "budget_carried_in" not in read_stats(one, "verify")  # one process, one Budget: nothing carried


def test_without_a_budget_the_stages_match_the_one_process_run(tmp_path, llm_server, capsys):
    """Carrying the spending in changes nothing when there is no cap (a guard against a budget
    that is charged but never limited turning into refusals)."""
    one = _run(tmp_path, llm_server.api_base, "one-process")
    work, _ = _stages(tmp_path, llm_server.api_base, "per-stage", capsys)
    assert _outcome(work) == _outcome(one)
    assert read_stats(work, "verify")["usage"]["budget_refused"] == 0
    assert read_stats(work, "verify")["budget_carried_in"]["tokens"] > 0
