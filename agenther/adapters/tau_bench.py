"""tau-bench historical trajectories: a JSON list of {task_id, trial, reward, info, traj}.

`traj` is already an OpenAI chat log (tool_calls with ids, tool results pointing at them),
so the work here is validation plus lifting the ground truth out of `info` into metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from agenther.adapters.adapter import Adapter, ReadContext
from agenther.adapters.common import (
    LogFile,
    Quarantined,
    RecordError,
    canonical_messages,
    convert_records,
    first_user_text,
    last_assistant_text,
    to_json,
    type_name,
)

FORMAT = "tau-bench"


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and "traj" in record and "task_id" in record


def read(path: LogFile, ctx: ReadContext | None = None) -> Iterator[dict | Quarantined]:
    """One trajectory dict (or Quarantined) per record of the file."""
    return convert_records(path, convert, repairs=ctx.repairs if ctx else None)


def _int_like(record: dict, key: str) -> int | str:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise RecordError(f"{key}: expected an integer, got {type_name(value)}")
    return value


def _dict(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"{field}: expected an object, got {type_name(value)}")
    return value


def convert(record: Any, path: LogFile, pointer: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"record is not an object (got {type_name(record)})")
    task_id, trial = _int_like(record, "task_id"), _int_like(record, "trial")
    reward = record.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise RecordError(f"reward: expected a number, got {type_name(reward)}")
    messages = canonical_messages(record.get("traj"), "traj")
    goal = first_user_text(messages)
    if goal is None:
        raise RecordError("traj: no user message (the goal the agent saw)")

    info = _dict(record.get("info"), "info")
    task = _dict(info.get("task"), "info.task")
    # Five records of the shipped file have reward_info null: unknown, not malformed.
    reward_info = _dict(info.get("reward_info"), "info.reward_info")
    scores = _dict(reward_info.get("info"), "info.reward_info.info")
    stem = path.stem
    metadata = {
        "benchmark": FORMAT,
        "task_id": task_id,
        "trial": trial,
        "user_id": task.get("user_id"),
        # The simulated user's hidden brief: ground truth for judges, never the agent's prompt.
        "user_instruction": task.get("instruction"),
        "gt_actions": task.get("actions"),
        "gt_outputs": task.get("outputs"),
        "r_actions": scores.get("r_actions"),
        "r_outputs": scores.get("r_outputs"),
        # sha256 of the environment's state after the expected actions (agenther/envs/tau_airline.py)
        "gt_data_hash": scores.get("gt_data_hash"),
        "domain": _domain(stem, messages),
    }
    return {
        "id": f"{FORMAT}/{stem}/task{task_id}-trial{trial}",
        "source_format": FORMAT,
        "source_file": str(path),
        "record_pointer": pointer,
        "task_key": f"{FORMAT}/{stem}/task{task_id}",
        "goal": goal,
        "messages": messages,
        "tools": domain_tools(metadata["domain"]),  # the logs do not ship them: the benchmark's own
        "final_answer": last_assistant_text(messages),
        "success": float(reward) >= 1.0,
        "reward": float(reward),
        "metadata": to_json(metadata),
    }


# The schemas the tau-bench agent was given, per domain (MIT; see the .LICENSE.md beside them).
TOOLS_FILES = {"airline": Path(__file__).with_name("tau_bench_airline_tools.json")}


@cache
def domain_tools(domain: str | None) -> str | None:
    """The domain's tool schemas as canonical JSON text, or None for a domain we do not ship."""
    path = TOOLS_FILES.get(domain or "")
    return None if path is None else to_json(json.loads(path.read_text(encoding="utf-8")))


def _domain(stem: str, messages: list[dict]) -> str | None:
    system = next((m["content"] or "" for m in messages if m["role"] == "system"), "")
    for domain in ("airline", "retail"):
        if domain in stem.lower() or domain in system[:200].lower():
            return domain
    return None


ADAPTER = Adapter(
    name=FORMAT, looks_like=lambda record, ctx: looks_like(record), read=read,
    expects="tau-bench (traj, task_id)", failure_signals=True,  # ground-truth actions in `info`
)
