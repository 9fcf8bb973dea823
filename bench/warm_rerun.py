"""A warm rerun against the cold run: whole `agenther run` processes, zero LLM latency.

    .venv/bin/python bench/warm_rerun.py [--repeats 3] [--warm-repeats 5] [--limit N]
                                         [--baseline REV]

Every run is a fresh process (`python -m agenther.cli run`, as a user types it: imports, the
stages, exit) on the tau-bench sample (data/raw/tau-bench/gpt-4o-airline.json, all 200 records
by default) against a scripted OpenAI-compatible server this script starts on loopback, which
answers at once (the careful relabeler and judges of tests/llm_server.py), so the LLM's own
time hides nothing. Three kinds of run:
- cold: a new output folder and a new LLM response cache: every stage runs, every call is made;
- warm: the same command again on the last cold run's folder: every stage is up to date
  (its stamp matches), 0 calls;
- from cache: a new output folder on the last cold run's LLM cache: every stage runs, 0 calls.
Prints each run, the medians, and warm / cold (target: at most 10%).

`--baseline REV` measures the code of git revision REV too (exported with `git archive` into a
temporary folder, run with the same interpreter), in the same invocation, so the two compare
(cold and warm only).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted LLM server the tests use

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import yaml  # noqa: E402
from llm_server import FakeLLMServer, careful_brain  # noqa: E402

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
TARGET = 0.10


class Runner:
    """`agenther run` processes of one code tree against the scripted server."""

    def __init__(self, code: Path, server: FakeLLMServer, work: Path, limit: int | None):
        self.code, self.server, self.work, self.limit = code, server, work, limit
        self.env = dict(os.environ, PYTHONPATH=str(code), LITELLM_LOCAL_MODEL_COST_MAP="True")
        self.runs = 0

    def run(self, out: Path, cache: Path) -> tuple[float, int]:
        """Wall time of one process and the LLM calls the server saw from it."""
        params = self.work / f"params-{cache.name}.yaml"
        params.write_text(yaml.safe_dump({"llm": {"model": "openai/local", "api_base": self.server.api_base,
                                                  "cache_dir": str(cache)}}))
        cmd = [sys.executable, "-m", "agenther.cli", "run", "--input", str(TAU), "--out", str(out),
               "--params", str(params)] + (["--limit", str(self.limit)] if self.limit else [])
        before = len(self.server.requests)
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=self.code, env=self.env, capture_output=True, text=True)
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"agenther run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return took, len(self.server.requests) - before

    def fresh(self, kind: str) -> tuple[Path, Path]:
        self.runs += 1
        return self.work / f"{kind}-{self.runs}", self.work / f"cache-{self.runs}"


def measure(name: str, runner: Runner, repeats: int, warm_repeats: int, from_cache: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {"cold": [], "warm": [], "from cache": []}
    for _ in range(repeats):
        out, cache = runner.fresh("cold")
        took, calls = runner.run(out, cache)
        times["cold"].append(took)
        print(f"  {name:9s} cold        {took:6.2f} s  {calls:4d} LLM calls", flush=True)
        assert calls > 0, "a cold run made no call"
    for _ in range(warm_repeats):
        took, calls = runner.run(out, cache)  # the last cold run's folder and cache
        times["warm"].append(took)
        print(f"  {name:9s} warm        {took:6.2f} s  {calls:4d} LLM calls", flush=True)
        assert calls == 0, "a warm rerun made calls"
    for _ in range(repeats if from_cache else 0):
        took, calls = runner.run(runner.fresh("cached")[0], cache)
        times["from cache"].append(took)
        print(f"  {name:9s} from cache  {took:6.2f} s  {calls:4d} LLM calls", flush=True)
        assert calls == 0, "a run on a warm LLM cache made calls"
    return {kind: statistics.median(values) for kind, values in times.items() if values}


def export(rev: str, into: Path) -> Path:
    """The tree of git revision `rev` in a folder (the repository is not touched)."""
    data = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold runs and from-cache runs (default 3)")
    parser.add_argument("--warm-repeats", type=int, default=5, help="warm reruns (default 5)")
    parser.add_argument("--limit", type=int, help="only the first N records (default: all 200)")
    parser.add_argument("--baseline", metavar="REV", help="also measure the code of this git revision")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="agenther-bench-warm-") as tmp, FakeLLMServer(careful_brain) as server:
        trees = {"this code": ROOT}
        if args.baseline:
            trees[args.baseline] = export(args.baseline, Path(tmp) / "baseline")
        for name, code in trees.items():
            work = Path(tmp) / f"work-{len(results)}"
            work.mkdir()
            print(f"{name} ({code}):", flush=True)
            results[name] = measure(name, Runner(code, server, work, args.limit), args.repeats, args.warm_repeats,
                                    from_cache=code == ROOT)

    print(f"\nmedians ({args.repeats} cold, {args.warm_repeats} warm, {args.repeats} from cache; "
          f"{args.limit or 200} records, zero LLM latency):")
    print("| code | cold | warm rerun | warm / cold | new folder, warm LLM cache |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in results.items():
        ratio = m["warm"] / m["cold"]
        cached = f"{m['from cache']:.2f} s" if "from cache" in m else "not measured"
        print(f"| {name} | {m['cold']:.2f} s | {m['warm']:.2f} s | {ratio:.1%} | {cached} |")
    ratio = results["this code"]["warm"] / results["this code"]["cold"]
    print(f"\nwarm / cold = {ratio:.1%}: target <= {TARGET:.0%} {'met' if ratio <= TARGET else 'MISSED'}")
    print(json.dumps({name: {k: round(v, 3) for k, v in m.items()} for name, m in results.items()}))


if __name__ == "__main__":
    main()
