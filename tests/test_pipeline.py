"""The `agenther run` command end to end, with LLM answers from a scripted HTTP server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, write_params
from llm_server import Reply, careful_brain

from agenther.cli import main

# dpo.jsonl only where there are pairs (a file with no rows is not written): checked where there are
OUTPUTS = ("sft.jsonl", "sharegpt.jsonl", "trl/sft.jsonl", "openai/sft.jsonl", "summary.json", "dataset_card.md",
           "00_trajectories.parquet", "01_classified.parquet", "02_extracted.parquet",
           "03_relabeled.parquet", "04_verified.parquet", "rejected.parquet")


def _params_file(tmp_path: Path, api_base: str, cache: str) -> str:
    return str(write_params(tmp_path / f"params-{cache}.yaml", api_base, cache=tmp_path / cache,
                            llm={"max_retries": 3, "concurrency": 4}))


def _run(tmp_path, server, out: str, cache: str = "cache", limit: int = 16) -> int:
    return main(["run", "--input", str(TAU), "--format", "auto", "--out", str(tmp_path / out),
                 "--limit", str(limit), "--params", _params_file(tmp_path, server.api_base, cache)])


@pytest.mark.slow
def test_run_writes_every_output_and_reconciles(tmp_path, llm_server):
    # 60 records: tau-bench's file holds trial 0 of tasks 0-49 first, so tasks 0-9 get two trials.
    assert _run(tmp_path, llm_server, "out", limit=60) == 0
    out = tmp_path / "out"
    for name in OUTPUTS:
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["ingest"]["in"] == 60
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    # Every failure is accounted for: accepted into the dataset or rejected with a reason.
    rejected = pl.read_parquet(out / "rejected.parquet")
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    hindsight = [s for s in sft if s["metadata"]["kind"] == "hindsight"]
    assert stages["classify"]["failures"] == len(hindsight) + rejected.height
    assert hindsight, "the scripted careful relabeler should get some samples through"
    assert summary["llm"]["total"]["calls"] == len(llm_server.requests)
    # The gate counts are the tables' rows: relabels that passed the gate are 03_relabeled's rows,
    # those the judges passed are 04_verified's verified rows; the scripted judges turn some down.
    relabeled = pl.read_parquet(out / "03_relabeled.parquet")
    verified = pl.read_parquet(out / "04_verified.parquet")
    gates = summary["gates"]
    assert gates["passed_confidence_gate"] == relabeled.height == verified.height
    assert gates["passed_judges"] == verified["verified"].sum() == stages["verify"]["out"]
    assert 0 < gates["passed_judges"] < gates["passed_confidence_gate"]
    judge_rejected = rejected.filter(pl.col("stage") == "verify")
    assert judge_rejected.height == verified.height - gates["passed_judges"]
    assert set(judge_rejected["id"]) == set(verified.filter(~pl.col("verified"))["id"])
    # tau-bench has 4 trials per task: successes and failures of one task make natural pairs.
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    assert any(d["metadata"]["kind"] == "natural" for d in dpo)


def test_identical_inputs_give_byte_identical_outputs_and_rerun_makes_no_calls(tmp_path, llm_server):
    assert _run(tmp_path, llm_server, "a", cache="cache-a") == 0
    calls_cold = len(llm_server.requests)
    assert _run(tmp_path, llm_server, "b", cache="cache-b") == 0  # fresh cache: every call again
    assert len(llm_server.requests) == 2 * calls_cold
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # Same cache again: zero calls, same datasets.
    assert _run(tmp_path, llm_server, "c", cache="cache-a") == 0
    assert len(llm_server.requests) == 2 * calls_cold
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["llm"]["total"]["calls"] == 0 and summary["llm"]["total"]["cache_hits"] > 0
    exported = json.loads((tmp_path / "a" / "summary.json").read_text())["exports"]["files"]
    for name in (*exported, "04_verified.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_transient_faults_are_retried(tmp_path, llm_server):
    faults = iter([Reply("busy", status=500), Reply("slow down", status=429, headers={"Retry-After": "0"}),
                   Reply("bad gateway", status=503)])

    def flaky(request):
        return next(faults, None) or careful_brain(request)

    llm_server.brain = flaky
    assert _run(tmp_path, llm_server, "out", limit=8) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["llm"]["total"]["retries"] == 3
    assert summary["reconciliation"]["ok"]


@pytest.mark.slow
def test_unreachable_llm_is_a_one_line_fatal_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    params = _params_file(tmp_path, f"http://127.0.0.1:{port}/v1", "cache")
    code = main(["run", "--input", str(TAU), "--out", str(tmp_path / "out"), "--limit", "8", "--params", params])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "unreachable" in err


@pytest.mark.parametrize("args,message", [
    (["--input", "no/such/file.json"], "no/such/file.json"),
    (["--input", str(TAU), "--params", "missing.yaml"], "missing.yaml"),
])
def test_fatal_input_errors_name_the_problem(tmp_path, capsys, args, message):
    code = main(["run", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_broken_lines_are_quarantined_and_counts_reconcile(tmp_path, llm_server):
    records = json.loads(TAU.read_text())[:6]
    lines = [json.dumps({"id": f"r{i}", "messages": r["traj"], "reward": r["reward"]}) for i, r in enumerate(records)]
    lines.insert(2, lines[0][: len(lines[0]) // 2])           # truncated JSON
    lines.insert(4, json.dumps({"id": "bad", "messages": "not a list"}))  # wrong type
    path = tmp_path / "logs.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    code = main(["run", "--input", str(path), "--format", "messages", "--out", str(tmp_path / "out"),
                 "--map", "id_path=id", "--map", "reward_path=reward",
                 "--params", _params_file(tmp_path, llm_server.api_base, "cache")])
    assert code == 0
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert quarantine.height == 3
    assert all(p.startswith("line ") for p in quarantine["record_pointer"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["ingest"] == {"in": 9, "out": 6, "quarantined": 3}
    assert summary["reconciliation"]["ok"]
