"""Exports: every row validates against its trainer's format, the validators can fail, and files
are byte-identical for identical inputs. Inputs are real tau-bench runs (see test_package)."""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import random
import sys

import polars as pl
import pytest
from conftest import TAU, install_distribution, package, write_params
from test_package import LINEAGE, PARAMS, tau_inputs

from agenther import schema
from agenther.cli import main
from agenther.export import formats as exports
from agenther.export import llamafactory, openai_ft, parquet, trl
from agenther.export.card import render_dataset_card
from agenther.export.exporter import ANNOTATED
from agenther.export.files import sink_layout
from agenther.export.registry import exporters, layout
from agenther.export.schemas import validate_dpo, validate_sft, validate_sharegpt
from agenther.stages.packaging import measure_lengths
from agenther.workdir import PACKAGE_FILES


@pytest.fixture(scope="module")
def packaged():
    verified, classified = tau_inputs(range(20), with_tools=True)
    return package(verified, classified, PARAMS, LINEAGE)


def lf_accepts(row: dict) -> bool:
    """LLaMA-Factory's SharegptDatasetConverter rule, restated independently of our validator."""
    turns = row["conversations"]
    if turns and turns[0]["from"] == "system":
        turns = turns[1:]
    accept = (("human", "observation"), ("gpt", "function_call"))
    return (
        all(t["from"] in accept[i % 2] for i, t in enumerate(turns))
        and len(turns) % 2 == 0
        and len(turns) > 0
    )


# --- every exported row is valid -------------------------------------------------------------


def test_every_sft_row_is_an_openai_chat_row_with_tool_calls_kept(packaged):
    assert packaged.sft
    n_calls = 0
    for row in packaged.sft:
        validate_sft(row)
        issued: set[str] = set()
        for m in row["messages"]:
            assert set(m) <= {"role", "content", "tool_calls", "tool_call_id", "weight"}
            # OpenAI's per-message weight: 0 or 1, on assistant turns only, on hindsight samples only
            assert "weight" not in m or (m["role"] == "assistant" and m["weight"] in (0, 1)
                                         and row["metadata"]["kind"] == "hindsight")
            for c in m.get("tool_calls") or []:
                assert c["type"] == "function" and isinstance(c["function"]["arguments"], str)
                issued.add(c["id"])
                n_calls += 1
            if m["role"] == "tool":
                assert m["tool_call_id"] in issued  # answers a call made before it
            if m["role"] == "assistant":
                assert not (m["content"] or "").startswith("Result:")  # results are not flattened into text
        assert row["tools"][0]["type"] == "function"
    assert n_calls > 100


def test_every_dpo_row_is_a_trl_conversational_preference_row(packaged):
    assert {r["metadata"]["kind"] for r in packaged.dpo} == {"natural", "hindsight"}
    for row in packaged.dpo:
        validate_dpo(row)
        for key in ("prompt", "chosen", "rejected"):  # TRL's is_conversational: lists of {role, content}
            assert isinstance(row[key], list) and all("role" in m and "content" in m for m in row[key])
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["chosen"] != row["rejected"]
        # the step where the runs diverge: one assistant turn each, no user or tool text to train on
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]


def test_every_sharegpt_row_passes_the_llamafactory_rule(packaged):
    assert len(packaged.sharegpt) == len(packaged.sft)  # the same samples in both files
    tags = set()
    for row in packaged.sharegpt:
        validate_sharegpt(row)
        assert lf_accepts(row)
        assert row["system"].startswith("# Airline Agent Policy")
        tags |= {t["from"] for t in row["conversations"]}
        for t in row["conversations"]:
            if t["from"] == "function_call":
                call = json.loads(t["value"])
                assert isinstance(call["arguments"], dict)  # an object, as LLaMA-Factory's formatter needs
        assert all("name" in t and "properties" in t["parameters"] for t in json.loads(row["tools"]))
    assert tags == {"human", "gpt", "function_call", "observation"}


# --- the validators can fail ----------------------------------------------------------------


