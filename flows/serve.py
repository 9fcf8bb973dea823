"""Serve agenther's deployments from one long-running process: no work pool, no worker.

    .venv/bin/python -m flows.serve                       # leave it running; Ctrl-C stops it
    .venv/bin/python -m flows.serve --params params.yaml --watch data/incoming \\
        --cron "0 3 * * *" --watch-every 60 --out out/prefect
    .venv/bin/python -m flows.serve --task-runner dask --dask-address tcp://10.0.0.5:8786   # runs on a cluster

It registers four deployments with the Prefect API (PREFECT_API_URL; see
scripts/prefect-server.sh) and runs their flow runs as subprocesses of this process:

  hindsight/manual       no schedule: start it from the UI (Deployments > hindsight > manual >
                         Run, parameters editable there) or `prefect deployment run hindsight/manual`
  hindsight/scheduled    on --cron (default 03:00 UTC daily) or every --interval seconds: an
                         incremental round under --rounds (only logs no earlier round processed)
  hindsight/on-new-logs  triggered by each `agenther.logs.arrived` event: a round on the new file
                         (--rounds; `--rounds ""`: a plain run, out_dir = <out>/incoming/<file name>)
  watch-logs/watch       every --watch-every seconds: emits `agenther.logs.arrived` for new
                         files in --watch, a folder or an s3://bucket/prefix/ (flows/watch.py;
                         S3 settings and keys from the environment: agenther/s3.py)

prefect.yaml declares the same deployments for `prefect deploy --all` and a process worker.
Relative paths are taken from the current folder; runs execute in the project root, where
params.yaml's own relative paths (data/raw/..., .agenther-cache/llm) point.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from agenther.s3 import is_s3_url
from flows.hindsight import hindsight
from flows.watch import EVENT, RESOURCE_PREFIX, watch_logs

ROOT = Path(__file__).resolve().parents[1]


def deployments(params_file: Path, watch: Path | str, out: Path, cron: str | None = "0 3 * * *",
                interval: float | None = None, watch_every: float = 60.0,
                watch_state: Path | None = None, rounds: Path | None = None,
                engine: dict | None = None) -> list[RunnerDeployment]:
    """`engine`: the hindsight runs' task_runner / dask_address / dask_workers (unset: the params file's)."""
    base = {"params_file": str(params_file), "out_dir": str(out)} | {k: v for k, v in (engine or {}).items() if v is not None}
    rounds_base = base | ({"rounds_root": str(rounds)} if rounds else {})  # agenther/rounds.py
    schedule = {"interval": interval} if interval else {"cron": cron}
    new_logs = DeploymentEventTrigger(
        name="agenther: new logs -> hindsight",
        expect={EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        # Rendered by the server from the event (Jinja): one run per new file, each with its own outputs.
        parameters={"input": "{{ event.payload.path }}", "out_dir": f"{out}/incoming/{{{{ event.payload.name }}}}"},
    )
    return [
        hindsight.to_deployment(name="manual", parameters=base, tags=["agenther"],
                                description="Start by hand (UI or `prefect deployment run hindsight/manual`)."),
        hindsight.to_deployment(name="scheduled", parameters=rounds_base, tags=["agenther"], **schedule,
                                description="The configured input on a schedule; cached batches make reruns cheap."),
        hindsight.to_deployment(name="on-new-logs", parameters=rounds_base, tags=["agenther"], triggers=[new_logs],
                                description=f"One run per `{EVENT}` event (flows/watch.py)."),
        # Overlapping watcher runs are kept apart by a file lock (flows/watch.py), not a
        # deployment concurrency limit: a killed run would hold that slot and silence the watcher.
        watch_logs.to_deployment(name="watch", interval=watch_every,
                                 parameters={"folder": str(watch)} | ({"state_file": str(watch_state)} if watch_state else {}),
                                 tags=["agenther"], description=f"Emit `{EVENT}` for new log files in {watch}."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file for every hindsight run")
    parser.add_argument("--watch", default="data/incoming", help="folder or s3://bucket/prefix/ the watcher lists for new logs")
    parser.add_argument("--out", default="out/prefect", help="output folder (new logs: <out>/incoming/<name>)")
    parser.add_argument("--rounds", help="rounds root of the scheduled and new-logs runs (default <out>/rounds; "
                                         "\"\": plain runs that reprocess their whole input)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", default="0 3 * * *", help="schedule of hindsight/scheduled (UTC)")
    when.add_argument("--interval", type=float, help="run hindsight/scheduled every N seconds instead")
    parser.add_argument("--watch-every", type=float, default=60.0, help="seconds between watcher runs")
    parser.add_argument("--watch-state", help="the watcher's memory (default .agenther-cache/watch/<folder>-<hash>.json)")
    parser.add_argument("--limit", type=int, default=4, help="flow runs at once in this process")
    parser.add_argument("--task-runner", choices=("local", "dask"), help="where hindsight runs' batches run "
                        "(default: the params file's prefect.task_runner)")
    parser.add_argument("--dask-address", help="tcp://host:8786 of a running Dask cluster (with --task-runner dask)")
    parser.add_argument("--dask-workers", type=int, help="worker processes of a run's own LocalCluster (no address)")
    args = parser.parse_args(argv)

    absolute = {name: Path(getattr(args, name)).resolve() for name in ("params", "out")}
    absolute["watch"] = args.watch if is_s3_url(args.watch) else Path(args.watch).resolve()
    os.chdir(ROOT)
    state = Path(args.watch_state).resolve() if args.watch_state else None
    rounds = absolute["out"] / "rounds" if args.rounds is None else Path(args.rounds).resolve() if args.rounds else None
    serve(*deployments(absolute["params"], absolute["watch"], absolute["out"], cron=args.cron,
                       interval=args.interval, watch_every=args.watch_every, watch_state=state, rounds=rounds,
                       engine={"task_runner": args.task_runner, "dask_address": args.dask_address,
                               "dask_workers": args.dask_workers}), limit=args.limit)


if __name__ == "__main__":
    main()
