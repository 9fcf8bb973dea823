"""What a training sample is: an accepted hindsight relabel (or an original success) as the SFT and
ShareGPT rows the package stage writes (agenther/stages/packaging.py), with its weight and metadata.

- SFT (OpenAI chat format) and ShareGPT (LLaMA-Factory): a hindsight sample is the run cut
  after the last step that evidences its achieved goal (agenther.evidence.goal: `sample_end`), with its
  FIRST user turn replaced by the hindsight prompt (system and later user turns inside the cut
  stay: extract rejected any that ask for something the sample does not do), ending on an
  assistant turn. Its assistant turns that do not contribute (failed or repeated calls, reads
  nothing uses) stay as context with a per-message `weight` 0, the others weigh 1 (OpenAI's
  assistant-message weight; ShareGPT rows carry the same as `metadata.turn_weights`).
  Successes join with their original prompt when `include_successes`.
- Every row has `metadata`: lineage, source, judges (`sample_meta`).

Weight direction: severity 0 is a near miss, 1 is "nothing of the goal done" (schema.CLASSIFIED).
A hindsight sample weighs max(min_weight, 1 - weight_alpha * severity): near misses count fully,
runs that wandered far from their goal count less. Successes and natural pairs weigh 1.
"""

from __future__ import annotations

import json

from agenther.evidence.goal import AchievedGoal, rewrites_of, sample_messages, sample_steps
from agenther.export import formats as exports
from agenther.export.schemas import validate_sft


def sample_weight(severity: float | None, alpha: float, min_weight: float) -> float:
    """max(min_weight, 1 - alpha * severity); unknown severity counts as the worst (1)."""
    s = 1.0 if severity is None else min(1.0, max(0.0, float(severity)))
    return round(float(max(min_weight, 1.0 - alpha * s)), 6)  # a float, whichever bound wins


def trim_trailing(messages: list[dict]) -> list[dict]:
    """Cut after the last assistant turn: a training sample ends where the model last spoke."""
    end = len(messages)
    while end and messages[end - 1]["role"] != "assistant":
        end -= 1
    return list(messages[:end])


def hindsight_messages(row: dict) -> list[dict]:
    """The hindsight sample of an accepted relabel (goal.sample_messages: its window of the run, the
    rewritten user turns in place), each assistant turn weighted 1 (trains) or 0 (context only),
    ending on an assistant turn."""
    goal = AchievedGoal.model_validate_json(row["achieved_goal"])
    train = set(goal.train_steps)
    sample = sample_messages(row["messages"], goal, rewrites_of(row))
    return trim_trailing([{**m, "weight": int(step in train)} if m["role"] == "assistant" else m
                          for step, m in zip(sample_steps(row["messages"], goal), sample, strict=True)])


def user_side(messages: list[dict]) -> str:
    """The user turns of a sample, one per line: what a hindsight request is as a whole."""
    return "\n".join(m.get("content") or "" for m in messages if m["role"] == "user")


# --- metadata ------------------------------------------------------------------------------


def lineage_meta(lineage: dict) -> dict:
    return {
        "agenther_version": lineage.get("agenther_version"),
        "params_hash": lineage.get("params_hash"),
        "models": lineage.get("models") or {},
        "prompt_hashes": lineage.get("prompt_hashes") or {},
    }


def _judges(row: dict) -> list[dict]:
    return [
        {
            "judge": j.get("judge"),
            "model": j.get("model"),
            "accept": j.get("accept"),
            "confidence": None if j.get("confidence") is None else float(j["confidence"]),
            "reason": j.get("reason"),
        }
        for j in row.get("judgements") or []
    ]


def optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def sample_meta(row: dict, kind: str, base: dict) -> dict:
    hindsight = kind == "hindsight"
    return base | {
        "sample_id": f"{kind}:{row['id']}",
        "kind": kind,
        "trajectory_id": row["id"],
        "source_file": row.get("source_file"),
        "source_format": row.get("source_format"),
        "task_key": row.get("task_key"),
        "original_goal": row.get("goal"),
        "failure_type": row.get("failure_type"),
        "severity": optional_float(row.get("severity")),
        "relabel_confidence": optional_float(row.get("relabel_confidence")) if hindsight else None,
        "relabel_model": row.get("relabel_model") if hindsight else None,
        "judges": _judges(row) if hindsight else [],
        # the user turns the relabeler rewrote: [{step, before, after}] (step: in the source trajectory)
        "rewrites": json.loads(row.get("rewrites") or "[]") if hindsight else [],
    }


def sample_rows(messages: list[dict], row: dict, weight: float, meta: dict) -> tuple[dict, dict]:
    """The SFT and ShareGPT rows of one sample; ValueError (with the reason) if either is invalid."""
    tools = exports.parse_tools(row.get("tools"))
    sft = exports.sft_row(messages, tools, weight, meta)
    validate_sft(sft)
    return sft, exports.sharegpt_row(messages, tools, weight, meta)
