"""`agenther replay LOG`: does the environment reproduce what the log recorded?

Two checks over the records that carry a recorded state hash (tau-bench: `gt_data_hash`, the
state after the task's expected actions on fresh data) and that an environment replays:
- ground truth: the expected actions (`gt_actions`), replayed, give the recorded hash;
- agent runs: the agent's own calls, every tool call of the run in order, replayed: the run earns
  its reward exactly when they reach the recorded hash, as the recorded `r_actions` and reward say.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel

from agenther.envs import Call, open_env
from agenther.envs.proof import env_for, run_calls
from agenther.evidence.goal import metadata_of
from agenther.params import Params


class ReplayReport(BaseModel):
    records: int = 0
    with_hash: int = 0  # replayable records with a recorded hash: M
    ground_truth: int = 0  # of those, whose expected actions give the recorded hash
    agent_runs: int = 0  # of those, whose agent calls give the recorded reward
    not_replayable: int = 0  # no environment for the record
    no_hash: int = 0  # replayable, but nothing recorded to compare with
    mismatches: dict[str, str] = {}  # record id -> what was not reproduced

    def lines(self) -> list[str]:
        out = [f"ground truth: {self.ground_truth} of {self.with_hash} recorded hashes reproduced",
               f"agent runs: {self.agent_runs} of {self.with_hash} recorded rewards reproduced",
               f"({self.records} records: {self.no_hash} replayable without a recorded hash, "
               f"{self.not_replayable} with no environment)"]
        return out + [f"  {rid}: {why}" for rid, why in list(self.mismatches.items())[:20]]


def replay_records(rows: Iterable[dict], params: Params) -> ReplayReport:
    """Both checks over trajectory rows (schema.TRAJECTORY), as read from a log."""
    report = ReplayReport()
    for row in rows:
        report.records += 1
        name = env_for(row, params)
        meta = metadata_of(row)
        recorded, expected = meta.get("gt_data_hash"), meta.get("gt_actions")
        if name is None:
            report.not_replayable += 1
            continue
        if not isinstance(recorded, str) or not isinstance(expected, list):
            report.no_hash += 1
            continue
        report.with_hash += 1
        env = open_env(name)
        truth = env.replay([Call(name=str(a.get("name")), kwargs=a.get("kwargs") or {}) for a in expected])
        if truth.digest == recorded:
            report.ground_truth += 1
        else:
            report.mismatches[row["id"]] = f"expected actions give {truth.digest[:12]}, recorded {recorded[:12]}"
        reached = env.replay([call for _, call in run_calls(row["messages"], len(row["messages"]))]).digest == recorded
        if meta.get("r_actions") == reached and row.get("reward") == float(reached):
            report.agent_runs += 1
        else:
            report.mismatches[row["id"]] = (f"agent calls {'reach' if reached else 'miss'} the recorded hash; "
                                            f"recorded r_actions {meta.get('r_actions')}, reward {row.get('reward')}")
    return report
