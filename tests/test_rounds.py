"""Incremental rounds (agenther/rounds.py) through the `agenther round` / `agenther rounds` commands,
LLM answers from the scripted server: a second round processes only the logs that landed since the
first, the published union holds the same samples as one `agenther run` on all the logs, and each
sample says its round; nothing new makes no round; another param starts another lineage."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, write_params
from llm_server import FakeLLMServer, careful_brain

from agenther.cli import main
from agenther.lineage import PUBLISHED, lineage_of, read_manifest
from agenther.workdir import TABLES

# tau-bench's file holds trial 0 of tasks 0-49, then trial 1 of tasks 0-49, ...: day 1 brings trial 0
# of tasks 0-19, day 2 trial 1 of the same tasks. Both days' files have the same name (as a daily dump
# would), so their runs share task keys: preference pairs join runs of two rounds.
DAY1, DAY2 = slice(0, 20), slice(50, 70)


def _write_day(incoming: Path, day: str, records: list, indent: int | None = None) -> Path:
    path = incoming / day / "gpt-4o-airline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=indent))
    return path


def _rows(folder: Path, name: str) -> list[dict]:
    path = folder / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _without_round(rows: list[dict]) -> list[dict]:
    return [r | {"metadata": {k: v for k, v in r["metadata"].items() if k != "round"}} for r in rows]


class Rounds:
    """The scripted LLM server, params, an incoming folder and a rounds root."""

    def __init__(self, tmp_path: Path, server: FakeLLMServer):
        self.tmp, self.server = tmp_path, server
        self.incoming, self.root = tmp_path / "incoming", tmp_path / "rounds"
        self.params = write_params(tmp_path / "params.yaml", server, cache=tmp_path / "cache",
                                   llm={"concurrency": 4})


@pytest.fixture
def rounds(tmp_path, capsys):
    with FakeLLMServer(careful_brain) as server:
        r = Rounds(tmp_path, server)

        def run_round(*extra, params=None):
            capsys.readouterr()
            code = main(["round", "--input", str(r.incoming), "--root", str(r.root),
                         "--params", str(params or r.params), *extra])
            printed = capsys.readouterr()
            r.said = printed.err  # the one-line message of the round (or why there was none)
            return code, json.loads(printed.out)

        r.run_round = run_round
        yield r


def test_rounds_process_only_new_logs_and_publish_the_union_of_a_single_run(rounds, tmp_path, capsys):
    records = json.loads(TAU.read_text())
    server = rounds.server
    _write_day(rounds.incoming, "day1", records[DAY1])

    # Round 1: the first day's 20 runs.
    calls = len(server.requests)
    code, first = rounds.run_round()
    round1_calls = len(server.requests) - calls
    assert code == 0, first
    assert (first["round"], first["records_read"], first["new_trajectories"], first["skipped_seen"]) == (1, 20, 20, 0)
    assert first["reconciled"]
    assert round1_calls > 0
    folder = Path(first["folder"])
    assert folder.name == lineage_of(_params(rounds.params))["id"]

    # Round 2, after the second day landed: only its 20 runs go through the stages.
    day2 = _write_day(rounds.incoming, "day2", records[DAY2])
    calls = len(server.requests)
    code, second = rounds.run_round()
    assert code == 0, second
    round2_requests = server.requests[calls:]
    assert (second["round"], second["records_read"], second["new_trajectories"]) == (2, 20, 20)
    assert second["reconciled"]
    r2 = folder / "round-0002"
    # Its stages saw the new half only: the tables' ids and each stage's input count.
    ids = pl.read_parquet(r2 / TABLES["classified"])["id"].to_list()
    assert len(ids) == 20 and all(i.endswith("-trial1") for i in ids)
    stats = json.loads((r2 / "summary.json").read_text())
    assert stats["stages"]["classify"]["in"] == 20
    assert stats["stages"]["extract"]["in"] == stats["stages"]["classify"]["failures"]
    # and every LLM request of round 2 was about a day-2 run: none repeats a day-1 request
    day1_requests = {json.dumps(r["messages"], sort_keys=True) for r in server.requests[:calls]}
    assert round2_requests and not any(json.dumps(r["messages"], sort_keys=True) in day1_requests
                                       for r in round2_requests)
    assert len(round2_requests) == stats["llm"]["total"]["calls"]
    assert stats["llm"]["total"]["cache_hits"] == 0  # day 1's runs again would be answered by the LLM cache

    # The union equals one run on all the logs (its own LLM cache: every answer asked again).
    single_params = write_params(tmp_path / "single.yaml", server, cache=tmp_path / "single-cache",
                                 llm={"concurrency": 4})
    capsys.readouterr()
    assert main(["run", "--input", str(rounds.incoming), "--out", str(tmp_path / "single"),
                 "--params", str(single_params)]) == 0
    published, single = folder / PUBLISHED, tmp_path / "single"
    for name in ("sft.jsonl", "dpo.jsonl", "sharegpt.jsonl"):
        union_rows, single_rows = _rows(published, name), _rows(single, name)
        assert union_rows, name
        assert _without_round(union_rows) == single_rows, name
    # each sample's metadata carries its round: both rounds made samples, and pairs that join
    # a day-1 run with a day-2 run are round 2's (they exist once both have landed)
    sft = _rows(published, "sft.jsonl")
    by_round = {r["metadata"]["trajectory_id"]: r["metadata"]["round"] for r in sft}
    assert {1, 2} == set(by_round.values())
    assert all(rnd == (2 if tid.endswith("-trial1") else 1) for tid, rnd in by_round.items())
    dpo = _rows(published, "dpo.jsonl")
    assert dpo and all(r["metadata"]["round"] == 2 for r in dpo)  # every pair needs a day-2 run here
    summary = json.loads((published / "summary.json").read_text())
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    single_summary = json.loads((single / "summary.json").read_text())
    assert summary["stages"] == single_summary["stages"]
    # and the two rounds asked the LLM exactly what the single run asked, no call more or less
    assert round1_calls + len(round2_requests) == single_summary["llm"]["total"]["calls"]
    assert summary["llm"]["total"]["calls"] == round1_calls + len(round2_requests)

    # `agenther rounds` lists the lineage with both rounds and their counts.
    capsys.readouterr()
    assert main(["rounds", "--root", str(rounds.root)]) == 0
    listing = capsys.readouterr().out
    assert f"lineage {folder.name}" in listing
    lines = [line.split() for line in listing.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[2], row[3], row[4]) for row in lines] == [("1", "20", "20", "0"), ("2", "20", "20", "0")]
    manifest = read_manifest(folder)
    assert [r["counts"]["new_trajectories"] for r in manifest["rounds"]] == [20, 20]
    assert manifest["rounds"][1]["published"]["sft"] == len(sft)

    # Nothing new: no round, no LLM request. Unchanged files are not even read; a rewritten file
    # (same runs, other bytes) is read and every run in it skipped as seen.
    calls = len(server.requests)
    code, third = rounds.run_round()
    assert (code, third["round"]) == (0, None)
    assert "no new or changed log files" in rounds.said
    _write_day(rounds.incoming, "day2", records[DAY2], indent=1)
    assert day2.read_bytes() != json.dumps(records[DAY2]).encode()
    code, fourth = rounds.run_round()
    assert (code, fourth["round"]) == (0, None)
    assert "20 already processed" in rounds.said
    assert len(server.requests) == calls
    assert not (folder / "round-0003").exists() and len(read_manifest(folder)["rounds"]) == 2

    # A changed param starts a new lineage of its own, from round 1; the old one stays as it was.
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    other = write_params(tmp_path / "other.yaml", rounds.server, cache=tmp_path / "cache",
                         llm={"concurrency": 4}, package={"weight_alpha": 0.8})
    code, new_lineage = rounds.run_round(params=other)
    assert code == 0 and new_lineage["round"] == 1 and new_lineage["new_trajectories"] == 40
    assert Path(new_lineage["folder"]) != folder
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    assert main(["rounds", "--root", str(rounds.root)]) == 0
    assert capsys.readouterr().out.count("lineage ") == 2


def _params(path: Path) -> dict:
    from agenther.params import load_params

    return load_params(path)


def test_a_changed_file_is_read_again_and_only_its_new_or_corrected_runs_make_the_round(rounds):
    records = json.loads(TAU.read_text())[:12]
    broken = {"task_id": 99, "trial": 0, "reward": "high", "info": {}, "traj": []}  # quarantined: reward
    _write_day(rounds.incoming, "day1", [records[0], broken, *records[1:10]])
    code, first = rounds.run_round()
    assert code == 0 and (first["new_trajectories"], first["quarantined"]) == (10, 1)

    # The same file, rewritten: run 0 corrected (same id, other content), two runs appended; the
    # broken record is still there.
    corrected = json.loads(json.dumps(records[0]))
    user = next(m for m in corrected["traj"] if m["role"] == "user")
    user["content"] += " Thanks!"
    _write_day(rounds.incoming, "day1", [corrected, broken, *records[1:12]])
    code, second = rounds.run_round()
    assert code == 0 and second["reconciled"], second
    # 13 records read: run 0 (corrected) and the two appended are new; 9 runs and the broken record
    # were seen by round 1
    assert (second["records_read"], second["new_trajectories"], second["skipped_seen"], second["quarantined"]) \
        == (13, 3, 10, 0)
    folder = Path(second["folder"])
    published = pl.read_parquet(folder / PUBLISHED / TABLES["classified"])
    assert published.height == 12 and published["id"].n_unique() == 12  # the corrected run once
    (run0,) = published.filter(pl.col("id").str.ends_with("/task0-trial0")).to_dicts()
    assert any("Thanks!" in (m["content"] or "") for m in run0["messages"])  # its latest version
    assert pl.read_parquet(folder / PUBLISHED / TABLES["quarantine"]).height == 1
    summary = json.loads((folder / PUBLISHED / "summary.json").read_text())
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    assert summary["stages"]["ingest"]["out"] == 12
