"""The exports, read by their real consumers: `datasets`, TRL's SFTTrainer and DPOTrainer, and
LLaMA-Factory's sharegpt loader with its dataset_info.json, on three whole runs over the shipped
data (tau-bench, ToolBench, and the folder holding both). What each trainer's own data path labels
is compared, row by row, with the turns the annotated files weigh 1 (tests/consumers/check.py
`Turns`), and the shipped SmolLM2-135M trains a few steps with TRL on the tau-bench export.

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
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, TAU, TOOLBENCH, write_params
from llm_server import FakeLLMServer, careful_brain

from agenther.cli import main
from agenther.llm.models import model_path

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


@pytest.fixture(scope="module", autouse=True)
def tokenizers(tmp_path_factory):
    """Where check.py keeps the tokenizers it reads from GGUF files (~25 s each), for every call here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONSUMER_TOKENIZERS", str(tmp_path_factory.mktemp("tokenizers")))
        yield


@pytest.fixture(scope="module")
def reports(runs, tmp_path_factory):
    """(consumer, run) -> what check.py reported for that run's export, each asked once."""
    cache: dict[tuple[str, str], dict] = {}

    def report(consumer: str, run: str) -> dict:
        if (consumer, run) not in cache:
            out, home = runs[run], tmp_path_factory.mktemp(f"{consumer}-{run}")
            gguf = str(tokenizer_model(out))
            cache[(consumer, run)] = (consume(CONSUMERS, ["trl", str(out), gguf], home) if consumer == "trl" else
                                      consume(LLAMAFACTORY, ["llamafactory", str(out), gguf], home,
                                              PYTHONPATH=str(STUBS)))
        return cache[(consumer, run)]

    return report


def tokenizer_model(out: Path) -> Path:
    """The GGUF of the tokenizer the package stage measured the run's token lengths with."""
    lengths = written(out)["token_lengths"]
    assert lengths.get("files"), f"token lengths not measured: {lengths}"
    return model_path(lengths["tokenizer"].split()[0])


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
def test_datasets_and_trl_load_every_row_written(runs, run, reports):
    out, exports = runs[run], written(runs[run])
    lengths = exports["token_lengths"]
    report = reports("trl", run)

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
def test_llamafactory_loads_every_row_through_its_dataset_info(runs, run, reports):
    out, exports = runs[run], written(runs[run])
    lengths = exports["token_lengths"]
    report = reports("llamafactory", run)["llamafactory"]
    cutoff_len = int(re.search(r"cutoff_len: (\d+)", (out / "dataset_card.md").read_text()).group(1))
    assert cutoff_len >= max(v["max_length"] for v in lengths["files"].values())  # no less than measured
    info = json.loads((out / "llamafactory/dataset_info.json").read_text())
    assert set(report) == set(info) and info
    for dataset, entry in info.items():
        rows = exports["rows"][f"llamafactory/{entry['file_name']}"]
        got = report[dataset]
        assert got["rows_loaded"] == got["rows_json"] == rows, (dataset, got)
        assert got["dropped_by_converter"] == 0, (dataset, got)  # its converter blanks rows it cannot read
        assert set(entry["columns"].values()) <= set(got["columns"])  # the mapping matches every row
        assert got["longest"] < cutoff_len, (dataset, got)  # its own qwen template: no sample is cut (a cut one
        # would be cutoff_len long)
    if run == "toolbench":
        assert set(info) == {"agenther_success"}  # no hindsight sample, so no such dataset (and no empty file)


def annotated(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]


def weighed_turns(out: Path) -> tuple[int, int]:
    """(turns weighing 1, turns weighing 0) over the assistant turns of the annotated sft.jsonl (a
    success's turns carry no weight: they all train)."""
    weights = [m.get("weight", 1) for r in annotated(out, "sft.jsonl") for m in r["messages"]
               if m["role"] == "assistant"]
    return sum(w == 1 for w in weights), sum(w == 0 for w in weights)


def assert_exactly_the_weight_1_turns(labels: dict) -> None:
    """Every row a prefix of its sample; every labelled token inside a model turn; every weight-1
    turn trained whole, exactly once; no weight-0 turn trained at all."""
    assert labels.get("rows_not_a_prefix_of_their_sample", 0) == 0, labels
    assert labels.get("labelled_tokens_outside_model_turns", 0) == 0, labels  # no system, user or tool text
    assert labels["weight_0_turns_trained"] == 0, labels
    assert labels["weight_1_turns_never_trained"] == 0, labels
    assert labels["weight_1_turns_trained_more_than_once"] == labels["turns_trained_in_part"] == 0, labels


@pytest.mark.parametrize("run", list(RUNS))
def test_trl_trains_exactly_the_weight_1_turns(runs, run, reports):
    """SFTTrainer's own tokenization and labels (the card's SFTConfig) of every row of trl/sft.jsonl,
    against the annotated sft.jsonl's per-turn weights."""
    out = runs[run]
    labels = reports("trl", run)["trl"]["sft"]["labels"]
    ones, zeros = weighed_turns(out)
    assert (labels["samples"], labels["weight_1_turns"], labels["weight_0_turns"]) == (
        len(annotated(out, "sft.jsonl")), ones, zeros), labels
    assert_exactly_the_weight_1_turns(labels)
    assert labels["rows"] == written(out)["rows"]["trl/sft.jsonl"] == ones  # one row per trained turn
    if run == "tau-bench":  # the careful relabeler's samples keep failed and repeated calls as context
        assert zeros > 0


