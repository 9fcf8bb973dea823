"""The non-LLM stages through the flow's executor on Dask: 1 and 2 workers, and the cost of Dask.

    .venv/bin/python bench/dask_scale.py [--records 100000] [--batch-size 1000] [--repeats 3] [--workers 1 2]

Part 1 (scale; `--workers 0` is the local task runner): a JSONL log of `--records` synthetic
tau-bench records (bench/stages_scale.py's generator: the 200 real records cycled with unique task ids; not timed) goes through ingest,
classify and extract (rules mode) and package, as the hindsight flow runs them: the same
`tasks.stages.executor` and `agenther.runner.run_stage` inside a Prefect flow, every batch a
cached, persisted task run on a DaskTaskRunner's LocalCluster of 1, then 2 worker processes (one
thread each). relabel and verify (the LLM stages) are replaced by empty tables, as in
stages_scale.py, so package exports the successes and the natural preference pairs. Prints per
stage the wall time and records/s, the flow process's and each worker's peak RSS (VmHWM).
Classify and extract are spread batch by batch (each task reads its rows of the input table from the
work folder: no batch is pickled into the task graph), ingest part by part (io.part_mb of the log
each, a big JSONL file cut at line starts; the parts merged in the flow process), package shard by
shard (its rows, its preference-pair buckets, each export file's merge and each exporter's finish,
agenther/stages/packaging.py and agenther/export/files.py).

Part 2 (overhead): the 200 real records, the same flow with the local task runner and on Dask
(a LocalCluster of 2 started by the run, and an already running one given by address), medians
of `--repeats` runs after an unmeasured warm-up, every run with fresh result storage.

Prefect runs against a temporary local API under a temporary PREFECT_HOME (never your profile).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(tempfile.mkdtemp(prefix="agenther-bench-dask-"))
# Before prefect is imported: it reads its settings at import.
os.environ.update({"PREFECT_HOME": str(HOME), "PREFECT_PROFILES_PATH": str(HOME / "profiles.toml"),
                   "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{HOME}/prefect.db",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                   "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_TO_API_ENABLED": "false",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"})
os.environ.pop("PREFECT_API_URL", None)
sys.path.insert(0, str(ROOT / "bench"))

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import distributed  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    PREFECT_TASKS_REFRESH_CACHE,
    temporary_settings,
)
from stages_scale import generate  # noqa: E402

from agenther import schema  # noqa: E402
from agenther.llm import LLMs, Usage  # noqa: E402
from agenther.params import load_params  # noqa: E402
from agenther.runner import run_stage  # noqa: E402
from agenther.tables import write_table  # noqa: E402
from agenther.workdir import TABLES, write_stats  # noqa: E402
from tasks import stages  # noqa: E402

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"


def peak_mb() -> float:
    """This process's peak RSS: VmHWM, not ru_maxrss, which a spawned worker inherits from the
    process that forked it (Linux keeps the larger of the two across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def pid_and_peak_mb() -> tuple[int, float]:
    return os.getpid(), peak_mb()


def _empty_llm_stages(work: Path) -> None:
    """relabel and verify as if they had accepted nothing (bench/stages_scale.py does the same)."""
    for stage, kept in (("relabel", schema.RELABELED), ("verify", schema.VERIFIED)):
        write_table(schema.empty(kept), work / TABLES["relabeled" if stage == "relabel" else "verified"])
        write_table(schema.empty(schema.REJECTION), work / TABLES[f"{stage}_rejected"])
        write_stats(work, stage, {"in": 0, "out": 0, "rejected": 0, "usage": vars(Usage()).copy()})


@flow(name="bench-dask-scale", log_prints=False)
def non_llm_stages(params_file: str, log: str, work: str, overrides: dict) -> dict:
    """hindsight's stage sequence without the LLM stages: the executor and stage loop the flow uses."""
    params = load_params(params_file, {"ingest": {"input": log, "format": "tau-bench"}} | overrides)
    work_dir = Path(work)
    report: dict = {"stages": {}}
    with LLMs.from_params(params) as llms, stages.executor(params, str(flow_run.id)) as executor:
        for name in ("ingest", "classify", "extract", "package"):
            if name == "package":
                _empty_llm_stages(work_dir)
            start = time.perf_counter()
            run_stage(name, params, work_dir, work_dir / "out", llms, executor)
            report["stages"][name] = time.perf_counter() - start
        if executor.task_runner is not None:
            workers = executor.task_runner.client.run(pid_and_peak_mb)  # {address: (pid, peak)}
            assert len({pid for pid, _ in workers.values()}) == len(workers), workers  # one process each
            report["worker_peak_rss_mb"] = sorted(peak for _, peak in workers.values())
    report["flow_peak_rss_mb"] = peak_mb()
    return report


def run_once(log: Path, overrides: dict, tag: str) -> tuple[float, dict]:
    """One flow run with fresh work folder and result storage: (wall seconds, its report)."""
    work = HOME / f"work-{tag}"
    storage = HOME / f"results-{tag}"
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage, PREFECT_TASKS_REFRESH_CACHE: True}):
        start = time.perf_counter()
        report = non_llm_stages(str(ROOT / "params.yaml"), str(log), str(work), overrides)
        wall = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    return wall, report


