"""Parameters (agenther/params.py): one pydantic model per section. The shipped params.yaml loads
with every value as written (type included: that keeps its lineage hash and the cache keys);
an unknown key or a bad value is a ParamsError naming the key's dotted path and the file it
came from, one line, which `agenther run` / `agenther stage` print before exiting 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TAU, write_params

from agenther.adapters.messages import MessagesMapping
from agenther.cli import main
from agenther.params import JUDGE_NAMES, Params, ParamsError, load_params, params_hash

SHIPPED = ROOT / "params.yaml"


def _same(stated, loaded, path: str = "") -> None:
    """Every value `stated` appears in `loaded` with the same type and value."""
    if isinstance(stated, dict):
        assert isinstance(loaded, dict), path
        for key, value in stated.items():
            assert key in loaded, f"{path}{key} missing"
            _same(value, loaded[key], f"{path}{key}.")
    else:
        assert type(loaded) is type(stated) and loaded == stated, f"{path}: {stated!r} loaded as {loaded!r}"
        if isinstance(stated, list):
            for i, (s, v) in enumerate(zip(stated, loaded, strict=True)):
                _same(s, v, f"{path}{i}.")


def _error(tmp_path: Path, **sections: dict) -> str:
    """The ParamsError of a params file with `sections` (written by conftest's write_params)."""
    path = write_params(tmp_path / "bad.yaml", **sections)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1, message
    return message


# --- the shipped file and the defaults -----------------------------------------------------

def test_the_shipped_params_load_as_written():
    stated = yaml.safe_load(SHIPPED.read_text())
    loaded = load_params(SHIPPED)
    _same(stated, loaded.model_dump())
    dumped, defaults = loaded.model_dump(), Params().model_dump()
    assert dumped.keys() == defaults.keys()
    for section, values in dumped.items():  # what the file does not state is the default
        assert values.keys() == defaults[section].keys(), section
    # An int where the default is a float stays an int (JSON 8, not 8.0: the hash is the file's).
    assert type(stated["ingest"]["max_trajectory_mb"]) is int is type(loaded.ingest.max_trajectory_mb)
    assert isinstance(Params().ingest.max_trajectory_mb, float)


def test_the_defaults_load_unchanged_and_loading_again_changes_nothing():
    assert load_params(None) == Params()
    _same(Params().model_dump(), load_params(None).model_dump())
    assert load_params(SHIPPED, {}) == load_params(SHIPPED)
    # Validation adds nothing and converts nothing: loading a loaded dict gives it back.
    shipped = load_params(SHIPPED)
    again = yaml.safe_dump(shipped.model_dump())
    assert params_hash(load_params(None, yaml.safe_load(again))) == params_hash(shipped)
    assert params_hash(load_params(None)) == params_hash(Params())


def test_temperatures_are_floats_as_the_llm_requests_send_them():
    assert load_params(None, {"relabel": {"temperatures": [0, 0.5, 1]}}).relabel.temperatures == [0.0, 0.5, 1.0]
    assert all(isinstance(t, float) for t in load_params(None, {"relabel": {"temperatures": [0, 1]}}).relabel.temperatures)


def test_the_verify_judges_are_the_stage_s_judges():
    from agenther.stages.verify import JUDGES

    assert set(JUDGE_NAMES) == set(JUDGES) and Params().verify.judges == list(JUDGE_NAMES)


# --- unknown keys and wrong types: the dotted path and the file ------------------------------

def test_unknown_keys_name_their_dotted_path(tmp_path):
    message = _error(tmp_path, relabel={"confidnce_threshold": 0.8})
    assert "unknown parameter relabel.confidnce_threshold" in message
    assert "known: confidence_threshold, max_attempts" in message
    assert "unknown parameter llm.concurency" in _error(tmp_path, llm={"concurency": 4})
    assert "unknown parameter colour" in _error(tmp_path, colour={"x": 1})


@pytest.mark.parametrize("sections,expected", [
    ({"llm": {"concurrency": "4"}}, "llm.concurrency: Input should be a valid integer, got '4'"),
    ({"relabel": {"confidence_threshold": [0.7]}}, "relabel.confidence_threshold: Input should be a number"),
    ({"llm": {"processes": 1.5}}, "llm.processes: Input should be a valid integer"),
    ({"llm": {"budget_usd": "10"}}, "llm.budget_usd: Input should be a number"),
    ({"llm": {"model": 4}}, "llm.model: Input should be a valid string"),
    ({"package": {"include_successes": "yes"}}, "package.include_successes: Input should be a valid boolean"),
    ({"gates": {"enabled": 1}}, "gates.enabled: Input should be a valid boolean"),
    ({"relabel": {"max_attempts": True}}, "relabel.max_attempts: Input should be a valid integer"),
    ({"relabel": {"temperatures": "0.2"}}, "relabel.temperatures: Input should be a valid list"),
    ({"relabel": {"temperatures": [0.2, "hot"]}}, "relabel.temperatures.1: Input should be a number"),
    ({"tools": {"writes": "cancel"}}, "tools.writes: Input should be a valid list"),
    ({"tools": {"requests": {"issue_refund": "refund"}}}, "tools.requests.issue_refund: Input should be a valid list"),
    ({"ingest": {"messages": ["role"]}}, "ingest.messages: Input should be a valid dictionary"),
])
def test_wrong_types_name_their_dotted_path(tmp_path, sections, expected):
    assert expected in _error(tmp_path, **sections)


def test_a_section_must_be_a_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("verify: all\n")
    with pytest.raises(ParamsError, match=r"flat.yaml: verify: Input should be a valid dictionary.*, got 'all'$"):
        load_params(path)


@pytest.mark.parametrize("sections,expected", [
    ({"verify": {"policy": "most"}}, "verify.policy: Input should be 'all' or 'majority', got 'most'"),
    ({"classify": {"mode": "gpt"}}, "classify.mode: Input should be 'rule' or 'llm'"),
    ({"extract": {"mode": "LLM"}}, "extract.mode: Input should be 'rule' or 'llm'"),
    ({"relabel": {"confidence_threshold": 1.5}}, "relabel.confidence_threshold: Input should be a number within [0, 1]"),
    ({"relabel": {"confidence_threshold": -0.1}}, "relabel.confidence_threshold"),
    ({"relabel": {"max_attempts": 0}}, "relabel.max_attempts: Input should be greater than or equal to 1"),
    ({"relabel": {"temperatures": []}}, "relabel.temperatures: List should have at least 1 item"),
    ({"llm": {"concurrency": 0}}, "llm.concurrency: Input should be greater than or equal to 1"),
    ({"llm": {"processes": -1}}, "llm.processes: Input should be greater than or equal to 0"),
    ({"llm": {"budget_tokens": -1}}, "llm.budget_tokens: Input should be a number >= 0"),
    ({"llm": {"requests_per_minute": -5}}, "llm.requests_per_minute: Input should be a number >= 0"),
    ({"llm": {"timeout_s": 0}}, "llm.timeout_s: Input should be a number > 0"),
    ({"ingest": {"limit": -1}}, "ingest.limit: Input should be greater than or equal to 0"),
    ({"tools": {"default_kind": "handoff"}}, "tools.default_kind: Input should be 'read' or 'write'"),
    ({"verify": {"judges": []}}, "verify.judges: List should have at least 1 item"),
    ({"verify": {"judges": ["coverage", "vibes"]}}, "verify.judges.1: Input should be 'replay'"),
    ({"replay": {"env": "my-sim"}}, "replay.env: Input should be auto, none or an installed environment"),
    ({"gates": {"acceptance_rate": [0.5, 1.2]}}, "gates.acceptance_rate: Input should be [low, high] with 0 <= low"),
    ({"gates": {"severity": [0.8, 0.2]}}, "gates.severity: Input should be [low, high]"),
    ({"gates": {"judge_confidence": [0.5]}}, "gates.judge_confidence: Input should be [low, high]"),
    ({"gates": {"min_rows_for_distribution": 0}}, "gates.min_rows_for_distribution: Input should be greater"),
    ({"gates": {"max_failure_type_share": 0}}, "gates.max_failure_type_share: Input should be a number within (0, 1]"),
    ({"gates": {"relabel_confidence_min_stdev": -0.1}}, "gates.relabel_confidence_min_stdev: Input should be a number >= 0"),
    ({"io": {"batch_rows": 0}}, "io.batch_rows: Input should be greater than or equal to 1"),
    ({"prefect": {"retries": -1}}, "prefect.retries: Input should be greater than or equal to 0"),
])
def test_constraint_violations_name_their_dotted_path(tmp_path, sections, expected):
    assert expected in _error(tmp_path, **sections)


def test_every_problem_is_reported_on_one_line_with_where_it_came_from(tmp_path):
    path = write_params(tmp_path / "bad.yaml", llm={"concurrency": 0}, relabel={"confidnce_threshold": 0.8})
    with pytest.raises(ParamsError) as info:
        load_params(path, {"verify": {"policy": "most"}})
    message = str(info.value)
    assert len(message.splitlines()) == 1
    file_part, _, overrides_part = message.partition("; overrides: ")
    assert file_part.startswith(f"{path}: ") and "relabel.confidnce_threshold" in file_part
    assert "llm.concurrency" in file_part and "verify.policy" in overrides_part
    with pytest.raises(ParamsError, match=r"^overrides: llm\.concurrency: "):  # the override's value is the bad one
        load_params(write_params(tmp_path / "good.yaml", llm={"concurrency": 4}), {"llm": {"concurrency": "8"}})


def test_broken_files_are_params_errors(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("llm: [1\n")
    with pytest.raises(ParamsError, match=r"broken.yaml: not valid YAML \(line 2, column 1\)"):
        load_params(broken)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- llm\n")
    with pytest.raises(ParamsError, match="listed.yaml: params must be a mapping of sections, got list"):
        load_params(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\nllm:\n")  # an empty section states nothing
    assert load_params(empty) == Params()


# --- the free-form sections ------------------------------------------------------------------

def test_the_open_sections_take_any_key(tmp_path):
    messages = {"messages_path": "data.turns", "roles": {"human": "user", "bot": "assistant", "sys": "system"},
                "anything": {"nested": [1, 2.0]}}
    requests = {"issue_refund": ["refund", "refunded"], "any_tool_name": []}
    path = write_params(tmp_path / "open.yaml", ingest={"messages": messages}, tools={"requests": requests})
    loaded = load_params(path)
    _same(messages, loaded.ingest.messages)
    assert loaded.tools.requests == requests
    # Overrides merge into the file's mapping, nested mappings too (`--map roles.gpt=assistant`).
    merged = load_params(path, {"ingest": {"messages": {"role_key": "from", "roles": {"gpt": "assistant"}}}})
    assert merged.ingest.messages["roles"] == messages["roles"] | {"gpt": "assistant"}
    assert merged.ingest.messages["role_key"] == "from" and merged.ingest.messages["anything"]
    assert load_params(None, {"ingest": {"messages": None}}).ingest.messages is None
    # ingest.messages is checked where the logs are read, with MessagesMapping's own message.
    with pytest.raises(ValueError, match=r"ingest.messages: unknown key\(s\) anything"):
        MessagesMapping.from_params(loaded.ingest.messages)


# --- the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "stage"])
def test_the_cli_reports_bad_params_on_one_line_and_exits_2(tmp_path, capsys, command):
    bad = write_params(tmp_path / "bad.yaml", llm={"concurrency": "four"}, relabel={"confidnce_threshold": 0.8})
    if command == "run":
        args = ["run", "--input", str(TAU), "--out", str(tmp_path / "out"), "--params", str(bad)]
    else:
        args = ["stage", "classify", "--params", str(bad), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"agenther: error: {bad}: ")
    assert "llm.concurrency: Input should be a valid integer, got 'four'" in err
    assert "unknown parameter relabel.confidnce_threshold" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