def _sft_row(packaged) -> dict:
    return copy.deepcopy(next(r for r in packaged.sft if any(m["role"] == "tool" for m in r["messages"])))


def _break_tool_id(row):
    next(m for m in row["messages"] if m["role"] == "tool")["tool_call_id"] = "nope"


def _drop_call_type(row):
    next(m for m in row["messages"] if m.get("tool_calls"))["tool_calls"][0].pop("type")


def _bad_tool_name(row):  # the row's tool list was validated (and remembered) before it broke
    row["tools"][-1]["function"]["name"] = "has spaces in it"


def _end_on_user(row):
    row["messages"].append({"role": "user", "content": "thanks"})


def _flatten_results(row):  # the reference implementation's way: results as assistant text, role lost
    for m in row["messages"]:
        if m["role"] == "tool":
            m.clear()
            m.update({"role": "function", "content": "Result: ..."})


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [
        (_break_tool_id, "answers no pending tool call"),
        (_drop_call_type, "'type' is a required property"),
        (_bad_tool_name, r"sft/tools/\d+/function/name: 'has spaces in it' does not match"),
        (_end_on_user, "must end on an assistant turn"),
        (_flatten_results, "unknown role 'function'"),
    ],
)
def test_broken_sft_rows_fail(packaged, breaker, reason):
    row = _sft_row(packaged)
    validate_sft(row)
    breaker(row)
    with pytest.raises(ValueError, match=reason):
        validate_sft(row)


def test_broken_dpo_rows_fail(packaged):
    good = next(r for r in packaged.dpo if r["metadata"]["kind"] == "hindsight")
    validate_dpo(good)
    # the reference implementation's shape: two prompts, one trajectory
    two_prompts = copy.deepcopy(good)
    two_prompts["chosen"] = [{"role": "user", "content": "prompt A"}, *good["chosen"]]
    two_prompts["rejected"] = [{"role": "user", "content": "prompt B"}, *good["chosen"]]
    with pytest.raises(ValueError, match="must start and end on an assistant turn"):
        validate_dpo(two_prompts)
    same = copy.deepcopy(good) | {"rejected": copy.deepcopy(good["chosen"])}
    with pytest.raises(ValueError, match="identical"):
        validate_dpo(same)
    no_prompt = {k: v for k, v in good.items() if k != "prompt"}
    with pytest.raises(ValueError, match="'prompt' is a required property"):
        validate_dpo(no_prompt)
    ends_on_assistant = copy.deepcopy(good)
    ends_on_assistant["prompt"].append({"role": "assistant", "content": "Sure."})
    with pytest.raises(ValueError, match="must end on a user or tool turn"):
        validate_dpo(ends_on_assistant)


def test_broken_sharegpt_rows_fail(packaged):
    good = packaged.sharegpt[0]
    validate_sharegpt(good)
    two_gpt = copy.deepcopy(good)
    two_gpt["conversations"].insert(2, {"from": "gpt", "value": "again"})
    odd = copy.deepcopy(good)
    odd["conversations"] = odd["conversations"][:-1]
    role_content = copy.deepcopy(good)  # keys LLaMA-Factory does not read by default
    role_content["conversations"] = [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
        for t in role_content["conversations"]
    ]
    messages_key = {("messages" if k == "conversations" else k): v for k, v in copy.deepcopy(good).items()}
    bad_call = copy.deepcopy(good)
    next(t for t in bad_call["conversations"] if t["from"] == "function_call")["value"] = (
        "get_user_details(x)"
    )
    cases = [
        (two_gpt, "at an even position"),
        (odd, "even, non-zero count"),
        (role_content, "'from' is a required property"),
        (messages_key, "'conversations' is a required property"),
        (bad_call, "not JSON"),
    ]
    assert not lf_accepts(two_gpt) and not lf_accepts(odd)  # LLaMA-Factory itself would drop these two
    for row, reason in cases:
        with pytest.raises(ValueError, match=reason):
            validate_sharegpt(row)


# --- converters -------------------------------------------------------------------------------


