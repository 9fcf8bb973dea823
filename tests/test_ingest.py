"""The ingest stage (conftest.ingest: agenther.stages.ingest.write_tables): the shipped logs end to end, generic chat logs, quarantine and reconciliation."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import ingest

from agenther import schema
from agenther.adapters.messages import MessagesMapping
from agenther.stages.ingest import IngestError, detect_format

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
TAU = RAW / "tau-bench" / "gpt-4o-airline.json"
TOOLBENCH = RAW / "toolbench"


def reconciles(result) -> bool:
    return result.records_in == result.trajectories.height + result.quarantine.height + result.stats["duplicates"]


def _position(pointer: str) -> int:
    digits = "".join(ch for ch in pointer if ch.isdigit())
    return int(digits) if digits else -1


def assert_tables(result) -> None:
    schema.validate_columns(result.trajectories, schema.TRAJECTORY, "trajectories")
    schema.validate_columns(result.quarantine, schema.QUARANTINE, "quarantine")
    assert result.trajectories.columns == list(schema.TRAJECTORY)
    # Reading order: files sorted by path, records in file order (streamed, never sorted in memory).
    order = [(f, _position(p)) for f, p in result.trajectories.select("source_file", "record_pointer").iter_rows()]
    assert order == sorted(order)
    assert result.trajectories["id"].n_unique() == result.trajectories.height
    assert reconciles(result)


@pytest.fixture(scope="module")
def tau_records() -> list[dict]:
    return json.loads(TAU.read_text())


# --- the shipped data ----------------------------------------------------------------------


def test_ingest_tau_bench_file():
    result = ingest(TAU)
    assert_tables(result)
    t = result.trajectories
    assert (result.records_in, t.height, result.quarantine.height) == (200, 200, 0)
    assert t["success"].sum() == 84 and (~t["success"]).sum() == 116
    assert t.filter(pl.col("success") != (pl.col("reward") >= 1.0)).height == 0
    assert t["task_key"].n_unique() == 50
    assert set(t["source_format"]) == {"tau-bench"} and set(t["source_file"]) == {str(TAU)}


def test_ingest_toolbench_answers():
    result = ingest(TOOLBENCH / "answer")
    assert_tables(result)
    t = result.trajectories
    assert t.height + result.quarantine.height == 15 and t.height == 15
    assert t["success"].sum() == 9
    rebuilt = [json.loads(m)["reconstructed_from_tree"] for m in t["metadata"]]
    assert sum(rebuilt) == 2


def test_ingest_toolbench_root_quarantines_the_query_lists():
    # instruction/*.json are task lists, not runs: each is quarantined as a file, the answers go through.
    result = ingest(TOOLBENCH)
    assert_tables(result)
    assert result.trajectories.height == 15
    q = result.quarantine
    assert q.height == 5 and q["record_pointer"].to_list() == [""] * 5
    assert all("/instruction/" in f for f in q["source_file"])
    assert all("cannot tell the format" in r for r in q["reason"])


def test_limit_keeps_the_first_good_trajectories():
    result = ingest(TAU, limit=7)
    assert result.trajectories.height == 7 and result.records_in == 7
    assert set(result.trajectories["record_pointer"]) == {f"[{i}]" for i in range(7)}
    assert ingest(TOOLBENCH / "answer", limit=0).trajectories.height == 0


def test_ingest_params_section():
    assert ingest(TAU, limit=3, mapping={"role_key": "role"}).trajectories.height == 3


# --- detection and fatal errors ----------------------------------------------------------------


def test_detect_format_on_the_shipped_files():
    assert detect_format(TAU) == "tau-bench"
    assert detect_format(TAU.parent) == "tau-bench"
    for path in sorted((TOOLBENCH / "answer").rglob("*.json")):
        assert detect_format(path) == "toolbench"
    assert detect_format(TOOLBENCH / "answer") == "toolbench"
    assert detect_format(TOOLBENCH) == "toolbench"  # the query lists do not count
    for path in sorted((TOOLBENCH / "instruction").glob("*.json")):
        with pytest.raises(IngestError, match=f"{path.name}: cannot tell the format"):
            detect_format(path)


def test_fatal_errors(tmp_path):
    with pytest.raises(IngestError, match="input not found"):
        ingest(tmp_path / "missing.json")
    with pytest.raises(IngestError, match="input not found"):
        detect_format(tmp_path / "missing")
    with pytest.raises(IngestError, match="unknown format 'csv'"):
        ingest(TAU, fmt="csv")
    with pytest.raises(IngestError, match="no .json or .jsonl files"):
        ingest(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"messages": [')
    with pytest.raises(IngestError, match="broken.json: invalid JSON"):
        ingest(broken)
    with pytest.raises(IngestError, match="cannot tell the format"):
        ingest(TOOLBENCH / "instruction" / "G1_query.json")


def test_unreadable_file_in_a_folder_is_quarantined_not_fatal(tmp_path):
    (tmp_path / "a.json").write_text('[{"messages": [')
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "c.json").write_bytes(b"")  # empty: no records, no error
    result = ingest(tmp_path)
    assert_tables(result)
    assert result.trajectories.height == 1 and result.records_in == 2
    assert result.quarantine.row(0, named=True)["source_file"] == str(tmp_path / "a.json")
    assert ingest(tmp_path / "c.json").records_in == 0


def test_explicit_format_mismatch_quarantines_every_record():
    result = ingest(TOOLBENCH / "answer" / "G1_answer", fmt="tau-bench")
    assert result.trajectories.height == 0 and result.quarantine.height == 5
    assert set(result.quarantine["reason"]) == {"task_id: expected an integer, got null"}


def test_repeated_ids_are_trials_and_byte_identical_repeats_are_dropped_once(tmp_path):
    """A log that samples several runs per question gives each the question's id: they are trials
    of one task, not duplicates. The same record twice is counted once, and reconciliation holds."""
    def run(answer: str) -> dict:
        return {"uid": "q1", "messages": [{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": answer}], "success": answer == "4"}

    for name, records in (("a", [run("4"), run("5")]), ("b", [run("4"), run("6")])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "a" / "runs2.jsonl").write_text(json.dumps(run("5")) + "\n")  # a repeat in another file of a/
    result = ingest(tmp_path, mapping={"id_path": "uid"})
    assert_tables(result)
    t = result.trajectories
    # files in order a/runs.jsonl (4, 5), a/runs2.jsonl (5: another file stem, another id), b/runs.jsonl
    # (4: a byte-identical repeat of a/runs.jsonl's first record, dropped; 6: a third trial of q1)
    assert result.records_in == 5 and result.quarantine.height == 0
    assert (result.stats["duplicates"], result.stats["trials"]) == (1, 2)
    assert t["id"].to_list() == ["messages/runs/q1", "messages/runs/q1#2", "messages/runs2/q1", "messages/runs/q1#3"]
    assert t["final_answer"].to_list() == ["4", "5", "5", "6"]
    assert t["task_key"].to_list()[1::2] == ["messages/runs/q1", "messages/runs/q1"]  # the trials' task: the shared id
# --- generic chat logs built from real tau-bench records ------------------------------------------


def test_openai_jsonl_round_trip(tmp_path, tau_records):
    path = tmp_path / "openai-runs.jsonl"
    with path.open("w") as fh:
        for i, r in enumerate(tau_records[:12]):
            line = {"run": f"t{r['task_id']}-{r['trial']}", "messages": r["traj"], "reward": r["reward"]}
            if i == 0:  # OpenAI-style logs may carry their tool schemas
                line["tools"] = [{"type": "function", "function": {"name": "get_user_details"}}]
            fh.write(json.dumps(line) + "\n")
    assert detect_format(path) == "messages"
    mapping = {"id_path": "run", "reward_path": "reward", "task_path": "run"}
    result = ingest(path, mapping=mapping)
    assert_tables(result)
    assert result.trajectories.height == 12
    native = {row["record_pointer"]: row for row in ingest(TAU, limit=12).trajectories.iter_rows(named=True)}
    by_id = {row["id"]: row for row in result.trajectories.iter_rows(named=True)}
    for i, r in enumerate(tau_records[:12]):
        got, want = by_id[f"messages/openai-runs/t{r['task_id']}-{r['trial']}"], native[f"[{i}]"]
        assert got["messages"] == want["messages"]  # same canonical structure as the tau-bench reader
        assert got["goal"] == want["goal"] and got["success"] == want["success"]
        assert got["record_pointer"] == f"line {i + 1}"
        assert got["task_key"] == f"messages/t{r['task_id']}-{r['trial']}"  # task_path
        assert (got["tools"] is not None) == (i == 0)


def to_sharegpt(traj: list[dict]) -> list[dict]:
    """tau-bench turns -> ShareGPT-like turns with renamed roles and JSON tool calls."""
    names = {"system": "sys", "user": "customer", "assistant": "agent", "tool": "api"}
    turns = []
    for m in traj:
        if m.get("tool_calls"):
            for c in m["tool_calls"]:
                call = {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                turns.append({"speaker": "agent_call", "text": json.dumps(call)})
        else:
            turns.append({"speaker": names[m["role"]], "text": m["content"]})
    return turns


def test_sharegpt_nested_with_renamed_roles(tmp_path, tau_records):
    records = [
        {
            "meta": {"uid": f"u{i}", "scores": [r["reward"]]},
            "data": {"conversation": {"turns": to_sharegpt(r["traj"])}},
        }
        for i, r in enumerate(tau_records[:8])
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    mapping = (
        {
            "messages_path": "data.conversation.turns",
            "role_key": "speaker",
            "content_key": "text",
            "id_path": "meta.uid",
            "reward_path": "meta.scores.0",
            "roles": {
                "sys": "system",
                "customer": "user",
                "agent": "assistant",
                "agent_call": "assistant",
                "api": "tool",
            },
        }
    )
    assert detect_format(path, MessagesMapping.from_params(mapping)) == "messages"
    with pytest.raises(IngestError):
        detect_format(path)  # the default mapping does not know where the turns are
    result = ingest(path, mapping=mapping)
    assert_tables(result)
    assert result.trajectories.height == 8
    for i, r in enumerate(tau_records[:8]):
        row = result.trajectories.filter(pl.col("id") == f"messages/sharegpt/u{i}").row(0, named=True)
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == [m["role"] for m in r["traj"]]
        assert [c["name"] for m in msgs for c in m["tool_calls"]] == [
            c["function"]["name"] for m in r["traj"] for c in m.get("tool_calls") or []
        ]
        for k, m in enumerate(msgs):
            if m["role"] == "tool":  # ShareGPT has no ids: the result answers the call just before it
                assert msgs[k - 1]["tool_calls"][0]["id"] == m["tool_call_id"]
                assert m["name"] == msgs[k - 1]["tool_calls"][0]["name"]
        assert row["success"] == (r["reward"] >= 1.0)
        assert row["goal"] == next(m["content"] for m in r["traj"] if m["role"] == "user")


def test_sharegpt_conversations_need_no_configuration(tmp_path):
    record = {
        "conversations": [
            {"from": "human", "value": "Convert 3 km to miles"},
            {"from": "function_call", "value": '{"name": "convert", "arguments": {"km": 3}}'},
            {"from": "observation", "value": "1.86"},
            {"from": "gpt", "value": "3 km is 1.86 miles."},
        ]
    }
    path = tmp_path / "one.json"
    path.write_text(json.dumps(record))
    row = ingest(path).trajectories.row(0, named=True)
    assert row["record_pointer"] == "" and row["final_answer"] == "3 km is 1.86 miles."
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["success"] is None and row["reward"] is None


def test_mapping_from_params_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        MessagesMapping.from_params({"message_path": "x"})
    assert MessagesMapping.from_params({"roles": None}).roles["gpt"] == "assistant"


# --- quarantine and reconciliation ----------------------------------------------------------------


def test_broken_jsonl_lines_are_quarantined_and_reconciled(tmp_path):
    good = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    lines = [
        json.dumps(good).encode(),  # 1 good
        b'{"messages": [{"role": "user", "content": "trunc',  # 2 truncated JSON
        json.dumps({"messages": "hello"}).encode(),  # 3 messages is a string
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # 4 Latin-1, not UTF-8
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}).encode(),  # 5 unknown role
        json.dumps(good).encode(),  # 6 good
        b"   ",  # 7 blank: not a record
        json.dumps([1, 2]).encode(),  # 8 not an object
        json.dumps(
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]}
        ).encode(),  # 9
        json.dumps({"messages": [{"content": "no role"}]}).encode(),  # 10 a turn without role
    ]
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = ingest(path)
    assert_tables(result)
    assert result.trajectories["record_pointer"].to_list() == ["line 1", "line 6"]
    assert result.trajectories["id"].to_list() == ["messages/runs/line1", "messages/runs/line6"]
    assert result.records_in == 9
    q = {row["record_pointer"]: row for row in result.quarantine.iter_rows(named=True)}
    assert sorted(q, key=lambda p: int(p.split()[1])) == [
        "line 2",
        "line 3",
        "line 4",
        "line 5",
        "line 8",
        "line 9",
        "line 10",
    ]
    expected = {
        "line 2": "invalid JSON",
        "line 3": "messages: expected a list of messages, got str",
        "line 4": "not UTF-8",
        "line 5": "unknown role 'robot'",
        "line 8": "record is not an object (got list)",
        "line 9": "tool result follows no tool call",
        "line 10": "messages[0]: message has no role",
    }
    for pointer, reason in expected.items():
        row = q[pointer]
        assert row["source_file"] == str(path)
        assert row["reason"].startswith(f"{pointer}: ") and reason in row["reason"], row["reason"]
        assert row["excerpt"]
    assert "caf\ufffd" in q["line 4"]["excerpt"]


def test_empty_and_blank_files_have_no_records(tmp_path):
    for name, data in [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n"),
        ("empty.json", b""),
        ("list.json", b"[]"),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        result = ingest(path)
        assert (result.records_in, result.trajectories.height, result.quarantine.height) == (0, 0, 0)
        assert_tables(result)


# --- ingest in parts (spread over workers) ---------------------------------------------------------
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _tau_log_with_repeats(tmp_path: Path, tau_records: list[dict]) -> Path:
    """The 200 tau-bench records as JSONL, then five of them again byte for byte, another trial of one,
    a broken line and a blank one: repeats and trials that span the parts a small part size cuts."""
    log = tmp_path / "tau" / "runs.jsonl"
    log.parent.mkdir()
    trial = tau_records[3] | {"reward": 0.5}
    lines = [json.dumps(r) for r in tau_records + tau_records[:5] + [trial]] + ["{broken", ""]
    log.write_text("\n".join(lines) + "\n")
    return log.parent


def _in_worker(fn, job):
    import os

    return fn(job), os.getpid()


@pytest.mark.parametrize("shape", ["tau-bench JSONL with repeats", "ReAct text agent", "HTTP-style text agent",
                                   "ToolBench folder"])
def test_ingest_in_parts_run_by_other_processes_writes_the_tables_one_process_reads(tmp_path, tau_records, shape):
    """Ingest cut into parts of ~5 KB (big JSONL files at line starts), each part read by a pool of
    worker processes that share only the work folder, against the whole input read in one process by
    read_logs: the same trajectories (ids, trials, every column), quarantine rows and counts."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from agenther.adapters.common import Quarantined
    from agenther.params import load_params
    from agenther.stages.ingest import IngestReport, read_logs, write_tables
    from agenther.workdir import TABLES

    source = {"tau-bench JSONL with repeats": lambda: _tau_log_with_repeats(tmp_path, tau_records),
              "ReAct text agent": lambda: FIXTURES / "text_agents" / "react_qa.jsonl",
              "HTTP-style text agent": lambda: FIXTURES / "text_agents" / "http_agent.jsonl",
              "ToolBench folder": lambda: TOOLBENCH}[shape]()
    ingest_params = {"input": str(source), "max_trajectory_mb": 0.035}  # a few tau-bench runs are bigger: quarantined
    report = IngestReport()
    read = list(read_logs(source, max_trajectory_mb=0.035, report=report))
    expected = pl.DataFrame([r for r in read if not isinstance(r, Quarantined)], schema=schema.TRAJECTORY)
    quarantined = [r.row() for r in read if isinstance(r, Quarantined)]

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ran: set[int] = set()

        def spread(fn, jobs):
            assert len(jobs) > 2  # the input is cut in parts
            for result, pid in pool.map(_in_worker, [fn] * len(jobs), jobs):
                ran.add(pid)
                yield result

        params = load_params(None, {"ingest": ingest_params, "io": {"part_mb": 0.005, "batch_rows": 7}})
        stats = write_tables(params, tmp_path / "work", spread=spread)
    assert ran and os.getpid() not in ran  # every part was read elsewhere
    assert not (tmp_path / "work" / "ingest-parts").exists()  # the parts' scratch is gone
    trajectories = pl.read_parquet(tmp_path / "work" / TABLES["trajectories"])
    assert trajectories.height > 10 and trajectories.equals(expected)
    assert pl.read_parquet(tmp_path / "work" / TABLES["quarantine"]).to_dicts() == quarantined
    assert stats["records_in"] == trajectories.height + len(quarantined) + stats["duplicates"]
    assert (stats["duplicates"], stats["trials"], stats["detected"], stats["text_actions"]) == (
        report.duplicates, report.trials, report.stats()["detected"], report.stats()["text_actions"])
    if shape.startswith("tau"):
        assert (stats["duplicates"], stats["trials"]) == (5, 1) and len(quarantined) > 1
        assert trajectories.filter(pl.col("id").str.ends_with("#2"))["task_key"].to_list() == [expected["id"][3]]
    # one part in this process: the same tables again
    params = load_params(None, {"ingest": ingest_params})
    assert write_tables(params, tmp_path / "whole") == stats
    assert pl.read_parquet(tmp_path / "whole" / TABLES["trajectories"]).equals(trajectories)
