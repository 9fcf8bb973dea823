"""Hindsight tasks: each exported hindsight sample of a replayable log as a task with a verifiable reward.

A hindsight goal plus the writes that achieve it is a new task: the instruction (what the user
says in the sample, turn by turn: a simulated user needs the details the user gives later, where
the agent asks for them, not only the opening), the expected actions (the sample's trained writes, in order) and the hash of the state
they produce. `<out>/tasks/<env>.jsonl` has one per sample, sorted by `sample_id`, in tau-bench's
task shape (`user_id`, `actions` as `[{name, kwargs}]`, `instruction`, `outputs`), so a tau-bench
runner can score an agent on them, plus `sample_id`, `data_hash` (the state after replaying
`actions` on fresh data: tau-bench's `gt_data_hash`) and `source` (the trajectory it came from).

tau-bench scores a task that has `outputs` by them alone (each must occur in what the agent
said, lowercased, commas removed) and one without by the data hash. So a goal with writes has no
`outputs`, its hash is its reward, and the facts its user was told are kept as `told`; a goal of
facts only has their values as `outputs`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from agenther.envs import open_env
from agenther.envs.proof import as_calls, changes, env_for, run_calls, trained_writes
from agenther.evidence.goal import AchievedGoal, metadata_of, rewrites_of, sample_steps
from agenther.export.files import file_sha256
from agenther.params import Params
from agenther.workdir import write_text_atomic

FOLDER = "tasks"


@dataclass
class Tasks:
    digests: dict[str, str] = field(default_factory=dict)  # tasks file -> sha256
    rows: dict[str, int] = field(default_factory=dict)  # tasks file -> tasks
    # sample id -> why it is no task: a call that failed on replay, or a window that opens after
    # the run changed the state (the task would start from another world than the fresh data)
    skipped: dict[str, str] = field(default_factory=dict)


OPENS_AFTER_A_CHANGE = "the run changed the state before the sample's opening"


def instruction(row: dict, goal: AchievedGoal) -> str:
    """A simulated user's brief: the sample's user turns, in order, as the trainer sees them."""
    rewrites = rewrites_of(row)
    said = [rewrites.get(i, row["messages"][i].get("content") or "") for i in sample_steps(row["messages"], goal)
            if row["messages"][i]["role"] == "user"]
    if len(said) == 1:
        return said[0]
    return "You open with: " + said[0] + "\nThen, as the agent asks, you say in turn:\n" + "\n".join(
        f"- {text}" for text in said[1:])


def hindsight_task(row: dict, goal: AchievedGoal, data_hash: str) -> dict:
    meta = metadata_of(row)
    actions = [{"name": a.tool, "kwargs": a.arguments} for a in trained_writes(goal)]
    facts = list(dict.fromkeys(v.replace(",", "") for f in goal.facts for v in f.values))
    user = meta.get("user_id") or next((a["kwargs"]["user_id"] for a in actions if "user_id" in a["kwargs"]), None)
    return {
        "sample_id": f"hindsight:{row['id']}",
        "user_id": user,
        "instruction": instruction(row, goal),
        "actions": actions,
        "outputs": [] if actions else facts,
        "told": facts if actions else [],
        "data_hash": data_hash,
        "source": {"trajectory_id": row["id"], "source_file": row.get("source_file"),
                   "record_pointer": row.get("record_pointer"), "task_key": row.get("task_key")},
    }


def export_tasks(samples: list[dict], params: Params, out: Path) -> Tasks:
    """Write `<out>/tasks/<env>.jsonl` for the exported hindsight samples (verified rows) whose log
    an environment replays; remove task files an earlier run left that this one does not write."""
    made = Tasks()
    by_env: dict[str, list[dict]] = {}
    for row in samples:
        env_name = env_for(row, params)
        if env_name is None:
            continue
        goal = AchievedGoal.model_validate_json(row["achieved_goal"])
        env = open_env(env_name)
        if any(step < goal.start for step, _ in changes(env, run_calls(row["messages"], goal.start))):
            # the sample opens after the run changed the state: its world is not the fresh data a task starts from
            made.skipped[row["id"]] = OPENS_AFTER_A_CHANGE
            continue
        replay = env.replay(as_calls(trained_writes(goal)))
        failed = next((r.output for r in replay.results if not r.ok), None)
        if failed is not None:  # the replay judge rejects these; a run without it gets no task for them
            made.skipped[row["id"]] = failed[:200]
            continue
        by_env.setdefault(env_name, []).append(hindsight_task(row, goal, replay.digest))
    folder = Path(out) / FOLDER
    for env_name, tasks in sorted(by_env.items()):
        path = folder / f"{env_name}.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(t, ensure_ascii=False) + "\n"
                                        for t in sorted(tasks, key=lambda t: t["sample_id"])))
        name = f"{FOLDER}/{path.name}"
        made.digests[name], made.rows[name] = file_sha256(path), len(tasks)
    for stale in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if f"{FOLDER}/{stale.name}" not in made.rows:
            stale.unlink()
    return made
