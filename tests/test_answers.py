"""LLM answers are checked against their contracts (agenther/llm/answers.py), nested fields included.

Every stage that asks an LLM is sent answers that are valid JSON but the wrong shape (extra
nesting, wrong nested types, missing fields, null, numbers that do not parse), one brain per kind
of prompt, through a whole `agenther run` against the scripted HTTP server: each record the stage
asked about is rejected as `invalid_llm_answer` with the validation error, the run exits 0 and
every count reconciles. Before the contracts, `{"requirements": ["x"], ...}` from the evidence
judge crashed the run with an AttributeError.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, write_params
from llm_server import FakeLLMServer, careful_brain, prompt_kind, user_text

from agenther.cli import main
from agenther.llm.answers import (
    ClassifyAnswer,
    EvidenceAnswer,
    ExtractAnswer,
    PolicyAnswer,
    RelabelAnswer,
    TrajectoryAnswer,
    validate,
)
from agenther.stages.relabel import ruled_and_written

LIMIT = 20
JUDGES = {"judge_policy": "policy", "judge_trajectory": "trajectory", "judge_evidence": "evidence"}
# Valid answers to bend out of shape, for the prompts careful_brain does not answer.
VALID = {
    "classify": {"failure_type": "incomplete", "severity": 0.4, "recoverable": True, "reason": "stopped early"},
    "extract": {"achievements": [{"text": "found the reservation", "steps": [2], "kind": "information"}]},
}


def _bent(value: object) -> object:
    """The same content in the wrong JSON type, one level down."""
    if isinstance(value, bool):
        return {"value": value}
    if isinstance(value, int | float):
        return {"value": value}
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [json.dumps(v) if isinstance(v, dict) else {"item": v} for v in value] or [[]]
    return value


def _unparsable_numbers(value: object) -> object:
    """Every number, at any depth, as a string that does not parse as one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return "high"
    if isinstance(value, dict):
        return {k: _unparsable_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unparsable_numbers(v) for v in value]
    return value


def malformed(valid: dict, variant: int) -> str:
    """A wrong-shaped answer made from a valid one; `variant` picks the way it is wrong."""
    first, last = next(iter(valid)), list(valid)[-1]
    shapes = [
        {"answer": valid},  # extra nesting
        {k: _bent(v) for k, v in valid.items()},  # wrong nested types
        {k: v for k, v in valid.items() if k != last},  # a missing field
        valid | {first: None},  # null for a required field
        _unparsable_numbers(valid),  # every number (confidence, severity, steps) a word
        None,  # the whole answer null
    ]
    return json.dumps(shapes[variant % len(shapes)])


def malformed_brain(kind: str):
    """careful_brain, except that every prompt of `kind` gets a wrong-shaped answer (another shape
    on each attempt, and across records)."""

    def brain(request: dict):
        if prompt_kind(request) != kind:
            return careful_brain(request)
        valid = VALID.get(kind) or json.loads(careful_brain(request))
        return malformed(valid, zlib.crc32(user_text(request).encode()) + int(request.get("seed") or 0))

    return brain


def test_the_shapes_are_each_invalid():
    """The test's own answers must be wrong for every contract (else the run test proves nothing)."""
    valid = VALID | {
        "relabel": {"turns": [{"turn": 1, "text": "Please book it."}], "confidence": 0.9},
        "judge_policy": {"violations": [], "allowed": True, "confidence": 0.9},
        "judge_trajectory": {"satisfied": True, "consistent_with_user": True, "confidence": 0.9, "reason": "done"},
        "judge_evidence": {"requirements": [{"requirement": "booked", "step": 3, "met": True}], "all_met": True,
                           "confidence": 0.9},
    }
    models = (ClassifyAnswer, ExtractAnswer, RelabelAnswer, PolicyAnswer, TrajectoryAnswer, EvidenceAnswer)
    for model in models:
        kind = model.model_config["title"]
        assert validate(model, valid[kind])[0] is not None, kind
        for variant in range(6):
            answer, error = validate(model, json.loads(malformed(valid[kind], variant)))
            assert answer is None and error.startswith(f"not a valid {kind} answer"), (kind, variant)


def test_the_evidence_judges_nested_wrong_answer_is_a_rejection_not_a_crash(tmp_path, llm_server):
    """The issue's example: requirements as strings passed the old top-level check and crashed."""
    llm_server.brain = lambda r: (json.dumps({"requirements": ["x"], "all_met": True, "confidence": 0.9})
                                  if prompt_kind(r) == "judge_evidence" else careful_brain(r))
    summary, out = _run(tmp_path, llm_server, "evidence", {})
    verify = pl.read_parquet(out / "rejected.parquet").filter(pl.col("reason") == "invalid_llm_answer")
    assert verify.height > 0 and set(verify["stage"]) == {"verify"}
    assert all("evidence: invalid_llm_answer: invalid LLM answer after 2 attempt(s): not a valid judge_evidence "
               "answer: requirements.0: Input should be a valid dictionary" in d for d in verify["detail"])
    assert summary["stages"]["verify"]["out"] == 0


def _messages_log(tmp_path: Path) -> Path:
    """The tau-bench runs as generic chat logs: no ground truth, so the policy judge asks the LLM."""
    records = json.loads(TAU.read_text())[:LIMIT]
    path = tmp_path / "logs.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "messages": r["traj"], "reward": r["reward"]}) + "\n"
                            for i, r in enumerate(records)))
    return path