def _m(role, content=None, calls=None, call_id=None):
    return {"role": role, "content": content, "tool_calls": calls, "tool_call_id": call_id, "name": None}


def test_sharegpt_tool_turns_follow_llamafactory_conventions():
    messages = [
        _m("system", "policy"),
        _m("user", "Look up both users."),
        _m(
            "assistant",
            "Checking both.",
            [
                {"id": "c1", "name": "get_user_details", "arguments": '{"user_id": "a"}'},
                {"id": "c2", "name": "get_user_details", "arguments": '{"user_id": "b"}'},
            ],
        ),
        _m("tool", "A", call_id="c1"),
        _m("tool", "B", call_id="c2"),
        _m("assistant", "Both found."),
    ]
    tools = exports.parse_tools(
        json.dumps([{"name": "get_user_details", "description": "d"}])
    )  # bare -> wrapped
    assert tools == [{"type": "function", "function": {"name": "get_user_details", "description": "d"}}]
    validate_sft(exports.sft_row(messages, tools, 1.0, {}))
    row = exports.sharegpt_row(messages, tools, 1.0, {})
    assert row["system"] == "policy"
    assert [t["from"] for t in row["conversations"]] == ["human", "function_call", "observation", "gpt"]
    assert json.loads(row["conversations"][1]["value"]) == [
        {"name": "get_user_details", "arguments": {"user_id": "a"}},
        {"name": "get_user_details", "arguments": {"user_id": "b"}},
    ]
    assert json.loads(row["conversations"][2]["value"]) == ["A", "B"]
    assert row["metadata"]["assistant_text_dropped"] == 1  # "Checking both." has no sharegpt slot
    assert json.loads(row["tools"]) == [
        {"name": "get_user_details", "description": "d", "parameters": {"type": "object", "properties": {}}}
    ]


def test_sharegpt_repairs_what_it_can_and_refuses_the_rest():
    joined = exports.sharegpt_row(
        [_m("user", "a"), _m("user", "b"), _m("assistant", "x"), _m("assistant", "y")], None, 1.0, {}
    )
    assert joined["conversations"] == [
        {"from": "human", "value": "a\n\nb"},
        {"from": "gpt", "value": "x\n\ny"},
    ]
    assert "tools" not in joined
    with pytest.raises(ValueError):  # starts with the assistant: no way to make it alternate
        exports.sharegpt_row(
            [_m("assistant", "hello"), _m("user", "hi"), _m("assistant", "ok")], None, 1.0, {}
        )
    with pytest.raises(ValueError, match="observation followed by human"):  # a result nobody reads
        exports.sharegpt_row(
            [
                _m("user", "q"),
                _m("assistant", None, [{"id": "c", "name": "f", "arguments": "{}"}]),
                _m("tool", "r", call_id="c"),
                _m("user", "again"),
                _m("assistant", "ok"),
            ],
            None,
            1.0,
            {},
        )


