"""Rule classification against the benchmarks' own ground truth, on the shipped real logs."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest
from conftest import TAU, TOOLBENCH, ingest, make_params

from agenther import schema
from agenther.stages.classify import classify

READS = ("get_", "search_", "list_", "calculate", "think", "transfer_to_human_agents")


def _ground_truth_diff(record: dict) -> tuple[Counter, Counter]:
    """Independent of agenther: expected write actions vs write calls whose result was not an error,
    read straight from the raw tau-bench JSON."""
    expected = Counter(
        (a["name"], json.dumps(a["kwargs"], sort_keys=True))
        for a in record["info"]["task"]["actions"] if not a["name"].startswith(READS)
    )
    done = Counter()
    traj = record["traj"]
    for i, m in enumerate(traj):
        # tau-bench logs reuse call ids, so pair each call with the tool turns that follow it.
        following = [t for t in traj[i + 1:i + 1 + len(m.get("tool_calls") or [])] if t["role"] == "tool"]
        for call, result in zip(m.get("tool_calls") or [], following, strict=False):
            name = call["function"]["name"]
            if name.startswith(READS) or result["content"].startswith("Error"):
                continue
            done[(name, json.dumps(json.loads(call["function"]["arguments"]), sort_keys=True))] += 1
    return expected - done, done - expected


@pytest.fixture(scope="module")
def tau_classified(tmp_path_factory):
    params = make_params(tmp_path_factory.mktemp("p"))
    return classify(ingest(TAU).trajectories, params)


def test_tau_bench_failure_types_agree_with_ground_truth_action_diff(tau_classified):
    raw = {f"tau-bench/gpt-4o-airline/task{r['task_id']}-trial{r['trial']}": r for r in json.loads(TAU.read_text())}
    failures = tau_classified.filter(pl.col("is_failure"))
    assert failures.height == 116
    assert tau_classified.filter(~pl.col("is_failure"))["reward"].min() == 1.0
    checked = Counter()
    for row in failures.iter_rows(named=True):
        missing, extra = _ground_truth_diff(raw[row["id"]])
        wrong_args = {n for n, _ in missing} & {n for n, _ in extra}
        kind = row["failure_type"]
        if extra and not wrong_args:
            assert kind == "constraint_violation", row["id"]
        elif wrong_args:
            assert kind == "wrong_result", row["id"]
        elif missing:
            assert kind in ("incomplete", "tool_error", "hallucination"), row["id"]
        else:
            # All write actions right yet reward 0: the benchmark faulted the answer, not the actions.
            assert kind == "wrong_result" and row["severity"] <= 0.2, row["id"]
        checked[kind] += 1
    # The real log has more than one kind of failure; a classifier that says one thing fails here.
    assert len(checked) >= 3, checked


def test_severity_direction_near_misses_below_total_misses(tau_classified):
    failures = tau_classified.filter(pl.col("is_failure"))
    assert failures["severity"].is_between(0.0, 1.0).all()
    # Every write action right (only the answer was off) is a near miss...
    near = failures.filter(pl.col("classify_reason").str.contains("missing \\[\\], extra \\[\\]"))
    # ...and runs that never made one expected call (not even a lookup) are total misses.
    total = failures.filter(pl.col("classify_reason").str.starts_with("required actions never executed")
                            & (pl.col("severity") == 1.0))
    assert near.height and total.height
    assert near["severity"].max() < total["severity"].min()
    assert failures["severity"].n_unique() > 5  # graded, not a two-valued flag


def test_successes_are_not_failures_and_not_recoverable(tau_classified):
    ok = tau_classified.filter(pl.col("success"))
    assert ok.height == 84
    assert set(ok["failure_type"]) == {schema.NOT_A_FAILURE}
    assert not ok["recoverable"].any()


def test_toolbench_give_up_and_errors(tmp_path):
    classified = classify(ingest(TOOLBENCH).trajectories, make_params(tmp_path))
    metas = [json.loads(m) for m in classified["metadata"]]
    # every shipped record is classified, and each branch below has records to check
    assert classified.height == 15
    assert {m["win"] for m in metas} == {True, False} and any(m["finish_type"] == "give_up" for m in metas)
    assert any(not m["win"] and m["finish_type"] != "give_up" for m in metas)
    for row in classified.iter_rows(named=True):
        meta = json.loads(row["metadata"])
        if meta["win"]:
            assert row["failure_type"] == schema.NOT_A_FAILURE
        elif meta["finish_type"] == "give_up":
            assert row["failure_type"] in ("tool_error", "incomplete"), row["id"]
        else:
            assert row["is_failure"], row["id"]
