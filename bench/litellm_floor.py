"""The floor under bench/llm_throughput.py: bare `litellm.completion` calls, no agenther code.

    .venv/bin/python bench/litellm_floor.py [--calls 244] [--concurrency 1 64 128] [--latency 0.2] [--repeats 3]

Sends `--calls` identical-shape requests (a ~2,000-character prompt, JSON mode) from a thread
pool straight through litellm to the scripted server of llm_throughput.py, which runs in its
own process and answers each after `--latency` seconds. Prints wall time, this process's CPU,
calls/s and the ratio to concurrency 1, medians of `--repeats` runs. Whatever agenther does
per call comes on top of this, so the ratio here bounds what relabel + verify can reach.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from llm_server import Reply  # noqa: E402
from llm_throughput import LATENCY, llm_server  # noqa: E402  (its server process, backlog 1024)

from agenther.llm.backend import litellm as _litellm  # noqa: E402  (offline price map, quiet)

litellm = _litellm()

PROMPT = [{"role": "user", "content": "Write the request this run satisfies. " + "x" * 2000}]


def floor_brain(request: dict) -> Reply:
    return Reply('{"hindsight_prompt": "p", "confidence": 0.9}', delay_s=LATENCY["s"])


def call(api_base: str, i: int) -> None:
    litellm.completion(model="openai/local", api_base=api_base, api_key="x", temperature=0.0, max_tokens=320,
                       messages=[*PROMPT, {"role": "user", "content": str(i)}], seed=0, timeout=30,
                       num_retries=0, max_retries=0, response_format={"type": "json_object"})


def run(api_base: str, calls: int, concurrency: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: call(api_base, i), range(calls)))
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=244)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 128])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serial-calls", type=int, default=24, help="calls at concurrency 1 (a rate: compares)")
    args = parser.parse_args()
    rows = []
    with llm_server(args.latency, False, floor_brain) as api_base:
        call(api_base, -1)  # warm-up: imports, client set-up
        for c in args.concurrency:
            n = args.serial_calls if c == 1 else args.calls
            runs = [run(api_base, n, c) for _ in range(args.repeats)]
            wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append((c, n, wall, cpu))
            print(f"concurrency {c}: {n} calls, wall {[round(r[0], 2) for r in runs]}", flush=True)
    base = rows[0][1] / rows[0][2]
    print(f"\nbare litellm.completion, {args.latency * 1000:.0f} ms per call, medians of {args.repeats}")
    print("| concurrency | calls | wall | CPU (client) | CPU per call | calls/s | vs 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c, n, wall, cpu in rows:
        print(f"| {c} | {n} | {wall:.2f} s | {cpu:.2f} s | {cpu / n * 1000:.1f} ms | {n / wall:.1f} | "
              f"{n / wall / base:.1f}x |")


if __name__ == "__main__":
    main()
