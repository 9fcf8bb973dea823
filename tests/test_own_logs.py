"""Logs in shapes the shipped data does not have, run as a new user would: a chat-log JSONL whose only
outcome is a top-level `success` flag (no mapping given), a mistyped mapping, and `agenther inspect`.
The hotel-booking runs are built here (our own fixture), OpenAI-style with tool calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_params

from agenther.cli import main

REACT = Path(__file__).parent / "fixtures" / "react_webshop.jsonl"
HOTELS = ["Hotel Lumen", "Casa Verde", "Nordlys Inn", "The Old Mill", "Harbour View", "Pine Lodge", "Hotel Aurum"]


def hotel_run(i: int) -> dict:
    """A run that booked a room (a write with a result) and is marked failed by the log alone."""
    hotel, room, day, nights = HOTELS[i % len(HOTELS)], ("double", "single", "suite")[i % 3], 3 + i, 1 + i % 4
    booking = f"BK{4100 + i}"
    args = {"hotel": hotel, "room_type": room, "check_in": f"2026-03-{day:02d}", "nights": nights}
    return {
        "id": f"run-{i:03d}",
        "instruction": f"Book a {room} room at {hotel} from 2026-03-{day:02d} for {nights} nights, with breakfast.",
        "messages": [
            {"role": "user", "content": f"Book a {room} room at {hotel} from 2026-03-{day:02d} for {nights} nights, "
                                        "with breakfast."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}a", "type": "function", "function": {
                "name": "search_rooms", "arguments": json.dumps({"hotel": hotel, "check_in": args["check_in"]})}}]},
            {"role": "tool", "tool_call_id": f"c{i}a", "name": "search_rooms",
             "content": json.dumps({"rooms": [{"type": room, "price": 90 + i, "breakfast": False}]})},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}b", "type": "function", "function": {
                "name": "book_room", "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": f"c{i}b", "name": "book_room",
             "content": json.dumps({"booking_id": booking, "status": "confirmed"})},
            {"role": "assistant", "content": f"Your {room} room at {hotel} is booked: {booking}."},
        ],
        "success": i % 7 == 0,  # the only outcome the log gives: breakfast was never arranged
    }


@pytest.fixture
def hotel_log(tmp_path) -> Path:
    path = tmp_path / "hotel-runs.jsonl"
    path.write_text("".join(json.dumps(hotel_run(i)) + "\n" for i in range(14)))
    return path


def test_inspect_a_success_flag_log_without_a_mapping_finds_failures_and_candidates(hotel_log, capsys):
    assert main(["inspect", str(hotel_log), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["format"] == "messages"
    assert found["detected"] == {"id_path": "id", "goal_path": "instruction", "success_path": "success"}
    assert (found["successes"], found["failures"]) == (2, 12)  # runs 0 and 7 succeeded
    assert found["would_relabel"] == 12  # every failure booked a room: an evidenced write


def test_a_mistyped_path_stops_the_run_naming_it_and_the_keys_records_have(hotel_log, tmp_path, capsys):
    code = main(["run", "--input", str(hotel_log), "--out", str(tmp_path / "out"), "--map", "success_path=succes",
                 "--params", str(write_params(tmp_path / "params.yaml"))])
    err = capsys.readouterr().err
    assert code == 2 and "success_path = 'succes' (mapped) is in none of the 14 records" in err
    assert "their keys: " in err and "success" in err.split("their keys: ")[1]
    assert not (tmp_path / "out" / "00_trajectories.parquet").exists()  # nothing half-written


@pytest.mark.slow
def test_a_full_run_of_a_success_flag_only_log_is_not_stopped_by_the_failure_type_gate(hotel_log, tmp_path,
                                                                                       llm_server, capsys):
    params = write_params(tmp_path / "params.yaml", llm_server, llm={"concurrency": 4},
                          gates={"acceptance_rate": [0.0, 1.0]})
    assert main(["run", "--input", str(hotel_log), "--out", str(tmp_path / "out"), "--params", str(params)]) == 0
    assert "detected from the first 14 records" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["classify"]["by_failure_type"] == {"wrong_result": 12}  # one type: > 95% share
    assert any("max_failure_type_share" in note for note in summary["gates"]["adapted"])
    assert summary["stages"]["extract"]["out"] == 12 and summary["reconciliation"]["ok"]


def test_inspect_shows_a_react_log_as_parsed_steps_and_the_relabel_count(capsys):
    assert main(["inspect", str(REACT)]) == 0
    out = capsys.readouterr().out
    assert "ASSISTANT CALLS search(" in out and "TOOL RESULT click:" in out  # text actions, parsed
    # 6 runs by hand: 1 success; of the 5 failures, 2 made an evidenced write (add_to_cart / buy_now),
    # 2 only searched and clicked, 1 has no parsable action at all
    assert "records: 6 in, 1 successes, 5 failures" in out
    assert "would reach relabeling: 2 of 5 failures" in out
    assert "no tool calls or parsable actions in this run" in out
