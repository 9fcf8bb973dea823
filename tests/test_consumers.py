"""The exports, read by their real consumers: `datasets`, TRL's SFTTrainer and DPOTrainer, and
LLaMA-Factory's sharegpt loader with its dataset_info.json, on three whole runs over the shipped
data (tau-bench, ToolBench, and the folder holding both).

The pipeline runs here, in .venv, against the scripted LLM server. The consumers run in their own
environments (scripts/setup.sh --consumers: .venv-consumers with datasets + TRL + transformers,
.venv-llamafactory with LLaMA-Factory's own pins, datasets 4.0 among them), in a subprocess, on the
files the pipeline wrote: tests/consumers/check.py prints what each consumer loaded. TRL's
tokenizer is built from the embedded model's GGUF and its model from a config: nothing downloads.
A missing environment is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, TAU, TOOLBENCH, write_params
from llm_server import FakeLLMServer, careful_brain

from agenther.cli import main

CONSUMERS = ROOT / ".venv-consumers/bin/python"
LLAMAFACTORY = ROOT / ".venv-llamafactory/bin/python"
CHECK = ROOT / "tests/consumers/check.py"
STUBS = ROOT / "tests/consumers/stubs"
REPORT = "CONSUMER-REPORT "
RUNS = {"tau-bench": TAU, "toolbench": TOOLBENCH, "mixed": ROOT / "data/raw"}
SETUP_HINT = "the consumer environments are missing: run `bash scripts/setup.sh --consumers`"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One whole run per input, with the scripted LLM server: {run: its output folder}."""
    base = tmp_path_factory.mktemp("runs")
    outs = {}
    with FakeLLMServer(careful_brain) as server:
        for name, source in RUNS.items():
            params = write_params(base / f"{name}.yaml", server, cache=base / "cache", llm={"concurrency": 4})
            outs[name] = base / name
            assert main(["run", "--input", str(source), "--out", str(outs[name]), "--params", str(params)]) == 0
    return outs


def consume(python: Path, args: list[str], home: Path, **env: str) -> dict:
    assert python.exists(), SETUP_HINT
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
                    **env}
    done = subprocess.run([str(python), str(CHECK), *args], env=environment, capture_output=True, text=True,
                          timeout=900, cwd=home)
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith(REPORT)]
    return json.loads(line.removeprefix(REPORT))


def written(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["exports"]


@pytest.mark.parametrize("run", list(RUNS))
def test_no_export_is_empty_and_none_is_left_over(runs, run):
    out, exports = runs[run], written(runs[run])
    for name in exports["rows"]:
        assert (out / name).stat().st_size > 0, name
    for name in exports["not_written"]:
        assert not (out / name).exists(), name
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]


@pytest.mark.parametrize("run", list(RUNS))
def test_datasets_and_trl_load_every_row_written(runs, run, tmp_path):
    out, exports = runs[run], written(runs[run])
    lengths = exports["token_lengths"]
    assert lengths.get("files"), f"token lengths not measured: {lengths}"
    model = lengths["tokenizer"].split()[0]
    from agenther.llm.models import model_path

    report = consume(CONSUMERS, ["trl", str(out), str(model_path(model))], tmp_path)

    # datasets: every JSONL file and every Parquet split, as many rows as written
    data_files = {name: n for name, n in exports["rows"].items() if not name.endswith(".json")}
    assert report["datasets"] == data_files

    # TRL: SFTTrainer and DPOTrainer tokenize every row, none longer than the card's max_length
    # (equal to the longest row the package stage measured: the same tokenizer and template)
    trl = report["trl"]
    for kind, name in (("sft", "trl/sft.jsonl"), ("dpo", "trl/dpo.jsonl")):
        if name not in exports["rows"]:
            assert kind not in trl and name in exports["not_written"]
            continue
        got = trl[kind]
        assert got["rows_loaded"] == got["rows_tokenized"] == exports["rows"][name], (kind, got)
        assert got["longest"] <= got["max_length"] == lengths["files"][name]["max_length"], (kind, got)
        assert got["longest"] == lengths["files"][name]["max"], (kind, got)
        card = (out / "dataset_card.md").read_text()
        assert f"max_length={got['max_length']})" in card
    if "dpo" in trl:  # chosen and rejected are one assistant turn: no user or tool text is a target
        assert trl["dpo"]["completions_with_user_or_tool_text"] == 0
    assert ("dpo" in trl) == (run != "toolbench")  # ToolBench's logs hold one trial per task: no pairs


@pytest.mark.parametrize("run", list(RUNS))
def test_llamafactory_loads_every_row_through_its_dataset_info(runs, run, tmp_path):
    out, exports = runs[run], written(runs[run])
    lengths = exports["token_lengths"]
    from agenther.llm.models import model_path

    gguf = model_path(lengths["tokenizer"].split()[0])
    report = consume(LLAMAFACTORY, ["llamafactory", str(out), str(gguf)], tmp_path,
                     PYTHONPATH=str(STUBS))["llamafactory"]
    cutoff_len = lengths["files"]["trl/sft.jsonl"]["max_length"]
    assert f"cutoff_len: {cutoff_len}" in (out / "dataset_card.md").read_text()
    info = json.loads((out / "llamafactory/dataset_info.json").read_text())
    assert set(report) == set(info) and info
    for dataset, entry in info.items():
        rows = exports["rows"][f"llamafactory/{entry['file_name']}"]
        got = report[dataset]
        assert got["rows_loaded"] == got["rows_json"] == rows, (dataset, got)
        assert got["dropped_by_converter"] == 0, (dataset, got)  # its converter blanks rows it cannot read
        assert set(entry["columns"].values()) <= set(got["columns"])  # the mapping matches every row
        assert got["longest"] <= cutoff_len, (dataset, got)  # its own qwen template: no sample is cut
    if run == "toolbench":
        assert set(info) == {"agenther_success"}  # no hindsight sample, so no such dataset (and no empty file)


def test_a_rerun_into_the_same_folder_is_not_served_from_the_datasets_cache(runs, tmp_path):
    """datasets caches a local folder by its config and file names: the Parquet names carry their digest."""
    import shutil

    home, folder = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    for run in ("tau-bench", "mixed"):  # the same folder, first one run's data, then another's
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(runs[run] / "hf", folder / "hf")
        expected = {name: n for name, n in written(runs[run])["rows"].items() if name.startswith("hf/")}
        assert consume(CONSUMERS, ["parquet", str(folder)], home)["datasets"] == expected, run


def test_runs_over_different_sources_load_together(runs, tmp_path):
    """tau-bench's and ToolBench's TRL and LLaMA-Factory files in one load_dataset call: the same
    columns, the same types (the annotated and OpenAI files keep OpenAI's nested `tools`: not these)."""
    outs = [runs["tau-bench"], runs["toolbench"]]
    report = consume(CONSUMERS, ["together", *map(str, outs)], tmp_path)["datasets"]
    expected: dict[str, int] = {}
    for out in outs:
        for name, n in written(out)["rows"].items():
            if name.endswith(".jsonl") and name.startswith(("trl/", "llamafactory/")):
                expected[name] = expected.get(name, 0) + n
    assert report == expected