def test_openai_upload_row_keeps_only_openai_keys(packaged):
    row = openai_ft.openai_row(packaged.sft[0])
    assert set(row) == {"messages", "tools", "parallel_tool_calls"}
    validate_sft(row)
    assert exports.openai_upload_row(packaged.sft[0]).keys() <= row.keys()
    assert "tools" not in openai_ft.openai_row({**packaged.sft[0], "tools": None})  # OpenAI rejects tools: []


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_every_consumer_file_has_the_same_columns_in_every_row(tmp_path):
    """A mix of rows with and without tool schemas: each file's rows still share one key set."""
    verified, classified = tau_inputs(range(20), with_tools=True)
    classified = classified.with_columns(
        pl.when(pl.col("task_key").cast(pl.Int64) % 2 == 0).then(pl.col("tools")).otherwise(None).alias("tools"))
    result = package(verified, classified, PARAMS, LINEAGE, out=tmp_path)
    assert result.counts["dpo_natural"] and result.counts["hindsight_samples"] and result.counts["success_samples"]
    common = {"tools", "sample_id", "sample_weight"}
    expected = {trl.SFT_FILE: {"prompt", "completion", "turn", *common},
                trl.DPO_FILE: {"prompt", "chosen", "rejected", *common},
                **{f: {"conversations", "system", "turn", *common} for f in llamafactory.FILES.values()}}
    for name, keys in expected.items():
        rows = _lines(tmp_path / name)
        assert rows and all(set(r) == keys for r in rows), name
        assert {type(r["tools"]) for r in rows} == {str}, name  # JSON text: one type whatever the source
        assert {type(r["sample_weight"]) for r in rows} == {float}, name
    assert {r["tools"] for r in _lines(tmp_path / trl.SFT_FILE)} >= {"[]"}
    for r in _lines(tmp_path / trl.SFT_FILE) + _lines(tmp_path / trl.DPO_FILE):
        for m in r["prompt"] + r.get("completion", []) + r.get("chosen", []) + r.get("rejected", []):
            assert "weight" not in m
            for c in m.get("tool_calls") or []:
                assert isinstance(c["function"]["arguments"], dict)  # chat templates render objects
    openai_rows = _lines(tmp_path / openai_ft.FILE)
    assert all(set(r) in ({"messages"}, {"messages", "tools", "parallel_tool_calls"}) for r in openai_rows)
    assert len(openai_rows) == len(result.sft)


def _trained(messages: list[dict]) -> list[int]:
    """Indexes of the assistant turns to train on, read from the annotated row: weight 1, or no
    weight at all (an original success: every assistant turn)."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) == 1]


def test_each_trainer_row_trains_one_weight_1_turn_and_every_one_is_trained_once(tmp_path):
    """TRL: one prompt-completion row per trained assistant turn, the conversation before it as the
    prompt; LLaMA-Factory: one row per trained model turn, ending on it. Weight-0 turns only ever
    appear before the trained turn, and no completion is a user or tool turn."""
    from agenther.evidence.goal import AchievedGoal

    verified, classified = tau_inputs(range(20), with_tools=True)
    rows = verified.to_dicts()
    for r in rows:  # every other assistant turn is context only (weight 0)
        assistant = [i for i, m in enumerate(r["messages"]) if m["role"] == "assistant"]
        r["achieved_goal"] = AchievedGoal(sample_end=len(r["messages"]), train_steps=assistant[1::2]).model_dump_json()
    result = package(schema.frame(rows, schema.VERIFIED), classified, PARAMS, LINEAGE, out=tmp_path)
    trl_rows, lf_rows = _lines(tmp_path / trl.SFT_FILE), [
        r for f in llamafactory.FILES.values() for r in _lines(tmp_path / f)]
    by_sample: dict[str, list] = {}
    for r in trl_rows:
        by_sample.setdefault(r["sample_id"], []).append(r)
    weight0 = 0
    for sample in result.sft:
        messages, sid = sample["messages"], sample["metadata"]["sample_id"]
        weight0 += sum(m.get("weight") == 0 for m in messages)
        rows = by_sample.pop(sid)
        assert [r["turn"] for r in rows] == _trained(messages), sid  # in order, each once
        for r in rows:
            assert r["prompt"] == [trl.trl_message(m) for m in messages[: r["turn"]]]
            assert r["completion"] == [trl.trl_message(messages[r["turn"]])]
            assert r["sample_weight"] == sample["weight"]
    assert not by_sample and weight0 > 0  # every TRL row belongs to a sample; there are turns to keep out
    lf_by_sample: dict[str, list] = {}
    for r in lf_rows:
        lf_by_sample.setdefault(r["sample_id"], []).append(r)
    for sample in result.sharegpt:
        turns, sid = sample["conversations"], sample["metadata"]["sample_id"]
        weights = sample["metadata"].get("turn_weights") or [int(t["from"] in ("gpt", "function_call")) for t in turns]
        rows = lf_by_sample.pop(sid)
        assert [r["turn"] for r in rows] == [k for k, w in enumerate(weights) if w == 1], sid
        for r in rows:
            assert r["conversations"] == turns[: r["turn"] + 1] and r["system"] == sample["system"]
            assert r["conversations"][-1]["from"] in ("gpt", "function_call")
            validate_sharegpt({k: v for k, v in r.items() if k in ("conversations", "system")})
    assert not lf_by_sample


def test_a_sample_with_no_turn_to_train_gives_no_trainer_row():
    messages = [_m("system", "policy"), _m("user", "q"), {**_m("assistant", "a"), "weight": 0}]
    sft = exports.sft_row(messages, None, 1.0, {"sample_id": "hindsight:x", "kind": "hindsight"})
    sharegpt = exports.sharegpt_row(messages, None, 1.0, {"sample_id": "hindsight:x", "kind": "hindsight"})
    assert trl.sft_rows(sft) == [] and llamafactory.lf_rows(sharegpt) == []
    assert openai_ft.openai_row(sft)["messages"][-1]["weight"] == 0  # OpenAI: the same, by its own weight


def test_every_export_is_one_registered_exporter():
    """The built-in formats, each one Exporter: no two write one file, each describes its files in the card."""
    names = [e.name for e in exporters()]
    assert names == ["openai", "trl", "llamafactory", "hf"]
    files = [f for e in exporters() for f in (*e.files, *e.published)]
    assert len(files) == len(set(files)) and not set(files) & set(ANNOTATED)
    for e in exporters():
        assert set(e.describe) <= set(e.files) and e.training and e.loading is not None, e.name


PLUGIN = """
from agenther.export.exporter import Exporter

