"""The `hindsight` flow: logs in, training data out. Parameters mirror params.yaml.

    logs ─ingest─▶ trajectories ─classify─▶ failures ─extract─▶ achievements ─relabel─▶
         relabeled ─verify─▶ accepted ─package─▶ sft / dpo / sharegpt ─push─▶ s3://…

Each stage runs through the same stage loop as `agenther run` and `dvc repro` (agenther/runner.py,
the same tables, stats and stamps: a stage that is up to date is skipped), with every batch a
cached, retried Prefect task (tasks/stages.py): in the flow's process (task_runner "local", the
default) or spread over a Dask cluster ("dask": on `dask_address`, or on a LocalCluster of
`dask_workers` processes started for the run; tasks/dask.py). `params_file` gives every parameter;
the other arguments override the main knobs (None = as in the file). Outputs default to
out/prefect (git-ignored), apart from data/interim and data/processed, which `dvc repro` owns.
With `rounds_root`, a run is an incremental round instead (agenther/rounds.py): only the logs no
earlier round of the lineage processed go through the stages, and the union is published.

    .venv/bin/python -m flows.hindsight --limit 20     # one run from a shell (temporary local API)
    .venv/bin/python -m flows.hindsight --task-runner dask --dask-workers 2   # on a LocalCluster
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from agenther.llm import LLMs
from agenther.params import Params, load_params, params_hash
from agenther.rounds import push_targets, run_round
from agenther.runner import run_stage
from agenther.stages import PIPELINE
from tasks import stages


def overrides(**knobs: Any) -> dict:
    """The flow's explicit arguments as a params overlay (None = leave the file's value)."""
    where = {"input": ("ingest", "input"), "format": ("ingest", "format"), "limit": ("ingest", "limit"),
             "model": ("llm", "model"), "judge_model": ("llm", "judge_model"), "api_base": ("llm", "api_base"),
             "confidence_threshold": ("relabel", "confidence_threshold"), "policy": ("verify", "policy"),
             "batch_size": ("prefect", "batch_size"), "task_runner": ("prefect", "task_runner"),
             "dask_address": ("prefect", "dask_address"), "dask_workers": ("prefect", "dask_workers")}
    out: dict = {}
    for name, value in knobs.items():
        if value is not None:
            section, key = where[name]
            out.setdefault(section, {})[key] = value
    return out


def push_prefix(push_url: str, params: Params) -> str:
    """Where a run's outputs go: <push_url>/<params hash>/<flow run id>, so runs never overwrite
    each other and every dataset names the parameters that made it."""
    return f"{push_url.rstrip('/')}/{params_hash(params)}/{flow_run.id or 'local'}"


@flow(name="hindsight", log_prints=True)
def hindsight(
    params_file: str | None = "params.yaml",
    input: str | None = None,
    format: str | None = None,
    limit: int | None = None,
    model: str | None = None,
    judge_model: str | None = None,
    api_base: str | None = None,
    confidence_threshold: float | None = None,
    policy: str | None = None,
    batch_size: int | None = None,
    task_runner: Literal["local", "dask"] | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    out_dir: str = "out/prefect",
    work_dir: str | None = None,
    push_url: str | None = None,
    rounds_root: str | None = None,
) -> dict:
    """Relabel the failed runs in `input` into training data in `out_dir` (stage tables in
    `work_dir`, default `out_dir`, as with `agenther run`); upload `out_dir` to `push_url`
    (e.g. s3://agenther/datasets) when given. With `rounds_root`: one incremental round under it
    instead (out_dir and work_dir unused), pushed to <push_url>/<lineage>/round-NNNN and published/."""
    params = load_params(params_file, overrides(
        input=input, format=format, limit=limit, model=model, judge_model=judge_model, api_base=api_base,
        confidence_threshold=confidence_threshold, policy=policy, batch_size=batch_size, task_runner=task_runner,
        dask_address=dask_address, dask_workers=dask_workers))
    if rounds_root:
        return _round(params, Path(rounds_root), push_url)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out
    work.mkdir(parents=True, exist_ok=True)

    # One model server for the whole run, stopped at its end (after the cluster, whose workers call it)
    with LLMs.from_params(params) as llms, stages.executor(params, str(flow_run.id or "local")) as executor:
        # ingest -> classify -> extract -> relabel -> verify -> package (agenther/stages/__init__.py)
        for stage in PIPELINE:
            summary = run_stage(stage.name, params, work, out, llms, executor)

    if push_url:
        prefix = push_prefix(push_url, params)
        pushed = stages.push(out, prefix, params)
        summary["pushed"] = {"prefix": prefix, "objects": len(pushed)}
        print(f"pushed {len(pushed)} files to {prefix}")

    gates = summary["gates"]
    print(f"{gates['passed_judges']} of {gates['relabels_proposed']} relabels accepted; "
          f"{gates['exported_hindsight_samples']} hindsight samples in {out}")
    if not summary["reconciliation"]["ok"]:
        # Outputs are written (to look at), but the run must not pass as good: same as `agenther run` exit 1.
        failed = [name for name, ok in summary["reconciliation"]["checks"].items() if not ok]
        get_run_logger().error("counts did not reconcile: %s", failed)
        raise RuntimeError(f"counts did not reconcile: {failed}")
    return summary


def _round(params: Params, root: Path, push_url: str | None) -> dict:
    """One round (agenther.rounds.run_round) with the stages' batches as Prefect tasks; each
    round's outputs pushed by the push task."""
    with LLMs.from_params(params) as llms, stages.executor(params, str(flow_run.id or "local")) as executor:
        result = run_round(params, root, llms, executor)
    print(result.message)
    pushed = [{"url": url, "objects": len(stages.push(local, url, params))}
              for local, url in push_targets(result, push_url)] if push_url else []
    if not result.reconciled:
        failed = [name for name, ok in result.entry["checks"].items() if not ok]
        get_run_logger().error("counts did not reconcile: %s", failed)
        raise RuntimeError(f"counts did not reconcile: {failed}")
    return {"lineage": result.lineage, "round": result.round, "folder": str(result.folder),
            "message": result.message, **result.entry, "pushed": pushed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.hindsight", description=hindsight.__doc__)
    parser.add_argument("--params", dest="params_file", default="params.yaml")
    for name in ("input", "format", "model", "judge_model", "api_base", "policy", "work_dir", "push_url", "rounds_root"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--task-runner", choices=("local", "dask"), dest="task_runner",
                        help="where the batches run (default: params' prefect.task_runner, local)")
    parser.add_argument("--dask-address", dest="dask_address", help="tcp://host:8786 of a running Dask cluster")
    parser.add_argument("--dask-workers", type=int, dest="dask_workers",
                        help="worker processes of the LocalCluster started when no address is given")
    parser.add_argument("--confidence-threshold", type=float, dest="confidence_threshold")
    parser.add_argument("--out", dest="out_dir", default="out/prefect")
    hindsight(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
