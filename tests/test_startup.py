"""Start-up: a rerun on which every stage is up to date skips every stage by its stamp
(agenther/workdir.py) and imports neither Great Expectations, litellm nor Prefect; a stage
whose inputs, params or outputs changed runs again, and the stages after it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, TAU, make_params

from agenther.pipeline import run
from agenther.workdir import STAGES, STATS

HEAVY = {"great_expectations", "litellm", "prefect"}
MARK = "imported heavy modules:"
# `agenther run` as its console script runs it, then which of the heavy packages it imported.
WRAPPER = f"""
import sys
from agenther.cli import main
code = main(sys.argv[1:])
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(HEAVY)!r}))
print({MARK!r}, " ".join(heavy))
sys.exit(code)
"""
# 12 records, one trial per task: no preference pairs, so no dpo.jsonl (a file with no rows is not written)
EXPORTS = ("sft.jsonl", "sharegpt.jsonl", "trl/sft.jsonl", "summary.json", "dataset_card.md", "rejected.parquet")


def _run_cli(args: list[str]) -> tuple[dict, set[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed, _, heavy = done.stdout.rpartition(MARK)
    return json.loads(printed), set(heavy.split())


def test_a_rerun_with_every_stage_up_to_date_imports_no_heavy_library(tmp_path, llm_server):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"llm": {"model": "openai/local", "api_base": llm_server.api_base,
                                              "cache_dir": str(tmp_path / "cache"), "concurrency": 4}}))
    out = tmp_path / "out"
    args = ["run", "--input", str(TAU), "--out", str(out), "--limit", "12", "--params", str(params)]

    cold, cold_heavy = _run_cli(args)
    calls = len(llm_server.requests)
    assert calls > 0 and cold["llm_calls"] == calls and not cold["up_to_date"]
    assert {"great_expectations", "litellm"} <= cold_heavy  # what the check sees when they are used
    before = {name: (out / name).read_bytes() for name in EXPORTS}

    warm, warm_heavy = _run_cli(args)
    assert warm_heavy == set(), f"an up-to-date rerun imported {sorted(warm_heavy)}"
    assert warm["up_to_date"] and warm["llm_calls"] == 0 and len(llm_server.requests) == calls
    assert {k: warm[k] for k in ("records_in", "failures", "passed_judges", "exports")} == \
        {k: cold[k] for k in ("records_in", "failures", "passed_judges", "exports")}
    assert {name: (out / name).read_bytes() for name in EXPORTS} == before


def _ran(out: Path, summary: dict) -> list[str]:
    """The stages that ran in the last run (a skipped one says so in its stats file)."""
    skipped = {s for s in STATS if json.loads((out / STATS[s]).read_text()).get("unchanged")}
    if summary.get("unchanged"):
        skipped.add("package")
    return [s for s in STAGES if s not in skipped]


def test_a_stage_runs_again_when_its_inputs_params_or_outputs_change_and_so_do_the_later_ones(
        tmp_path, llm_server):
    logs = tmp_path / "logs.json"
    shutil.copy(TAU, logs)
    out = tmp_path / "out"
    params = make_params(tmp_path, llm_server, ingest={"input": str(logs), "limit": 8})

    assert _ran(out, run(params, out)) == list(STAGES)
    assert _ran(out, run(params, out)) == []
    calls = len(llm_server.requests)

    # Any parameter: every stamp covers the whole params, so every stage runs again (relabel and
    # verify from the LLM cache).
    changed = params.model_copy(deep=True)
    changed.package.weight_alpha = 0.25
    assert _ran(out, run(changed, out)) == list(STAGES)
    assert _ran(out, run(changed, out)) == []
    assert len(llm_server.requests) == calls  # relabel and verify were answered from the cache

    # An output changed behind the stage's back: that stage runs again, the later ones see the same
    # table again (classify rewrites it byte for byte) and stay skipped.
    (out / "01_classified.parquet").write_bytes(b"not a table")
    assert _ran(out, run(changed, out)) == ["classify"]
    (out / "sft.jsonl").unlink()
    assert _ran(out, run(changed, out)) == ["package"]
    assert (out / "sft.jsonl").exists()

    # The logs changed: ingest runs again, and whatever its new table changes.
    records = json.loads(logs.read_text())
    records[0]["traj"][0]["content"] += " (edited)"
    logs.write_text(json.dumps(records))
    assert _ran(out, run(changed, out))[:2] == ["ingest", "classify"]
    assert _ran(out, run(changed, out)) == []