def rows(name, row):
    if name != "sft.jsonl":
        return []
    first = next(m for m in row["messages"] if m["role"] == "user")
    return [("prompts/prompts.jsonl", {"prompt": first["content"], "sample_id": row["metadata"]["sample_id"]})]

EXPORTER = Exporter(name="prompts", files=("prompts/prompts.jsonl",), rows=rows,
                    describe={"prompts/prompts.jsonl": ("`prompt`: the first user turn", "a prompt bank")},
                    training="**Prompts**: nothing trains here.", loading=lambda exports: "Prompts: read them.")
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An exporter outside agenther, installed the way plugins are: a distribution whose entry point
    in the group `agenther.exporters` names it (the registry is read afresh before and after)."""
    from agenther.export import registry

    install_distribution(tmp_path, monkeypatch, "agenther-prompts-plugin", "0.1", {"agenther_prompts_plugin": PLUGIN},
                         "[agenther.exporters]\nprompts = agenther_prompts_plugin:EXPORTER\n")
    registry._LOADED.clear()
    yield
    registry._LOADED.clear()


def test_a_plugin_exporter_is_one_module_and_one_entry_point(plugin, tmp_path):
    """Adding a format changes no other export: the sink writes its file, the card lists it, and
    every built-in file is byte for byte what it is without the plugin."""
    verified, classified = tau_inputs(range(3), with_tools=True)
    out = tmp_path / "out"
    with_plugin = package(verified, classified, PARAMS, LINEAGE, out=out).digests
    assert [e.name for e in exporters()][-1] == "prompts"
    prompts = _lines(out / "prompts/prompts.jsonl")
    sft = _lines(out / "sft.jsonl")
    assert [r["sample_id"] for r in prompts] == [r["metadata"]["sample_id"] for r in sft]
    card = render_dataset_card({"exports": {"files": with_plugin}})
    assert "| prompts/prompts.jsonl |" in card and "**Prompts**: nothing trains here." in card

    from agenther.export import registry

    registry._LOADED.clear()
    sys.path.remove(str(tmp_path))
    without = package(verified, classified, PARAMS, LINEAGE, out=tmp_path / "plain").digests
    assert "prompts" not in [e.name for e in exporters()]
    assert {k: v for k, v in with_plugin.items() if not k.startswith("prompts/")} == without


# --- files --------------------------------------------------------------------------------------


def test_identical_inputs_give_byte_identical_files(tmp_path, packaged):
    verified, classified = tau_inputs(range(20), with_tools=True)
    first = package(verified, classified, PARAMS, LINEAGE, out=tmp_path / "a").digests
    second = package(verified.sample(fraction=1.0, shuffle=True, seed=7),
                     classified.sample(fraction=1.0, shuffle=True, seed=11), PARAMS, LINEAGE, out=tmp_path / "b").digests
    assert first == second
    # tau-bench tasks 0-19: every file of the layout has rows (one file per pattern: Parquet names carry a digest)
    assert sorted(next(p for p in sink_layout() if fnmatch.fnmatch(f, p)) for f in first) == sorted(sink_layout())
    for name in first:
        if name.endswith(".parquet"):
            assert name.endswith(f"-{first[name][:12]}.parquet")
    for name, digest in first.items():
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b and hashlib.sha256(a).hexdigest() == digest
    lines = (tmp_path / "a" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(packaged.sft) and json.loads(lines[0]) == packaged.sft[0]
    ids = [json.loads(x)["metadata"]["sample_id"] for x in lines]
    assert ids == sorted(ids)
    trl_ids = [r["sample_id"] for r in _lines(tmp_path / "a" / trl.SFT_FILE)]  # the same order everywhere
    assert trl_ids == sorted(trl_ids) and set(trl_ids) <= set(ids)


def test_package_files_list_the_whole_layout():
    assert set(PACKAGE_FILES) == {*ANNOTATED, *layout(), "rejected.parquet", "summary.json", "dataset_card.md",
                                  "report.html"}
    assert parquet.CARD in layout()


def test_dataset_info_maps_columns_every_row_has(tmp_path):
    verified, classified = tau_inputs(range(20), with_tools=True)
    package(verified, classified, PARAMS, LINEAGE, out=tmp_path)
    folder = tmp_path / "llamafactory"
    info = json.loads((folder / "dataset_info.json").read_text())
    assert set(info) == {"agenther_hindsight", "agenther_success"}  # successes are not called hindsight
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt" and "tags" not in entry  # default tags apply
        # once `columns` is given LLaMA-Factory takes every column from it: messages must be named
        assert entry["columns"] == {"messages": "conversations", "system": "system", "tools": "tools"}
        rows = _lines(folder / entry["file_name"])
        assert rows and all(set(entry["columns"].values()) <= set(r) for r in rows)
        assert all(r["sample_id"].startswith(name.removeprefix("agenther_") + ":") for r in rows)
        for r in rows:
            validate_sharegpt({k: v for k, v in r.items() if k in ("conversations", "system") or (k == "tools" and v)})
    assert not (tmp_path / "dataset_info.json").exists()


def test_no_zero_byte_file_is_written(tmp_path):
    (tmp_path / "dpo.jsonl").write_text("stale\n")  # an earlier run's file must not pass for this one's
    (tmp_path / "dataset_info.json").write_text("{}")
    empty = package(schema.empty(schema.VERIFIED), schema.empty(schema.CLASSIFIED), {}, {}, out=tmp_path)
    assert empty.digests == {} and set(empty.exported.not_written) == set(sink_layout())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert empty.rejections.height == 0 and empty.counts["accepted_in"] == 0
    # natural pairs only (no relabel accepted): no hindsight files, no empty ones
    verified, classified = tau_inputs(range(5))
    some = package(verified.head(0), classified, PARAMS, LINEAGE, out=tmp_path / "b")
    assert "llamafactory/hindsight.jsonl" in some.exported.not_written and "trl/dpo.jsonl" in some.digests
    assert all((tmp_path / "b" / f).stat().st_size > 0 for f in some.digests)
    info = json.loads((tmp_path / "b" / "llamafactory/dataset_info.json").read_text())
    assert set(info) == {"agenther_success"}


def test_token_lengths_are_measured_with_the_local_models_tokenizer(tmp_path):
    verified, classified = tau_inputs(range(6), with_tools=True)
    result = package(verified, classified, PARAMS, LINEAGE, out=tmp_path, measure_tokens=True)
    lengths = result.exported.token_lengths
    assert lengths["tokenizer"], lengths  # the embedded model's GGUF is installed by scripts/setup.sh
    sft = lengths["files"][trl.SFT_FILE]
    assert sft["rows"] == result.exported.files[trl.SFT_FILE] > len(result.sft)  # a row per trained turn
    assert sft["p50"] <= sft["p90"] <= sft["p99"] <= sft["max"] < sft["max_length"] and sft["tokens"] > sft["max"]
    assert sft["max"] > 1500  # tau-bench rows carry a ~1.2k-token policy and long tool results
    assert lengths["files"][trl.DPO_FILE]["rows"] == len(result.dpo)
    # SmolLM2's template cannot render a tool-call turn (null content): the next local model measures
    fallback = measure_lengths(tmp_path, result.digests, "smollm2-135m")
    assert fallback["files"] == lengths["files"] and fallback["tokenizer"] == lengths["tokenizer"]
    assert fallback["skipped"][0].startswith("smollm2-135m: its chat template failed")


def test_token_counts_by_piece_equal_llama_cpp_on_the_whole_text(tmp_path):
    """The count per piece between turn markers (cached per distinct piece) is llama.cpp's count of
    the whole rendered row, for every TRL row of real tau-bench exports, twice over (cache hits),
    and the stage's percentiles are those of the whole-text counts."""
    from agenther.export import tokens

    verified, classified = tau_inputs(range(12), with_tools=True)
    result = package(verified, classified, PARAMS, LINEAGE, out=tmp_path, measure_tokens=True)
    tok, why = tokens.local_tokenizer(None)
    assert tok is not None, why
    assert tok._markers == {"<|im_start|>", "<|im_end|>"}  # ChatML: the text is split at these

    def whole(messages: list[dict], tools: list[dict]) -> int:
        text = tok.template.render(messages=messages, tools=tools or None, add_generation_prompt=False)
        return len(tok.vocab.tokenize(text.encode(), add_bos=False, special=True))

    sft = [(r["prompt"] + r["completion"], json.loads(r["tools"])) for r in _lines(tmp_path / trl.SFT_FILE)]
    dpo = [[(r["prompt"] + r[side], json.loads(r["tools"])) for side in ("chosen", "rejected")]
           for r in _lines(tmp_path / trl.DPO_FILE)]
    assert len(sft) > 10 and len(dpo) > 5
    for _ in range(2):
        for messages, tools in [*sft, *(side for pair in dpo for side in pair)]:
            assert tok.count(messages, tools) == (whole(messages, tools), True)
    files = result.exported.token_lengths["files"]
    assert files[trl.SFT_FILE] == tokens.stats([(whole(*row), True) for row in sft])
    assert files[trl.DPO_FILE] == tokens.stats([(max(whole(*side) for side in pair), True) for pair in dpo])


