"""Adapters on the shipped logs (data/raw) and on records broken on purpose."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from agenther.adapters import messages, tau_bench, toolbench
from agenther.adapters.common import Quarantined, RecordError, canonical_messages, get_path, parse_jsonish

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
TAU = RAW / "tau-bench" / "gpt-4o-airline.json"
TOOLBENCH = RAW / "toolbench" / "answer"
TOOLBENCH_FILES = sorted(TOOLBENCH.rglob("*.json"))
INVALID = {"G1_answer/69_ChatGPT_DFS_woFilter_w2", "G3_answer/8_ChatGPT_DFS_woFilter_w2"}


def split(items):
    good = [i for i in items if not isinstance(i, Quarantined)]
    return good, [i for i in items if isinstance(i, Quarantined)]


def assert_linked(msgs: list[dict]) -> None:
    """Every tool message answers an earlier assistant tool call; call ids are unique."""
    seen: dict[str, str] = {}
    for m in msgs:
        for call in m["tool_calls"]:
            assert m["role"] == "assistant"
            assert call["id"] not in seen
            seen[call["id"]] = call["name"]
        if m["role"] == "tool":
            assert m["tool_call_id"] in seen
            assert m["name"] == seen[m["tool_call_id"]]


@pytest.fixture(scope="module")
def tau_raw() -> list[dict]:
    return json.loads(TAU.read_text())


@pytest.fixture(scope="module")
def tau() -> list[dict]:
    good, bad = split(list(tau_bench.read(TAU)))
    assert bad == []
    return good


# --- tau-bench ---------------------------------------------------------------------------


def test_tau_bench_all_200_records_convert(tau):
    assert len(tau) == 200
    assert len({t["id"] for t in tau}) == 200
    assert sum(t["success"] for t in tau) == 84
    assert sum(not t["success"] for t in tau) == 116
    assert all(t["success"] == (t["reward"] >= 1.0) for t in tau)
    # The logs carry no tool schemas: the adapter attaches the benchmark's own 14 airline tools.
    names = {t["function"]["name"] for t in json.loads(tau[0]["tools"])}
    assert len(names) == 14 and {"cancel_reservation", "get_user_details", "think"} <= names
    assert all(t["tools"] == tau[0]["tools"] for t in tau)


def test_tau_bench_tool_results_point_at_earlier_calls(tau):
    for t in tau:
        assert_linked(t["messages"])
    calls = [c for t in tau for m in t["messages"] for c in m["tool_calls"]]
    assert len(calls) == 1164
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls)


def test_tau_bench_reused_call_ids_are_made_unique(tau, tau_raw):
    # task0-trial0 logs call_HGn16... twice (search_direct_flight, then search_onestop_flight).
    t = next(t for t in tau if t["id"] == "tau-bench/gpt-4o-airline/task0-trial0")
    tools = [(m["tool_call_id"], m["name"]) for m in t["messages"] if m["role"] == "tool"]
    assert ("call_HGn16KZh9oNCruxsMJ4gYXan", "search_direct_flight") in tools
    assert ("call_HGn16KZh9oNCruxsMJ4gYXan_2", "search_onestop_flight") in tools
    # Nothing else changes: same roles and tool names, turn for turn.
    raw = tau_raw[0]["traj"]
    assert [m["role"] for m in t["messages"]] == [m["role"] for m in raw]


def test_tau_bench_goal_is_what_the_agent_saw(tau, tau_raw):
    for t, raw in zip(tau, tau_raw, strict=True):
        first_user = next(m["content"] for m in raw["traj"] if m["role"] == "user")
        assert t["goal"] == first_user
        assert t["goal"] != raw["info"]["task"]["instruction"]
        meta = json.loads(t["metadata"])
        assert meta["user_instruction"] == raw["info"]["task"]["instruction"]
        assert meta["gt_actions"] == raw["info"]["task"]["actions"]
        assert meta["domain"] == "airline"


def test_tau_bench_trials_share_a_task_key(tau):
    keys: dict[str, set] = {}
    for t in tau:
        keys.setdefault(t["task_key"], set()).add(json.loads(t["metadata"])["trial"])
    assert len(keys) == 50
    assert all(trials == {0, 1, 2, 3} for trials in keys.values())
    assert "tau-bench/gpt-4o-airline/task0" in keys


def test_tau_bench_null_reward_info_is_not_malformed(tau):
    # Five shipped records have info.reward_info = null; they still convert, with r_actions null.
    t = next(t for t in tau if t["id"] == "tau-bench/gpt-4o-airline/task33-trial0")
    assert json.loads(t["metadata"])["r_actions"] is None
    assert t["success"] is False


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (lambda r: r.update(traj="not a list"), "traj: expected a list of messages, got str"),
        (lambda r: r["traj"][3].pop("role"), "traj[3]: message has no role"),
        (lambda r: r.update(reward="1.0"), "reward: expected a number, got str"),
        (lambda r: r["traj"][6].update(tool_calls={"id": "x"}), "traj[6]: tool_calls must be a list"),
        (lambda r: r["traj"][6]["tool_calls"][0].pop("function"), "traj[6].tool_calls[0]: tool call has no"),
        (lambda r: r["traj"][7].update(tool_call_id="nope"), "traj[7]: tool_call_id 'nope' matches no"),
        (lambda r: r["traj"][2].update(role="robot"), "traj[2]: unknown role 'robot'"),
        (lambda r: r.pop("task_id"), "task_id: expected an integer, got null"),
    ],
)
def test_tau_bench_bad_record_is_quarantined_with_the_field(tmp_path, tau_raw, break_it, reason):
    good, broken = copy.deepcopy(tau_raw[2]), copy.deepcopy(tau_raw[0])  # [0]: traj[6] calls, traj[7] answers
    break_it(broken)
    path = tmp_path / "airline.json"
    path.write_text(json.dumps([good, broken]))
    ok, bad = split(list(tau_bench.read(path)))
    assert [t["record_pointer"] for t in ok] == ["[0]"]
    assert len(bad) == 1
    assert bad[0].source_file == str(path) and bad[0].record_pointer == "[1]"
    assert bad[0].reason.startswith(reason)
    assert bad[0].excerpt == json.dumps(broken, ensure_ascii=False)[:200]


# --- ToolBench ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb() -> dict[str, dict]:
    out = {}
    for path in TOOLBENCH_FILES:
        good, bad = split(list(toolbench.read(path)))
        assert bad == [], bad
        out[f"{path.parent.name}/{path.stem}"] = good[0]
    return out


def test_toolbench_fifteen_records_nine_wins(tb):
    assert len(TOOLBENCH_FILES) == 15 and len(tb) == 15
    assert sum(t["success"] for t in tb.values()) == 9
    assert sum(not t["success"] for t in tb.values()) == 6
    assert all(t["reward"] == float(t["success"]) for t in tb.values())
    assert all(t["record_pointer"] == "" for t in tb.values())
    assert (
        tb["G1_answer/10_ChatGPT_DFS_woFilter_w2"]["id"] == "toolbench/G1_answer/10_ChatGPT_DFS_woFilter_w2"
    )


def test_toolbench_tool_calls_are_structured(tb):
    for t in tb.values():
        msgs = t["messages"]
        assert [m["role"] for m in msgs[:2]] == ["system", "user"]
        assert t["goal"] in msgs[1]["content"]
        assert_linked(msgs)
        calls = [c for m in msgs for c in m["tool_calls"]]
        assert calls, t["id"]
        assert all(c["id"].startswith("call_") for c in calls)
        for call in calls:
            json.loads(call["arguments"])  # JSON text, not flattened prose
        # Observations stay tool messages, never glued into assistant text.
        assert not any('"response"' in (m["content"] or "") for m in msgs if m["role"] == "assistant")
        tools = json.loads(t["tools"])
        assert {s["type"] for s in tools} == {"function"}
        assert "Finish" in {s["function"]["name"] for s in tools}


def test_toolbench_finish_is_kept_and_gives_the_final_answer(tb):
    for key, t in tb.items():
        meta = json.loads(t["metadata"])
        last_call = [c for m in t["messages"] for c in m["tool_calls"]][-1]
        if key in INVALID:
            continue  # the search ran out of budget before any Finish
        assert last_call["name"] == "Finish"
        finish = json.loads(last_call["arguments"])
        if meta["finish_type"] == "give_answer":
            assert t["final_answer"] == finish["final_answer"]
        else:  # give_up_and_restart: no answer, not the last thought
            assert finish["return_type"] == "give_up_and_restart"
            assert t["final_answer"] is None


def test_toolbench_task_key_hashes_the_query(tb):
    keys = {t["task_key"] for t in tb.values()}
    assert all(k.startswith("toolbench/") and len(k) == len("toolbench/") + 12 for k in keys)
    assert len(keys) == len({t["goal"] for t in tb.values()})


def test_toolbench_invalid_records_are_rebuilt_from_the_tree(tb):
    for key, t in tb.items():
        meta = json.loads(t["metadata"])
        assert meta["reconstructed_from_tree"] == (key in INVALID)
        assert meta["valid_data"] == (key not in INVALID)
    t = tb["G1_answer/69_ChatGPT_DFS_woFilter_w2"]
    assert t["success"] is False and t["final_answer"] is None
    names = [c["name"] for m in t["messages"] for c in m["tool_calls"]]
    # The last-expanded branch (expand_num 24) of the 66-node tree.
    assert names == [
        "authenticate_for_currents_news",
        "latest_news_for_currents_news",
        "authenticate_for_currents_news",
        "authenticate_currents_news",
    ]
    assert t["messages"][-1]["role"] == "tool"
    assert "No such function name" in t["messages"][-1]["content"]


def test_tree_path_reproduces_train_messages_on_valid_wins(tb):
    """Evidence for the path choice: on every won record, the last-expanded path is the logged run."""
    for path in TOOLBENCH_FILES:
        record = json.loads(path.read_text())
        if not record["win"]:
            continue
        t = tb[f"{path.parent.name}/{path.stem}"]
        gen = record["answer_generation"]
        rebuilt = toolbench.messages_from_tree(record["tree"], gen["query"], gen["function"])
        calls = [(c["name"], c["arguments"]) for m in rebuilt for c in m["tool_calls"]]
        assert calls == [(c["name"], c["arguments"]) for m in t["messages"] for c in m["tool_calls"]]
        results = [m["content"] for m in rebuilt if m["role"] == "tool"]
        assert results == [m["content"] for m in t["messages"] if m["role"] == "tool"]
        assert rebuilt[1] == t["messages"][1]  # the user turn is rebuilt exactly
        assert_linked(rebuilt)


def test_toolbench_string_fields_are_parsed_or_quarantined(tmp_path):
    record = json.loads(TOOLBENCH_FILES[0].read_text())
    # A Python-literal answer_generation (single quotes, True) is accepted ...
    literal = copy.deepcopy(record)
    literal["answer_generation"] = repr(record["answer_generation"])
    (tmp_path / "G9").mkdir()
    ok_path = tmp_path / "G9" / "lit.json"
    ok_path.write_text(json.dumps(literal))
    good, bad = split(list(toolbench.read(ok_path)))
    assert bad == [] and len(good[0]["messages"]) == 7
    # ... text that is neither JSON nor a literal is quarantined, as is a record with nothing to replay.
    garbage = copy.deepcopy(record)
    garbage["answer_generation"]["function"] = "[{'name': 'x'"
    empty = copy.deepcopy(record)
    empty["answer_generation"]["train_messages"] = []
    empty["tree"] = {"size": 0}
    for name, rec, reason in [
        ("garbage", garbage, "answer_generation.function: neither JSON nor a Python literal"),
        ("empty", empty, "tree: no DFS tree"),
    ]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rec))
        good, bad = split(list(toolbench.read(path)))
        assert good == [] and bad[0].reason.startswith(reason), bad


# --- shared helpers ------------------------------------------------------------------------


def test_parse_jsonish_and_get_path():
    assert parse_jsonish('{"a": 1}', "f") == {"a": 1}
    assert parse_jsonish("{'a': True}", "f") == {"a": True}
    with pytest.raises(RecordError, match="f: neither JSON"):
        parse_jsonish("{'a':", "f")
    record = {"data": {"turns": [{"text": "hi"}, {"text": "yo"}]}}
    assert get_path(record, "data.turns.1.text") == "yo"
    with pytest.raises(KeyError):
        get_path(record, "data.turns.2.text")


def test_sharegpt_calls_and_observations_link_up():
    turns = [
        {"from": "human", "value": "weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 18}'},
        {"from": "gpt", "value": "18 degrees."},
    ]
    msgs = canonical_messages(
        turns,
        "conversations",
        messages.MessagesMapping().roles,
        "from",
        "value",
        call_roles=("function_call",),
    )
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1]["content"] is None
    assert msgs[1]["tool_calls"] == [{"id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'}]
    assert msgs[2]["tool_call_id"] == "call_1" and msgs[2]["name"] == "weather"
    with pytest.raises(RecordError, match=r"conversations\[1\]: 'function_call' turn is not JSON"):
        canonical_messages(
            [turns[0], {"from": "function_call", "value": "weather(Paris)"}],
            "conversations",
            messages.MessagesMapping().roles,
            "from",
            "value",
            call_roles=("function_call",),
        )