@pytest.mark.parametrize("run", list(RUNS))
def test_llamafactory_trains_exactly_the_weight_1_turns(runs, run, reports):
    """LLaMA-Factory's own supervised preprocessing (its qwen template, with the card's mask_history
    and cutoff_len) of every row of llamafactory/, against the annotated sharegpt.jsonl's turn weights."""
    out = runs[run]
    labels = reports("llamafactory", run)["labels"]
    model_turns = [w for r in annotated(out, "sharegpt.jsonl")
                   for t, w in zip(r["conversations"], r["metadata"].get("turn_weights") or [1] * len(r["conversations"]),
                                   strict=True) if t["from"] in ("gpt", "function_call")]
    assert (labels["weight_1_turns"], labels["weight_0_turns"]) == (sum(model_turns), model_turns.count(0)), labels
    assert_exactly_the_weight_1_turns(labels)
    assert labels["mask_history"] is True  # what the card tells LLaMA-Factory users to set
    lf_rows = sum(n for name, n in written(out)["rows"].items() if name.startswith("llamafactory/") and
                  name.endswith(".jsonl"))
    assert labels["rows"] == lf_rows == sum(model_turns)


def test_sample_weights_load_in_every_consumer(runs, reports):
    """`sample_weight` loads as a float column from every TRL, LLaMA-Factory and Parquet file of the
    tau-bench run, sums to what the annotated rows give, and the card's resampling recipe runs on it."""
    out = runs["tau-bench"]
    sft, sharegpt, dpo = (annotated(out, f) for f in ("sft.jsonl", "sharegpt.jsonl", "dpo.jsonl"))

    def trained(r: dict) -> int:
        return sum(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in r["messages"])

    expected = {"trl/sft.jsonl": (sum(r["weight"] * trained(r) for r in sft), sum(map(trained, sft))),
                "trl/dpo.jsonl": (sum(r["weight"] for r in dpo), len(dpo))}
    for kind in ("hindsight", "success"):
        rows = [r for r in sft if r["metadata"]["kind"] == kind]
        expected[f"hf/data/{kind}"] = (sum(r["weight"] for r in rows), len(rows))
    expected["hf/data/preference"] = expected["trl/dpo.jsonl"]
    got = reports("trl", "tau-bench")["sample_weights"]
    assert {name.rsplit("-", 1)[0] if name.startswith("hf/") else name for name in got} == set(expected)
    for name, info in got.items():
        weight_sum, rows = expected[name.rsplit("-", 1)[0] if name.startswith("hf/") else name]
        assert info["dtype"] == "Value('float64')" and info["rows"] == info["resampled_rows"] == rows, (name, info)
        assert info["sum"] == pytest.approx(weight_sum), (name, info)
        if "message_weights" in info:  # the Parquet sft config: every assistant message has its 0/1
            assert not {k for k in info["message_weights"] if k.startswith("assistant:") and k != "assistant:0"
                        and k != "assistant:1"}, info
            assert info["message_weights"].get("assistant:1") and set(info["message_weights"]) >= {"other:None"}
    for dataset, info in reports("llamafactory", "tau-bench")["llamafactory"].items():
        rows = [r for r in sharegpt if r["metadata"]["kind"] == dataset.removeprefix("agenther_")]
        turns = [sum(r["metadata"].get("turn_weights") or [t["from"] in ("gpt", "function_call")
                                                             for t in r["conversations"]]) for r in rows]
        weights = info["sample_weights"]
        assert weights["dtype"] == "Value('float64')" and weights["rows"] == weights["resampled_rows"] == sum(turns)
        assert weights["sum"] == pytest.approx(sum(r["weight"] * n for r, n in zip(rows, turns, strict=True)))


def test_smollm2_trains_on_the_tau_bench_export(runs, tmp_path):
    """The shipped SmolLM2-135M, its GGUF weights loaded by transformers, trains on CPU with TRL:
    10 SFTTrainer steps on the tau-bench export, the loss finite and lower in the last epoch over
    the same two rows than in the first; one DPOTrainer step with a finite loss."""
    out = runs["tau-bench"]
    report = consume(CONSUMERS, ["smoke", str(out), str(model_path("smollm2-135m")), str(tokenizer_model(out))],
                     tmp_path)["smoke"]
    sft, dpo = report["sft"], report["dpo"]
    assert sft["steps"] == 10 and len(sft["losses"]) == 10, sft
    assert all(0 < x < 100 for x in sft["losses"]), sft  # finite
    assert sum(sft["losses"][-2:]) < sum(sft["losses"][:2]), sft  # the same two rows: first epoch vs last
    assert all(n > 0 for n in sft["labelled_tokens"]), sft  # the trained turn survived the cut to the row's end
    assert dpo["steps"] == 1 and len(dpo["losses"]) == 1 and 0 < dpo["losses"][0] < 100, dpo


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
