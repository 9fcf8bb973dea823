"""The non-LLM stages at scale: ingest, classify, extract, package on synthetic tau-bench logs.

    .venv/bin/python bench/stages_scale.py [--sizes 1000 10000 100000] [--batch-rows N] [--keep]

For each size N the script writes a JSONL log of N tau-bench records derived from the 200 real
ones (data/raw/tau-bench/gpt-4o-airline.json, cycled; copy k of a record has task_id
original + 1000 * k, so ids are unique and each copy keeps its own trials; the trajectories
themselves are byte-identical to the real ones). Generation is not timed. Then a fresh
subprocess per size runs the stages as `agenther run` does (agenther.runner.run_stage, gates
on, rule classify/extract), except that relabel and verify (the LLM stages, benched in
llm_throughput.py) are replaced by empty outputs, so package exports the successes and the
natural preference pairs. The child reports each stage's wall time and its peak RSS so far
(getrusage ru_maxrss, which only grows: the peak after stage X is the peak of everything up
to X), and how much of ingest's and package's CPU their shards took (what an executor spreads over workers;
the rest runs in one process: bench/model_10m.py). Prints records/s and MB/s (of the JSONL input)
per stage and peak RSS per size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
STAGES = ("ingest", "classify", "extract", "package")


def generate(n: int, path: Path) -> None:
    records = json.loads(TAU.read_text())
    # Serialize each real record once; copies differ only in task_id (spliced in front).
    bodies = [(r["task_id"], json.dumps({k: v for k, v in r.items() if k != "task_id"})) for r in records]
    with path.open("w") as fh:
        for i in range(n):
            task_id, body = bodies[i % len(bodies)]
            fh.write(f'{{"task_id": {task_id + 1000 * (i // len(bodies))}, {body[1:]}\n')


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(log: Path, work: Path, batch_rows: int | None) -> None:
    from agenther import gates, schema
    from agenther.llm import LLMs, Usage
    from agenther.params import load_params
    from agenther.runner import LocalExecutor, run_stage
    from agenther.tables import write_table
    from agenther.workdir import TABLES, write_stats

    overrides: dict = {"ingest": {"input": str(log), "format": "tau-bench"}}
    if batch_rows:
        overrides["io"] = {"batch_rows": batch_rows}
    params = load_params(ROOT / "params.yaml", overrides)
    report = {"rss_after_imports_mb": peak_mb(), "stages": {}}
    gate_s = [0.0]
    check = gates.check

    def timed_check(*a, **k):  # the Great Expectations gates each stage runs on its input tables
        start = time.perf_counter()
        try:
            return check(*a, **k)
        finally:
            gate_s[0] += time.perf_counter() - start

    gates.check = timed_check
    shards_cpu = [0.0]

    class Timed(LocalExecutor):  # the stage loop's own executor; counts the CPU of ingest's and package's shards
        def spread(self, fn, jobs, stage=""):
            for job in jobs:
                start = time.process_time()
                result = fn(job)
                shards_cpu[0] += time.process_time() - start
                yield result

    with LLMs.from_params(params) as llms:
        for name in STAGES:
            if name == "package":  # the LLM stages, as if they had accepted nothing
                for stage, kept in (("relabel", schema.RELABELED), ("verify", schema.VERIFIED)):
                    write_table(schema.empty(kept), work / TABLES["relabeled" if stage == "relabel" else "verified"])
                    write_table(schema.empty(schema.REJECTION), work / TABLES[f"{stage}_rejected"])
                    write_stats(work, stage, {"in": 0, "out": 0, "rejected": 0, "usage": vars(Usage()).copy()})
            start, cpu, gate_s[0], shards_cpu[0] = time.perf_counter(), time.process_time(), 0.0, 0.0
            result = run_stage(name, params, work, work / "out", llms, Timed())
            report["stages"][name] = {"seconds": time.perf_counter() - start, "gates": gate_s[0],
                                      "cpu_seconds": time.process_time() - cpu,  # every thread of the process
                                      "peak_rss_mb": peak_mb()}
            if name in ("ingest", "package"):  # the stages whose shards an executor spreads
                report["stages"][name]["shards_cpu_seconds"] = shards_cpu[0]
            if name == "ingest":
                report["trajectories"] = result["trajectories"]
    report["packaged"] = result["stages"]["package"]
    # Bytes on disk: the input, each stage's table, the exports (for bench/model_10m.py).
    report["bytes"] = {"input_jsonl": log.stat().st_size,
                       "tables": {p.name: p.stat().st_size for p in sorted(work.glob("*.parquet"))},
                       "exports": sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file())}
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--keep", action="store_true", help="keep the generated logs and work folders")
    parser.add_argument("--batch-rows", type=int, help="io.batch_rows (default: params.yaml's)")
    parser.add_argument("--json", type=Path, help="also write every size's report (stage times, CPU, bytes) here")
    parser.add_argument("--child", nargs=2, metavar=("LOG", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.batch_rows)
        return

    tmp = Path(tempfile.mkdtemp(prefix="agenther-bench-scale-"))
    results = []
    try:
        for n in args.sizes:
            log = tmp / f"tau-{n}.jsonl"
            generate(n, log)
            mb = log.stat().st_size / 1e6
            print(f"{n} records, {mb:.0f} MB JSONL: running the stages in a fresh process ...", flush=True)
            start = time.perf_counter()
            extra = ["--batch-rows", str(args.batch_rows)] if args.batch_rows else []
            proc = subprocess.run([sys.executable, __file__, "--child", str(log), str(tmp / f"work-{n}"), *extra],
                                  capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - start
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"  size {n} failed (exit {proc.returncode}), wall {wall:.0f} s", flush=True)
                continue
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append((n, mb, report))
            print("  " + ", ".join(f"{s} {v['seconds']:.1f} s (peak {v['peak_rss_mb']:.0f} MB)"
                                   for s, v in report["stages"].items()), flush=True)
            if not args.keep:
                log.unlink()
                shutil.rmtree(tmp / f"work-{n}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        args.json.write_text(json.dumps([{"records": n, "input_mb": mb, **report} for n, mb, report in results], indent=1))
    print("\n| records | input | stage | time | CPU | of which gates | records/s | MB/s | peak RSS so far |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, mb, report in results:
        for name, v in report["stages"].items():
            print(f"| {n} | {mb:.0f} MB | {name} | {v['seconds']:.2f} s | {v['cpu_seconds']:.2f} s | {v['gates']:.2f} s | "
                  f"{n / v['seconds']:.0f} | {mb / v['seconds']:.1f} | {v['peak_rss_mb']:.0f} MB |")
        total = sum(v["seconds"] for v in report["stages"].values())
        cpu = sum(v["cpu_seconds"] for v in report["stages"].values())
        gate_total = sum(v["gates"] for v in report["stages"].values())
        print(f"| {n} | {mb:.0f} MB | **all four** | {total:.2f} s | {cpu:.2f} s | {gate_total:.2f} s | {n / total:.0f} | "
              f"{mb / total:.1f} | {max(v['peak_rss_mb'] for v in report['stages'].values()):.0f} MB |")
    for n, _, report in results:
        for name in ("ingest", "package"):
            stage = report["stages"][name]
            print(f"\n{n} records: {name}'s shards (spread by an executor) took {stage['shards_cpu_seconds']:.2f} of its "
                  f"{stage['cpu_seconds']:.2f} CPU-s")
    print("\n| records | input MB | peak RSS | RSS after imports | peak / input |")
    print("| --- | --- | --- | --- | --- |")
    for n, mb, report in results:
        peak = max(v["peak_rss_mb"] for v in report["stages"].values())
        print(f"| {n} | {mb:.0f} | {peak:.0f} MB | {report['rss_after_imports_mb']:.0f} MB | {peak / mb:.1f}x |")


if __name__ == "__main__":
    main()
