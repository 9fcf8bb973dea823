"""Progress lines: what a long stage shows on a terminal and in a log, and that a run prints them."""

from __future__ import annotations

import io
import json
import time

from conftest import TAU, write_params

from agenther import progress
from agenther.cli import main


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_records_count_one_by_one_then_by_batch_and_the_log_gets_plain_lines(monkeypatch):
    calls = [0]
    log = io.StringIO()
    quiet = io.StringIO()
    with progress.Progress("classify", 10, lambda: 0, quiet) as shown:
        shown.advance(10, kept=10)
    assert quiet.getvalue() == ""  # not a terminal and done within 30 s: nothing said
    monkeypatch.setenv("AGENTHER_PROGRESS_S", "0.05")
    with progress.Progress("relabel", 10, lambda: calls[0], log) as shown:
        for _ in range(3):
            progress.record_done()  # as the concurrent map reports them
        calls[0] = 7
        assert shown.line().startswith("relabel: 3/10 records, 0 kept, 7 LLM calls (")
        assert "ETA 0:00:0" in shown.line()
        shown.advance(5, kept=2)  # the batch of 5 ends: its 3 records are not counted twice
        assert shown.done == 5 and shown.kept == 2
        time.sleep(0.2)  # a few lines in the log
    progress.record_done()  # no stage shown: nothing to count, no error
    lines = log.getvalue().splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("relabel: 5/10 records, 2 kept, 7 LLM calls")


def test_a_terminal_line_is_redrawn_in_place():
    screen = Terminal()
    with progress.Progress("verify", 2, lambda: 0, screen) as shown:
        shown.advance(2, kept=1)
    assert screen.getvalue().startswith("\r\033[K") and screen.getvalue().endswith("verify: 2/2 records, 1 kept, "
                                                                                    "0:00:00 elapsed\n")


def test_a_run_shows_every_table_stage(tmp_path, llm_server, capsys, monkeypatch):
    monkeypatch.setenv("AGENTHER_PROGRESS_S", "0")  # a log line when each stage ends, however short
    params = write_params(tmp_path / "params.yaml", llm_server)
    assert main(["run", "--input", str(TAU), "--out", str(tmp_path / "out"), "--limit", "12", "--params", str(params)]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    calls = summary["llm"]["total"]["calls"]
    assert "classify: 12/12 records, 12 kept" in err
    assert f"relabel+verify: {summary['stages']['relabel']['in']}/{summary['stages']['relabel']['in']} records, " \
           f"{summary['stages']['verify']['out']} kept, {calls} LLM calls" in err


def test_verify_counts_a_record_once_whatever_number_of_judges_it_meets(tmp_path, llm_server):
    """verify asks judge after judge over the records: a record is done when its last judge (or
    the first that rejects it) answers, not once per judge."""
    from conftest import ingest, make_params

    from agenther.llm import LLMClient
    from agenther.stages.classify import classify
    from agenther.stages.extract import extract
    from agenther.stages.relabel import relabel
    from agenther.stages.verify import verify

    params = make_params(tmp_path, llm_server)
    client = LLMClient(model="openai/local", api_base=llm_server.api_base, api_key="x", cache_dir=tmp_path / "c")
    extracted = extract(classify(ingest(TAU, limit=24).trajectories, params), params).kept
    relabeled = relabel(extracted, params, client).kept
    assert relabeled.height >= 3 and len(params.verify.judges) >= 3
    with progress.Progress("verify", relabeled.height, lambda: 0, io.StringIO()) as shown:
        verify(relabeled, params, client)
        assert shown.done == relabeled.height