# --- dataset card -------------------------------------------------------------------------------


def test_dataset_card_of_a_real_run_carries_its_summary(tmp_path, llm_server):
    """The card a run writes, against the summary.json summarize() wrote in the same run."""
    params = write_params(tmp_path / "params.yaml", llm_server, llm={"concurrency": 4})
    out = tmp_path / "out"
    assert main(["run", "--input", str(TAU), "--out", str(out), "--limit", "24", "--params", str(params)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    card = (out / "dataset_card.md").read_text()
    stages, gates, total, exported = summary["stages"], summary["gates"], summary["llm"]["total"], summary["exports"]
    assert stages["verify"]["rejected"] and stages["extract"]["rejected"]  # reasons to show
    needles = [
        "sierra-research/tau-bench", "licence: MIT",
        f"| passed_judges | {gates['passed_judges']} |",
        f"| passed_confidence_gate | {gates['passed_confidence_gate']} |",
        f"LLM calls: {total['calls']} ({total['cache_hits']} from cache)",
        f"- relabeling model: {summary['lineage']['models']['relabel']}",
        f"params hash `{summary['lineage']['params_hash']}`",
        "All counts reconcile: yes",
        "DPOTrainer", "dataset: agenther_hindsight,agenther_success", "Known limitations", "1 - weight_alpha * severity",
        "mask_history: true", "ONE ROW PER TRAINED ASSISTANT TURN", "sample_weight",
    ]
    for name, digest in exported["files"].items():
        needles += [f"| {name} | {exported['rows'][name]} |", digest]
    for name, why in exported["not_written"].items():  # 24 records, one trial per task: no pairs
        needles.append(f"- `{name}`: {why}")
    assert "dpo.jsonl" in exported["not_written"] and not (out / "dpo.jsonl").exists()
    sft_lengths = exported["token_lengths"]["files"]["trl/sft.jsonl"]
    cutoff_len = llamafactory.cutoff_len(max(v["max_length"] for v in exported["token_lengths"]["files"].values()))
    assert cutoff_len >= 1.1 * max(v["max_length"] for v in exported["token_lengths"]["files"].values())
    needles += [f"| trl/sft.jsonl | {sft_lengths['rows']} | {sft_lengths['tokens']} | {sft_lengths['p50']} |",
                f"SFTConfig(output_dir=\"out\", max_length={sft_lengths['max_length']})",
                f"cutoff_len: {cutoff_len}"]
    assert (out / "hf/README.md").read_text().startswith("---\nconfigs:\n- config_name: sft\n")
    for stage in ("extract", "relabel", "verify"):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stages[stage]["rejected"].items())) or "-"
        needles.append(f"| {stage} | {stages[stage]['in']} | {stages[stage]['out']} | {reasons} |")
    for judge, v in stages["verify"]["judges"].items():
        needles.append(f"| {judge} | {v['accepted']} | {v['rejected']} | {v['not_asked']} |")
    for needle in needles:
        assert needle in card, needle