def _run(tmp_path: Path, server: FakeLLMServer, name: str, sections: dict) -> tuple[dict, Path]:
    # Wrong answers to a judge can leave it accepting nothing: the acceptance-rate gate is off.
    sections = sections | {"gates": {"acceptance_rate": [0.0, 1.0]} | sections.get("gates", {})}
    params = write_params(tmp_path / f"params-{name}.yaml", server, cache=tmp_path / f"cache-{name}",
                          llm={"concurrency": 4}, **sections)
    out = tmp_path / name
    code = main(["run", "--input", str(_messages_log(tmp_path)), "--format", "messages", "--out", str(out),
                 "--map", "id_path=id", "--map", "reward_path=reward", "--params", str(params)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    assert stages["ingest"]["in"] == stages["ingest"]["out"] + stages["ingest"]["quarantined"] == LIMIT
    for stage in ("extract", "relabel", "verify"):
        assert stages[stage]["in"] == stages[stage]["out"] + sum(stages[stage]["rejected"].values()), stage
    return summary, out


@pytest.mark.parametrize("kind", ["classify", "extract", "relabel", *JUDGES])
def test_wrong_shaped_answers_to_every_llm_stage_are_rejections_and_the_run_reconciles(tmp_path, llm_server, kind):
    llm_server.brain = malformed_brain(kind)
    modes = {
        # Every failure unclassified is one failure type (the placeholder): the collapsed-classifier
        # gate would rightly stop such a run; this test is about the records, so that gate is off.
        "classify": {"classify": {"mode": "llm"}, "gates": {"max_failure_type_share": 1.0}},
        "extract": {"extract": {"mode": "llm"}},
    }
    summary, out = _run(tmp_path, llm_server, kind, modes.get(kind, {}))
    asked = llm_server.prompts_of(kind)
    assert asked, f"no {kind} prompt was sent"
    stages = summary["stages"]
    rejected = pl.read_parquet(out / "rejected.parquet")
    invalid = rejected.filter(pl.col("reason") == "invalid_llm_answer")
    contract = f"not a valid {kind} answer"
    not_an_object = "expected a JSON object, got NoneType"  # the whole answer null: not even an object

    if kind == "classify":
        classified = pl.read_parquet(out / "01_classified.parquet").filter(pl.col("is_failure"))
        assert set(classified["classify_mode"]) == {"llm-invalid"}  # every failure was asked, none answered
        assert stages["extract"] == {"in": classified.height, "out": 0,
                                     "rejected": {"invalid_llm_answer": classified.height}}
        assert set(invalid["id"]) == set(classified["id"])
    elif kind == "extract":
        classified = pl.read_parquet(out / "01_classified.parquet").filter(pl.col("is_failure"))
        recoverable = classified.filter(pl.col("recoverable"))
        assert recoverable.height > 0 and stages["extract"]["out"] == 0
        assert set(invalid["id"]) == set(recoverable["id"])  # each record the LLM was asked about
        assert set(rejected.filter(pl.col("stage") == "extract")["reason"]) <= {"invalid_llm_answer", "not_recoverable"}
    elif kind == "relabel":
        # the records whose conversation needs a writer asked the model, each answer was wrong: all
        # rejected; the others needed no model (rules) and go on
        extracted = pl.read_parquet(out / "02_extracted.parquet").to_dicts()
        needs_writer = {r["id"] for r in extracted if ruled_and_written(r)[1]}
        assert needs_writer and stages["relabel"]["rejected"]["invalid_llm_answer"] == len(needs_writer)
        assert set(invalid["id"]) == needs_writer
        ruled = rejected.filter((pl.col("stage") == "relabel") & (pl.col("reason") != "invalid_llm_answer"))
        assert not set(ruled["id"]) & needs_writer  # a rule-written conversation the gate turned down, if any
        assert all(d.count("invalid_llm_answer") == 3 for d in invalid["detail"])  # max_attempts, each wrong
        relabeled = pl.read_parquet(out / "03_relabeled.parquet")
        assert set(relabeled["relabel_model"]) <= {"rules"} and not set(relabeled["id"]) & needs_writer
    else:
        judge = JUDGES[kind]
        verified = pl.read_parquet(out / "04_verified.parquet").to_dicts()
        # The records this judge was asked about: its judgement came from the model, not from rules.
        judged = {r["id"]: next(j for j in r["judgements"] if j["judge"] == judge) for r in verified
                  if any(j["judge"] == judge and j["model"] != "rules" for j in r["judgements"])}
        assert judged, f"no record reached the {judge} judge"
        assert not [r["id"] for r in verified if r["id"] in judged and r["verified"]]
        assert all(not j["accept"] and j["reason"].startswith("invalid_llm_answer: ") for j in judged.values())
        assert set(invalid["id"]) == set(judged) and set(invalid["stage"]) == {"verify"}
        assert f"rejected_by_{judge}" not in stages["verify"]["rejected"]  # no malformed answer passed as a verdict
    # Each rejection names the record (its id) and the validation error of the last attempt.
    assert invalid.height > 0
    assert all(contract in d or not_an_object in d for d in invalid["detail"]), invalid["detail"].to_list()
    assert any(contract in d for d in invalid["detail"])
