"""What does Prefect cost? The whole `hindsight` flow against the same stages called directly.

    .venv/bin/python bench/prefect_overhead.py [--repeats 3] [--limit N] [--batch-size N]

Both sides run all stages on the tau-bench sample (data/raw/tau-bench/gpt-4o-airline.json,
all 200 records by default) against a scripted OpenAI-compatible server this script starts
(zero latency, so the LLM's own time does not hide the orchestration's), each measured run
with a fresh LLM response cache and, for the flow, fresh Prefect result storage: every run
does the full work. Prefect uses a temporary local API under a temporary PREFECT_HOME (never
your profile or server); one unmeasured warm-up of each side pays the API start and imports.
Prints each run, the medians, and the ratio flow / direct.

Prefect 3.8 ends a flow run on a whole second after its start: the flow-run heartbeat thread
sleeps in 1 s steps and the engine joins it at exit. `--no-heartbeat` switches heartbeats off
for the measurement (they detect crashed runs; keep them in production) to see the rest.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(tempfile.mkdtemp(prefix="agenther-bench-prefect-"))
# Before prefect is imported: it reads its settings at import.
os.environ.update({"PREFECT_HOME": str(HOME), "PREFECT_PROFILES_PATH": str(HOME / "profiles.toml"),
                   "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{HOME}/prefect.db",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                   "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"})
os.environ.pop("PREFECT_API_URL", None)
sys.path.insert(0, str(ROOT / "tests"))  # the scripted LLM server the tests use

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from llm_server import FakeLLMServer, picky_brain  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402

from agenther.params import load_params  # noqa: E402
from agenther.pipeline import run  # noqa: E402
from flows.hindsight import hindsight  # noqa: E402

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"


brain = picky_brain  # the careful relabeler; the trajectory judge turns down about a third


def params_for(api_base: str, cache: Path, limit: int | None, batch_size: int | None) -> dict:
    overrides: dict = {"ingest": {"input": str(TAU), "format": "tau-bench", "limit": limit},
                       "llm": {"model": "openai/local", "api_base": api_base, "cache_dir": str(cache)}}
    if batch_size:
        overrides["prefect"] = {"batch_size": batch_size}
    return load_params(ROOT / "params.yaml", overrides)


def write_params(params: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(params))
    return path


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="records (default: all 200)")
    parser.add_argument("--batch-size", type=int, default=None, help="prefect.batch_size (default: params.yaml)")
    parser.add_argument("--no-heartbeat", action="store_true", help="flow-run heartbeats off (see above)")
    args = parser.parse_args()
    if args.no_heartbeat:  # no setting turns them off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY must be >= 30)
        from prefect.flow_engine import FlowRunEngine

        FlowRunEngine.heartbeat_seconds = property(lambda self: None)  # type: ignore[method-assign,assignment]

    work = HOME / "runs"
    direct_s: list[float] = []
    flow_s: list[float] = []
    task_runs = 0
    try:
        with FakeLLMServer(brain) as llm:
            counter = iter(range(10**6))

            def fresh(kind: str) -> tuple[dict, Path]:
                n = next(counter)
                return params_for(llm.api_base, work / f"cache-{n}", args.limit, args.batch_size), work / f"{kind}-{n}"

            def direct() -> tuple[float, int]:
                params, out = fresh("direct")
                before = len(llm.requests)
                seconds, summary = timed(lambda: run(params, out))
                assert summary["reconciliation"]["ok"]
                return seconds, len(llm.requests) - before

            def flow() -> tuple[float, int, int]:
                params, out = fresh("flow")
                before = len(llm.requests)
                # Fresh result storage: no task of this run can be a cache hit from an earlier one.
                with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: out.parent / f"{out.name}-results"}):
                    seconds, state = timed(lambda: hindsight(params_file=str(write_params(params, out.parent / f"{out.name}.yaml")),
                                                            out_dir=str(out), return_state=True))
                assert state.is_completed(), state
                with get_client(sync_client=True) as client:
                    n_tasks = len(client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))))
                return seconds, len(llm.requests) - before, n_tasks

            print("warming up (temporary Prefect API, imports) ...", flush=True)
            direct()
            flow()
            for i in range(args.repeats):
                d, d_calls = direct()
                f, f_calls, task_runs = flow()
                assert f_calls == d_calls > 0, (f_calls, d_calls)  # the same full work on both sides
                direct_s.append(d)
                flow_s.append(f)
                print(f"run {i + 1}: direct {d:6.2f} s   flow {f:6.2f} s   ({d_calls} LLM calls each, "
                      f"{task_runs} task runs)", flush=True)
    finally:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
        shutil.rmtree(HOME, ignore_errors=True)

    d, f = statistics.median(direct_s), statistics.median(flow_s)
    records = args.limit or len(json.loads(TAU.read_text()))
    heartbeat = "off" if args.no_heartbeat else "on (Prefect default)"
    print(f"\n{records} tau-bench records, {args.repeats} runs each, fresh caches, zero-latency LLM server, "
          f"flow-run heartbeats {heartbeat}")
    print(f"median direct (agenther.pipeline.run): {d:6.2f} s")
    print(f"median Prefect flow (hindsight):       {f:6.2f} s")
    print(f"overhead: {f - d:+.2f} s for one flow run with {task_runs} task runs "
          f"(at most {max(f - d, 0) / max(task_runs, 1) * 1000:.0f} ms per task run)")
    print(f"ratio flow / direct: {f / d:.2f}x")


if __name__ == "__main__":
    main()
