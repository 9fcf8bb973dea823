"""Great Expectations gates: clean tables pass; corrupted or collapsed ones stop the run
before the next stage, with a message that names the failed expectation; nothing downstream
is written. Real GX (no mocks): every test here fails if its gate does not fire."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import TAU, ingest, make_params, write_params

from agenther import gates, schema
from agenther.cli import main
from agenther.llm import LLMs
from agenther.params import Params, ParamsError, load_params
from agenther.runner import run_stage
from agenther.stages.classify import classify
from agenther.stages.extract import extract
from agenther.tables import write_table
from agenther.workdir import TABLES


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params()


@pytest.fixture(scope="module")
def tables(params) -> dict[str, pl.DataFrame]:
    """The real shipped tau-bench log through ingest and rule classify/extract, plus relabel
    and verify columns in the shape those stages write (varied confidences, 80% accepted)."""
    trajectories = ingest(TAU).trajectories
    classified = classify(trajectories, params, None)
    extracted = extract(classified, params, None).kept
    n = extracted.height
    relabeled = extracted.with_columns(
        hindsight_prompt=pl.lit("Please look up my reservation and tell me the flight status."),
        rewrites=pl.lit("[]"),
        relabel_confidence=pl.Series([0.7 + 0.29 * (i % 7) / 6 for i in range(n)]),
        relabel_attempts=pl.Series([1 + i % 3 for i in range(n)], dtype=pl.Int64),
        relabel_rationale=pl.lit("the trajectory shows it"),
        relabel_model=pl.lit("test"),
    ).select(list(schema.RELABELED))
    judgement = {"judge": "grounding", "model": "rules", "accept": True, "confidence": 1.0, "reason": "ok"}
    accepted = [i % 5 != 0 for i in range(n)]
    verified = relabeled.with_columns(
        judgements=pl.Series([[judgement | {"accept": a}] for a in accepted], dtype=schema.VERIFIED["judgements"]),
        verified=pl.Series(accepted),
    ).select(list(schema.VERIFIED))
    return {"trajectories": trajectories, "classified": classified, "extracted": extracted,
            "relabeled": relabeled, "verified": verified}


def _fails(df: pl.DataFrame, table: str, params: dict, tmp_path=None) -> gates.GateFailed:
    with pytest.raises(gates.GateFailed) as info:
        gates.check(df, table, params, tmp_path)
    return info.value


def _failed_types(error: gates.GateFailed) -> set[str]:
    return {f"{e['batch']}:{e['type']}:{e['kwargs'].get('column', '')}"
            for e in error.result["expectations"] if not e["success"]}


def _set(df: pl.DataFrame, column: str, row: int, value) -> pl.DataFrame:
    values = df[column].to_list()
    values[row] = value
    return df.with_columns(pl.Series(column, values, dtype=df.schema[column]))


# --- clean tables pass ----------------------------------------------------------------------

@pytest.mark.parametrize("table", list(gates.CONTRACTS))
def test_clean_tables_pass_and_results_are_kept(tables, params, tmp_path, table):
    df = tables[table]
    assert df.height >= 10, "the fixture must be big enough for the distribution checks"
    result = gates.check(df, table, params, tmp_path / "gates")
    assert result["success"] and result["distribution_checks"]
    saved = json.loads((tmp_path / "gates" / f"{table}.json").read_text())
    assert saved["success"] is True and saved["rows"] == df.height
    for entry in saved["expectations"]:  # each expectation with its kwargs and observed value
        assert {"type", "kwargs", "success", "observed"} <= set(entry)
    # The file is a stable record: the same table gives the same bytes.
    first = (tmp_path / "gates" / f"{table}.json").read_bytes()
    gates.check(df, table, params, tmp_path / "gates")
    assert (tmp_path / "gates" / f"{table}.json").read_bytes() == first


def test_clean_classified_table_runs_the_distribution_checks(tables, params):
    result = gates.check(tables["classified"], "classified", params, None)
    shares = [e for e in result["expectations"] if e["batch"] == "classified.failure_type_shares"]
    assert shares and shares[0]["success"] and shares[0]["observed"]["element_count"] >= 4


def test_verified_and_relabeled_distribution_checks_ran(tables, params):
    for table, column in (("relabeled", "relabel_confidence"), ("verified", "verified")):
        result = gates.check(tables[table], table, params, None)
        means = [e for e in result["expectations"] if e["type"] == "expect_column_mean_to_be_between"]
        assert [e["kwargs"]["column"] for e in means] == [column]


@pytest.mark.parametrize("table", list(gates.CONTRACTS))
def test_empty_tables_pass_but_still_check_columns(tables, params, table):
    empty = tables[table].clear()
    assert gates.check(empty, table, params, None)["success"]
    error = _fails(empty.drop("id"), table, params)
    assert "expect_table_columns_to_match_set" in str(error) and "'id'" in str(error)


# --- corrupted outputs fail, naming the expectation and the column --------------------------

def test_relabel_confidence_above_one_fails(tables, params, tmp_path):
    bad = _set(tables["relabeled"], "relabel_confidence", 3, 1.7)
    error = _fails(bad, "relabeled", params, tmp_path)
    message = str(error)
    first, *lines = message.splitlines()
    assert first.startswith("gate 'relabeled' failed") and "1 of" in first and str(tmp_path) in first
    assert len(lines) == 1
    assert "expect_column_values_to_be_between(column='relabel_confidence', min_value=0.0, max_value=1.0)" in lines[0]
    assert "1.7" in lines[0] and bad["id"][3] in lines[0]  # the value and the row it came from
    saved = json.loads((tmp_path / "relabeled.json").read_text())
    assert saved["success"] is False
    failed = [e for e in saved["expectations"] if not e["success"]]
    assert failed[0]["observed"]["partial_unexpected_list"] == [1.7]


@pytest.mark.parametrize("table,column", [("classified", "severity"), ("relabeled", "hindsight_prompt"),
                                          ("verified", "judgements"), ("trajectories", "messages")])
def test_missing_column_fails_naming_it(tables, params, table, column):
    error = _fails(tables[table].drop(column), table, params)
    assert "expect_table_columns_to_match_set" in str(error)
    assert f"missing columns ['{column}']" in str(error)


def test_wrong_dtype_fails_naming_the_column(tables, params):
    bad = tables["classified"].with_columns(pl.col("severity").cast(pl.String))
    error = _fails(bad, "classified", params)
    assert "expect_column_polars_dtype_to_be(column='severity', dtype='Float64'): observed 'String'" in str(error)


def test_unknown_enum_value_fails(tables, params):
    bad = _set(tables["classified"], "failure_type", 0, "bad_vibes")
    assert "'bad_vibes'" in str(_fails(bad, "classified", params))
    bad = _set(tables["trajectories"], "source_format", 0, "webarena")
    assert "column='source_format'" in str(_fails(bad, "trajectories", params))


def test_duplicate_or_null_ids_fail(tables, params):
    df = tables["trajectories"]
    dup = _set(df, "id", 1, df["id"][0])
    assert "trajectories:expect_column_values_to_be_unique:id" in _failed_types(_fails(dup, "trajectories", params))
    null = _set(df, "id", 1, None)
    assert "trajectories:expect_column_values_to_not_be_null:id" in _failed_types(_fails(null, "trajectories", params))


def test_judge_confidence_outside_range_fails(tables, params):
    df = tables["verified"]
    rows = df["judgements"].to_list()
    rows[2] = [rows[2][0] | {"confidence": 1.5}]
    bad = df.with_columns(pl.Series("judgements", rows, dtype=schema.VERIFIED["judgements"]))
    error = _fails(bad, "verified", params)
    assert _failed_types(error) == {"verified.judgements:expect_column_values_to_be_between:confidence"}
    assert "1.5" in str(error)


# --- collapses fail (n >= min rows); small runs are not judged -------------------------------

def _confidences(df: pl.DataFrame, value: float, n: int) -> pl.DataFrame:
    return df.head(n).with_columns(relabel_confidence=pl.lit(value))


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_zero_or_all_one_confidence_fails(tables, params, value):
    # threshold 0: only the distribution check stands between a collapsed relabeler and the dataset
    p = load_params(None, {"relabel": {"confidence_threshold": 0.0}})
    error = _fails(_confidences(tables["relabeled"], value, 12), "relabeled", p)
    assert _failed_types(error) == {"relabeled:expect_column_mean_to_be_between:relabel_confidence"}
    assert f"observed {value!r}" in str(error) and "gates.relabel_confidence_mean" in str(error)


def test_constant_but_plausible_confidence_passes(tables, params):
    # the scripted test LLM (and greedy small models) answer 0.9 every time: not a collapse
    assert gates.check(_confidences(tables["relabeled"], 0.9, 12), "relabeled", params, None)["success"]
    # ...unless the user asks for spread
    p = load_params(None, {"gates": {"relabel_confidence_min_stdev": 0.01}})
    error = _fails(_confidences(tables["relabeled"], 0.9, 12), "relabeled", p)
    assert "expect_column_stdev_to_be_between" in str(error)


def test_small_tables_skip_distribution_checks(tables, params):
    p = load_params(None, {"relabel": {"confidence_threshold": 0.0}})
    result = gates.check(_confidences(tables["relabeled"], 0.0, 9), "relabeled", p, None)
    assert result["success"] and not result["distribution_checks"]


def test_full_acceptance_fails(tables, params):
    all_accepted = tables["verified"].head(12).with_columns(verified=pl.lit(True))
    error = _fails(all_accepted, "verified", params)
    assert _failed_types(error) == {"verified:expect_column_mean_to_be_between:verified"}
    assert "observed 1.0" in str(error) and "gates.acceptance_rate" in str(error)
    assert gates.check(all_accepted.head(9), "verified", params, None)["success"]  # too few to judge


def test_collapsed_failure_types_fail(tables, params):
    df = tables["classified"]
    collapsed = df.with_columns(
        failure_type=pl.when(pl.col("is_failure")).then(pl.lit("wrong_result")).otherwise(pl.col("failure_type")))
    error = _fails(collapsed, "classified", params)
    assert _failed_types(error) == {"classified.failure_type_shares:expect_column_values_to_be_between:share"}
    assert "failure_type wrong_result" in str(error) and "gates.max_failure_type_share" in str(error)
    # the one line a stopped run prints says which param sets the bound
    assert "to change the bound: gates.max_failure_type_share in " \
        "params.yaml" in str(error).splitlines()[0]
    relaxed = load_params(None, {"gates": {"max_failure_type_share": 1.0}})
    assert gates.check(collapsed, "classified", relaxed, None)["success"]


def test_bad_gate_params_are_a_params_error():
    with pytest.raises(ParamsError, match="gates.acceptance_rate"):
        load_params(None, {"gates": {"acceptance_rate": [0.5, 1.2]}})


# --- through the stage runner and the CLI: nothing downstream is written ---------------------

@pytest.fixture
def work(tmp_path):
    """A work folder after ingest and classify of 30 tau-bench records, with params."""
    p = make_params(tmp_path, ingest={"input": str(TAU), "limit": 30})
    folder = tmp_path / "work"
    with LLMs.from_params(p) as llms:
        for stage in ("ingest", "classify"):
            run_stage(stage, p, folder, tmp_path / "out", llms)
    assert (folder / "gates" / "trajectories.json").exists()  # classify passed the ingest gate
    return folder, p


def _corrupt_severity(folder) -> None:
    path = folder / TABLES["classified"]
    write_table(_set(pl.read_parquet(path), "severity", 0, 1.7), path)


def test_stage_runner_stops_at_the_gate_and_writes_nothing_downstream(work, tmp_path):
    folder, p = work
    _corrupt_severity(folder)
    with LLMs.from_params(p) as llms, pytest.raises(gates.GateFailed) as info:
        run_stage("extract", p, folder, tmp_path / "out", llms)
    assert "gate 'classified' failed" in str(info.value) and "column='severity'" in str(info.value)
    assert not (folder / TABLES["extracted"]).exists()
    assert not (folder / TABLES["extract_rejected"]).exists()
    assert not (folder / "02_extract.json").exists()
    saved = json.loads((folder / "gates" / "classified.json").read_text())
    assert saved["success"] is False and saved["source"].endswith("01_classified.parquet")


def test_stage_runner_stops_on_a_missing_column(work, tmp_path):
    folder, p = work
    path = folder / TABLES["classified"]
    write_table(pl.read_parquet(path).drop("recoverable"), path)
    with LLMs.from_params(p) as llms, pytest.raises(gates.GateFailed, match=r"missing columns \['recoverable'\]"):
        run_stage("extract", p, folder, tmp_path / "out", llms)
    assert not (folder / TABLES["extracted"]).exists()


def test_disabled_gates_let_the_stage_run(work, tmp_path):
    folder, p = work
    _corrupt_severity(folder)
    off = p.model_copy(deep=True)
    off.gates.enabled = False
    with LLMs.from_params(off) as llms:
        run_stage("extract", off, folder, tmp_path / "out", llms)
    assert (folder / TABLES["extracted"]).exists()
    assert not (folder / "gates" / "classified.json").exists()  # no stale verdict


def test_cli_stage_exits_nonzero_with_the_gate_message(work, tmp_path, capsys):
    folder, p = work
    _corrupt_severity(folder)
    params_file = write_params(tmp_path / "params.yaml")
    code = main(["stage", "extract", "--params", str(params_file), "--work", str(folder),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("agenther: error: gate 'classified' failed")
    assert "expect_column_values_to_be_between(column='severity', min_value=0.0, max_value=1.0)" in err
    assert "1.7" in err
    assert not (folder / TABLES["extracted"]).exists()
