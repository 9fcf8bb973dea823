"""What replaying the agent's environment costs: `python bench/replay.py [--repeat N]`.

On the shipped tau-bench airline log (200 records), in one process:
- load: the environment's initial data, once per process (the pinned wheel's db.json read,
  sha256-checked, converted to tau-bench 7362a17's form, every entry's hash text computed);
- replay judge: the verify stage's `replay` judge (agenther/envs/proof.py) on every record that
  reaches the judges in rule mode (extract's output, with a stand-in prompt): time per record;
- log replay: `agenther replay`'s two checks (expected actions, then the agent's own calls) per
  record that carries a recorded hash;
- one replay: a single sequence of writes from the initial state to its digest (a task's data_hash).
Prints a JSON object of milliseconds; the median of `--repeat` passes for the per-record numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import polars as pl

    from agenther import schema
    from agenther.envs import Call, open_env
    from agenther.envs.proof import trained_writes
    from agenther.envs.replay_log import replay_records
    from agenther.envs.tau_airline_data import initial
    from agenther.evidence.goal import AchievedGoal, metadata_of
    from agenther.params import load_params
    from agenther.stages.classify import classify
    from agenther.stages.extract import extract
    from agenther.stages.ingest import read_logs
    from agenther.stages.verify import judge_replay

    t0 = time.perf_counter()
    initial()
    load_ms = (time.perf_counter() - t0) * 1e3

    params = load_params(None, {"llm": {"cache_dir": tempfile.mkdtemp()}})
    rows = list(read_logs(TAU))

    extracted = extract(classify(schema.frame(rows, schema.TRAJECTORY), params), params).kept.to_dicts()
    judged = [r | {"hindsight_prompt": "x"} for r in extracted]

    def per_record(fn, items) -> float:
        passes = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            for item in items:
                fn(item)
            passes.append((time.perf_counter() - t) * 1e3 / len(items))
        return round(statistics.median(passes), 2)

    judge_ms = per_record(lambda r: judge_replay(r, params, None, None), judged)
    with_hash = [r for r in rows if metadata_of(r).get("gt_data_hash")]
    log_ms = per_record(lambda r: replay_records([r], params), with_hash)
    env = open_env("tau-bench-airline")
    writes = [[Call(name=a.tool, kwargs=a.arguments) for a in trained_writes(AchievedGoal.model_validate_json(r["achieved_goal"]))]
              for r in judged]
    one_ms = per_record(lambda calls: env.replay(calls).digest, writes)
    accepted = sum(judge_replay(r, params, None, None)["accept"] for r in judged)
    print(json.dumps({
        "records": len(rows), "judged_records": len(judged), "replay_judge_accepted": accepted,
        "records_with_recorded_hash": len(with_hash),
        "load_once_ms": round(load_ms, 1),
        "replay_judge_ms_per_record": judge_ms,
        "log_replay_ms_per_record": log_ms,
        "one_replay_ms": one_ms,
        "polars": pl.__version__, "python": sys.version.split()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