def scale(records: int, batch_size: int, worker_counts: list[int]) -> None:
    log = HOME / f"tau-{records}.jsonl"
    generate(records, log)
    mb = log.stat().st_size / 1e6
    print(f"## scale: {records} synthetic records ({mb:.0f} MB JSONL), prefect.batch_size {batch_size}\n", flush=True)
    rows = []
    for workers in worker_counts:  # 0: the local task runner (batches in the flow's thread), for comparison
        overrides = {"prefect": {"batch_size": batch_size, "task_runner": "dask" if workers else "local",
                                 "dask_workers": max(workers, 1)}}
        wall, report = run_once(log, overrides, f"scale-{workers}")
        rows.append((workers, wall, report))
        print(f"{workers or 'local'} worker(s): {wall:.1f} s wall; " + ", ".join(f"{s} {v:.1f} s" for s, v in report["stages"].items())
              + f"; flow peak {report['flow_peak_rss_mb']:.0f} MB, workers' peaks {report.get('worker_peak_rss_mb')} MB",
              flush=True)
    log.unlink()
    print("\n| workers | stage | time | records/s |")
    print("| --- | --- | --- | --- |")
    for workers, wall, report in rows:
        for name, seconds in report["stages"].items():
            print(f"| {workers} | {name} | {seconds:.1f} s | {records / seconds:.0f} |")
        spread = report["stages"]["classify"] + report["stages"]["extract"]
        print(f"| {workers} | classify + extract (spread) | {spread:.1f} s | {records / spread:.0f} |")
        print(f"| {workers} | **whole flow** | {wall:.1f} s | {records / wall:.0f} |")
    print("\n| workers | flow process peak RSS | each worker's peak RSS |")
    print("| --- | --- | --- |")
    for workers, _, report in rows:
        print(f"| {workers} | {report['flow_peak_rss_mb']:.0f} MB | "
              f"{', '.join(f'{m:.0f} MB' for m in report.get('worker_peak_rss_mb', [])) or '(no workers)'} |")


def overhead(repeats: int, batch_size: int) -> None:
    print(f"\n## overhead: the 200 real records, prefect.batch_size {batch_size}, median of {repeats}\n", flush=True)
    base = {"batch_size": batch_size}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as running:
        sides = {"local task runner": {"prefect": base | {"task_runner": "local"}},
                 "dask, LocalCluster of 2 started by the run": {"prefect": base | {"task_runner": "dask", "dask_workers": 2}},
                 "dask, a running cluster of 2 (address)": {"prefect": base | {"task_runner": "dask",
                                                                               "dask_address": running.scheduler_address}}}
        medians = {}
        for label, overrides in sides.items():
            run_once(TAU, overrides, "warm")  # imports, API, the workers' imports
            walls = [run_once(TAU, overrides, f"o{i}")[0] for i in range(repeats)]
            medians[label] = statistics.median(walls)
            print(f"{label}: {', '.join(f'{w:.2f}' for w in walls)} s -> median {medians[label]:.2f} s", flush=True)
    local = medians["local task runner"]
    print("\n| task runner | median wall (200 records) | vs local |")
    print("| --- | --- | --- |")
    for label, median in medians.items():
        print(f"| {label} | {median:.2f} s | {median - local:+.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000, help="prefect.batch_size for the scale part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="Dask worker counts for the scale part (0: the local task runner)")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    try:
        if not args.skip_scale:
            scale(args.records, args.batch_size, args.workers)
        if not args.skip_overhead:
            overhead(args.repeats, 32)
    finally:
        shutil.rmtree(HOME, ignore_errors=True)


if __name__ == "__main__":
    main()
