"""Relabel and verify fused (one concurrent map, no stage barrier) give exactly the tables of the
two stages run one after the other; `agenther run` fuses them unless the run has a budget; an
LLM stage whose inputs, params, code and outputs are unchanged is skipped on a rerun."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, make_params
from llm_server import careful_brain, prompt_kind

from agenther.llm import LLMs
from agenther.pipeline import run
from agenther.runner import run_stage, run_stages
from agenther.workdir import STATS, TABLES, read_stats

OUTPUTS = ("relabeled", "relabel_rejected", "verified", "verify_rejected")


def fused_stages(params: dict, work: Path, llms: LLMs) -> dict:
    return run_stages(("relabel", "verify"), params, work, work, llms, fuse=True)


def untimed(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "seconds"}  # the stage's wall time differs, by design


def mixed_brain(request: dict):
    """careful_brain, except that some relabels come back unsure (at the first attempt only, or
    at every attempt) and the trajectory judge turns down about a third of the prompts."""
    kind, text = prompt_kind(request), request["messages"][0]["content"]
    crc = zlib.crc32(text.encode())
    if kind == "relabel" and (crc % 4 == 0 and request["seed"] == 0 or crc % 11 == 0):
        return json.dumps({"hindsight_prompt": "Please change my flight booking today.", "confidence": 0.1,
                           "rationale": "unsure"})
    if kind == "judge_trajectory" and crc % 3 == 0:
        return json.dumps({"satisfied": False, "consistent_with_user": True, "confidence": 0.9, "reason": "no"})
    return careful_brain(request)


@pytest.fixture
def extracted(tmp_path, llm_server) -> Path:
    """The tau-bench sample through ingest, classify and extract (rule mode: no LLM call)."""
    llm_server.brain = mixed_brain
    base = tmp_path / "base"
    params = make_params(tmp_path, llm_server, ingest={"input": str(TAU), "format": "tau-bench"})
    with LLMs.from_params(params) as llms:
        for name in ("ingest", "classify", "extract"):
            run_stage(name, params, base, base, llms)
    assert pl.read_parquet(base / TABLES["extracted"]).height >= 25  # 30 of the 116 failures have a goal
    assert not llm_server.requests
    return base


def _params(tmp_path: Path, server, cache: str, **llm) -> dict:
    return make_params(tmp_path, server, ingest={"input": str(TAU), "format": "tau-bench"},
                       llm={"cache_dir": str(tmp_path / cache), "concurrency": 8} | llm)


def _bodies(requests: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in requests)


def test_fused_relabel_verify_writes_the_tables_of_the_two_stages(tmp_path, llm_server, extracted):
    staged, fused = tmp_path / "staged", tmp_path / "fused"
    shutil.copytree(extracted, staged)
    shutil.copytree(extracted, fused)

    with LLMs.from_params(_params(tmp_path, llm_server, "cache-staged")) as llms:
        params = _params(tmp_path, llm_server, "cache-staged")
        run_stage("relabel", params, staged, staged, llms)
        run_stage("verify", params, staged, staged, llms)
    staged_requests = list(llm_server.requests)
    llm_server.requests.clear()
    params = _params(tmp_path, llm_server, "cache-fused")
    with LLMs.from_params(params) as llms:
        returned = fused_stages(params, fused, llms)

    for name in OUTPUTS:  # byte for byte
        assert (fused / TABLES[name]).read_bytes() == (staged / TABLES[name]).read_bytes(), name
    for stage in ("relabel", "verify"):
        assert read_stats(fused, stage) == returned[stage]
        assert untimed(read_stats(fused, stage)) == untimed(read_stats(staged, stage))
        assert (fused / "gates" / f"{'extracted' if stage == 'relabel' else 'relabeled'}.json").exists()
    # The same prompts were asked, each once (the fused path only changes their order).
    assert _bodies(llm_server.requests) == _bodies(staged_requests)
    # The scripted brain exercised every outcome: retried relabels, rejections in both stages.
    relabeled = pl.read_parquet(fused / TABLES["relabeled"])
    verified = pl.read_parquet(fused / TABLES["verified"])
    assert relabeled["relabel_attempts"].max() > 1
    assert pl.read_parquet(fused / TABLES["relabel_rejected"]).height > 0
    assert 0 < verified["verified"].sum() < verified.height
    assert {"rejected_by_trajectory"} <= set(pl.read_parquet(fused / TABLES["verify_rejected"])["reason"])


def _kinds(requests: list[dict]) -> list[str]:
    return [prompt_kind(r) for r in requests]


@pytest.mark.parametrize("budget", [None, 10**9])
def test_agenther_run_fuses_relabel_and_verify_unless_there_is_a_budget(tmp_path, llm_server, budget):
    llm_server.brain = mixed_brain  # the gates turn down a judge that accepts everything
    params = make_params(tmp_path, llm_server, ingest={"input": str(TAU), "format": "tau-bench", "limit": 30},
                         llm={"concurrency": 1, "budget_tokens": budget})
    summary = run(params, tmp_path / "out")
    assert summary["reconciliation"]["ok"]
    kinds = _kinds(llm_server.requests)
    last_relabel = max(i for i, k in enumerate(kinds) if k == "relabel")
    first_judge = kinds.index("judge_trajectory")
    if budget is None:  # one record at a time: relabel (if it needs a writer), its judges, the next record
        assert first_judge < last_relabel
        assert set(kinds[:first_judge]) <= {"relabel"}  # the first record's attempts (if any), then its judges
    else:  # a budget keeps the stage order, as `agenther stage` and dvc run it
        assert last_relabel < first_judge


def test_a_rerun_skips_unchanged_llm_stages_and_only_those(tmp_path, llm_server, extracted):
    work = tmp_path / "work"
    shutil.copytree(extracted, work)
    params = _params(tmp_path, llm_server, "cache")
    with LLMs.from_params(params) as llms:
        fused_stages(params, work, llms)
    calls = len(llm_server.requests)
    tables = {name: (work / TABLES[name]).read_bytes() for name in OUTPUTS}
    cold = {stage: read_stats(work, stage) for stage in ("relabel", "verify")}
    assert cold["relabel"]["usage"]["calls"] > 0

    # Unchanged: nothing is read, gated or asked, not even the LLM cache.
    shutil.rmtree(tmp_path / "cache")
    (work / "gates" / "relabeled.json").unlink()
    with LLMs.from_params(params) as llms:
        warm = fused_stages(params, work, llms)
        assert llms.usage() == {}
    assert len(llm_server.requests) == calls
    assert {name: (work / TABLES[name]).read_bytes() for name in OUTPUTS} == tables
    for stage in ("relabel", "verify"):
        assert warm[stage] == read_stats(work, stage)
        assert warm[stage]["unchanged"] is True and warm[stage]["usage"]["calls"] == 0
        assert {k: warm[stage][k] for k in ("in", "out", "rejected")} == {k: cold[stage][k] for k in ("in", "out", "rejected")}
    assert not (work / "gates" / "relabeled.json").exists()  # the gate did not run again

    # An output changed behind the stage's back: that stage runs again (here from the LLM
    # cache, gone, so it asks the server), the upstream one stays skipped.
    pl.read_parquet(work / TABLES["verified"]).head(3).write_parquet(work / TABLES["verified"])
    with LLMs.from_params(params) as llms:
        again = fused_stages(params, work, llms)
    assert again["relabel"].get("unchanged") and not again["verify"].get("unchanged")
    assert again["verify"]["usage"]["calls"] > 0 and len(llm_server.requests) > calls
    assert (work / TABLES["verified"]).read_bytes() == tables["verified"]
    assert (work / "gates" / "relabeled.json").exists()

    # A param change reruns both (the stamp covers the whole params).
    changed = _params(tmp_path, llm_server, "cache")
    changed.relabel.confidence_threshold = 0.85
    with LLMs.from_params(changed) as llms:
        rerun = fused_stages(changed, work, llms)
        usage = llms.usage()
    assert not rerun["relabel"].get("unchanged") and not rerun["verify"].get("unchanged")
    assert usage["relabel"].calls + usage["relabel"].cache_hits == cold["relabel"]["usage"]["calls"]

    # The separate stages honour the same stamps.
    with LLMs.from_params(changed) as llms:
        assert run_stage("relabel", changed, work, work, llms)["unchanged"]
        assert run_stage("verify", changed, work, work, llms)["unchanged"]
        assert llms.usage() == {}


def test_a_stage_that_left_records_undone_is_not_skipped(tmp_path, llm_server, extracted):
    work = tmp_path / "work"
    shutil.copytree(extracted, work)
    params = _params(tmp_path, llm_server, "cache", budget_tokens=3000)
    for _ in range(2):
        with LLMs.from_params(params) as llms:
            stats = run_stage("relabel", params, work, work, llms)
        assert not stats.get("unchanged")
        assert "budget_exhausted" in set(pl.read_parquet(work / TABLES["relabel_rejected"])["reason"])
        assert not (work / "stamps" / "relabel.json").exists()
    assert (work / STATS["relabel"]).exists()