def test_dataset_card_tolerates_missing_keys():
    card = render_dataset_card({})
    none = render_dataset_card({"stages": {"package": {"hindsight_samples": 0, "success_samples": 84}}})
    assert none.splitlines()[0] == "# agenther agent trajectories: 84 original successes, no hindsight-relabeled sample"
    assert card.startswith("# ") and "not recorded" in card and "licence: not known" in card
    detected = render_dataset_card({"input": {"format": "auto"}, "source_formats": ["tau-bench"]})
    assert "licence: MIT" in detected and "licence: not known" not in detected
    assert render_dataset_card({"llm": {"calls": 3, "cost_usd": 0.5}, "quarantined": 2}).count("3 (") == 1


def test_shuffled_relabels_do_not_change_rejections():
    verified, classified = tau_inputs(range(5))
    rows = verified.to_dicts()
    # another run relabeled into the same conversation: its user side duplicates the first one's
    rows[1] = copy.deepcopy(rows[0]) | {"id": rows[1]["id"]}
    a = package(schema.frame(rows, schema.VERIFIED), classified, PARAMS, LINEAGE)
    b = package(
        schema.frame(random.Random(3).sample(rows, len(rows)), schema.VERIFIED), classified, PARAMS, LINEAGE
    )
    assert a.rejections.height == 1 and a.rejections.equals(b.rejections)


def test_a_rows_tools_serialized_once_give_the_bytes_of_the_whole_row_serialized():
    # dumps splices the tool list's text (serialized once per list) into the row's: the same bytes as
    # json.dumps of the whole row, also when a text of the row holds the placeholder's own characters
    text = json.dumps([{"name": "book_é", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}},
                       {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}])
    tools = exports.parse_tools(text)
    assert exports.parse_tools(text) is tools  # one list per distinct text: the rows of a run share it
    for content in ("hello", "\x00agenther:tools\x00", "\u2028 ünï"):
        row = exports.sft_row([{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}],
                              tools, 0.5, {"sample_id": "s", "tools": "x"})
        assert row["tools"] is tools
        assert exports.dumps(row) == json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        assert json.loads(exports.dumps(row)) == row
    assert exports.tools_text(tools) == json.dumps(tools, ensure_ascii=False, sort_keys=True)
    assert exports.tools_text(None) == exports.tools_text([]) == "[]"
