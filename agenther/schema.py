"""The canonical tables: the contract between stages.

Every stage reads a Parquet table and writes one. Column names and dtypes below
are that contract; `validate_columns` checks it at each hand-over.

A trajectory keeps its structure: messages with roles, tool calls with their
JSON arguments, tool results as `tool` messages that point at their call.
"""

from __future__ import annotations

import polars as pl

ROLES = ("system", "user", "assistant", "tool")

TOOL_CALL = pl.Struct({"id": pl.String, "name": pl.String, "arguments": pl.String})

MESSAGE = pl.Struct(
    {
        "role": pl.String,  # one of ROLES
        "content": pl.String,  # may be null (assistant turns that only call tools)
        "tool_calls": pl.List(TOOL_CALL),  # assistant turns; arguments are JSON text
        "tool_call_id": pl.String,  # tool turns: the call they answer
        "name": pl.String,  # tool turns: the tool's name
    }
)

# One row per trajectory, written by every adapter.
TRAJECTORY = {
    "id": pl.String,  # unique, stable across runs: "<format>/<file stem>/<pointer>"
    "source_format": pl.String,  # tau-bench | toolbench | messages
    "source_file": pl.String,  # path as given on the command line
    "record_pointer": pl.String,  # "[12]" (JSON array index), "line 7" (JSONL), "" (one-record file)
    "task_key": pl.String,  # trials of one task share it (for preference pairs)
    "goal": pl.String,  # the goal as the agent saw it (first user turn / query)
    "messages": pl.List(MESSAGE),
    "tools": pl.String,  # JSON list of OpenAI tool schemas, or null when unknown
    "final_answer": pl.String,  # last assistant text or the benchmark's answer field
    "success": pl.Boolean,  # null when the log does not say
    "reward": pl.Float64,  # null when the log does not say
    "metadata": pl.String,  # JSON object: benchmark-specific signals (ground truth etc.)
}

# One row per rejected input record, written by adapters.
QUARANTINE = {
    "source_file": pl.String,
    "record_pointer": pl.String,
    "reason": pl.String,
    "excerpt": pl.String,  # first 200 characters of the raw record, for a human to look at
}

# One row per record a stage decided not to carry forward.
REJECTION = {
    "id": pl.String,
    "stage": pl.String,
    "reason": pl.String,  # a short machine-readable code (see each stage)
    "detail": pl.String,  # a human sentence
}

FAILURE_TYPES = (
    "constraint_violation",
    "wrong_result",
    "incomplete",
    "tool_error",
    "hallucination",
    "off_topic",
)
NOT_A_FAILURE = "not_a_failure"
# classify_reason of a failure known only from the log's success flag or reward (no other signal)
ONLY_A_FLAG = "log marks failure"

CLASSIFIED = TRAJECTORY | {
    "is_failure": pl.Boolean,
    "failure_type": pl.String,  # FAILURE_TYPES or NOT_A_FAILURE
    # 0 = near miss (the run nearly did what was asked) .. 1 = nothing of the goal done.
    # Higher severity lowers a sample's training weight.
    "severity": pl.Float64,
    "recoverable": pl.Boolean,  # worth relabeling: something was verifiably achieved
    "classify_reason": pl.String,
    "classify_mode": pl.String,  # CLASSIFY_MODES
}
# llm-invalid: the model's answer was unusable; llm-budget: the run's LLM budget was spent
# first. Either way the failure is not recoverable and extract rejects it with the reason.
CLASSIFY_MODES = ("rule", "llm", "llm-invalid", "llm-budget")

ACHIEVEMENT = pl.Struct({"text": pl.String, "steps": pl.List(pl.Int64), "kind": pl.String})
ACHIEVEMENT_KINDS = ("action", "information", "answer")  # its `kind`

EXTRACTED = CLASSIFIED | {
    "achievements": pl.List(ACHIEVEMENT),  # steps index into `messages`
    "extract_mode": pl.String,
    # JSON of goal.AchievedGoal: the writes that succeeded, the facts reported, the sample's cut
    # (messages[:sample_end]) and which of its assistant turns train (train_steps).
    "achieved_goal": pl.String,
}

RELABELED = EXTRACTED | {
    "hindsight_prompt": pl.String,  # the sample's opening user turn, as the trainer sees it
    # JSON [{step, before, after}]: every user turn of the sample the relabeler rewrote (step: in `messages`)
    "rewrites": pl.String,
    "relabel_confidence": pl.Float64,
    "relabel_attempts": pl.Int64,
    "relabel_rationale": pl.String,
    "relabel_model": pl.String,
}

JUDGEMENT = pl.Struct(
    {"judge": pl.String, "model": pl.String, "accept": pl.Boolean, "confidence": pl.Float64, "reason": pl.String}
)

VERIFIED = RELABELED | {
    "judgements": pl.List(JUDGEMENT),
    "verified": pl.Boolean,
}


class SchemaError(ValueError):
    """A table does not have the columns or dtypes its stage promises."""


def validate_columns(df: pl.DataFrame, schema: dict[str, pl.DataType], table: str) -> None:
    """Raise SchemaError naming every missing column and every wrong dtype."""
    problems = []
    for name, dtype in schema.items():
        if name not in df.columns:
            problems.append(f"missing column {name!r}")
        elif df.schema[name] != dtype:
            problems.append(f"column {name!r} is {df.schema[name]}, expected {dtype}")
    if problems:
        raise SchemaError(f"{table}: " + "; ".join(problems))


def empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def frame(rows: list[dict], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Build a frame with exactly `schema` (an empty list gives an empty, typed frame)."""
    return pl.DataFrame(rows, schema=schema) if rows else empty(schema)


class StageOutput:
    """What a filtering stage returns: the rows it carries forward and the ones it rejected."""

    def __init__(self, kept: pl.DataFrame, rejected: pl.DataFrame):
        self.kept = kept
        self.rejected = rejected


def rejection(row_id: str, stage: str, reason: str, detail: str) -> dict:
    return {"id": row_id, "stage": stage, "reason": reason, "detail": detail}
