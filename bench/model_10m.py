"""A 10-million-trajectory run on paper: CPU, bytes, LLM calls, workers, hours and dollars.

    .venv/bin/python bench/model_10m.py                          # the figures measured for bench/README.md
    .venv/bin/python bench/model_10m.py --scale out/scale.json   # CPU and bytes from a stages_scale.py --json run
    .venv/bin/python bench/model_10m.py --trajectories 1e6 --hosted-rpm 500 --hosted-tpm 200000

Every input is a measurement named below, scaled linearly to N trajectories (the stages stream: per
trajectory cost does not grow with N, bench/stages_scale.py); the assumptions (the failure share and
funnel of the measured log, provider limits and prices) are arguments, printed with the result.

- Non-LLM stages (ingest, classify, extract in rules mode, package): CPU-seconds and bytes per
  trajectory from bench/stages_scale.py (synthetic tau-bench log, `--json`), final code; ingest's
  and package's shards (parts of the logs; rows, buckets, the files' merges and the exporters'
  finishes) spread over workers like classify's and extract's batches; what is left of them (the
  plans, ingest's merge of the parts, the summary and report) runs in one process.
- LLM stages (relabel, verify): calls and tokens per trajectory from bench/quality.py on the 200
  shipped tau-bench records with the embedded Qwen2.5-Coder-1.5B (out/bench-quality, summary.json):
  116 failures (58%) -> 29 relabel candidates -> 66 relabel calls + 17 judge calls = 83 calls,
  53,278 prompt and 4,170 completion tokens, 5 accepted samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ("ingest", "classify", "extract", "package")
# bench/stages_scale.py --sizes 10000 20000 --json, commit dc3e6e5 (issue 22's second pass; bench/README.md,
# "Per-core speed, issue 22"), 20,000 synthetic tau-bench records: CPU-seconds per stage
# (time.process_time), of them ingest's and package's shards (what an executor spreads), bytes of the
# JSONL input and of the output folder.
MEASURED_SCALE = {
    "records": 20_000,
    "cpu_seconds": {"ingest": 12.97, "classify": 10.59, "extract": 45.73, "package": 85.86},
    "shards_cpu_seconds": {"ingest": 11.00, "package": 79.50},
    "input_jsonl": 358_926_860,
    # The synthetic log repeats 200 trajectories, which zstd compresses away inside a row group: the
    # work tables are taken from a whole run on the 200 distinct shipped records instead (out/tau-bench:
    # every *.parquet, 1,037,771 bytes, issue 13).
    "tables": 1_037_771 * 20_000 // 200,
    "exports": 4_224_998_226,  # every file of the output folder (211 kB a trajectory: per-turn TRL/LLaMA-Factory rows)
}
# bench/quality.py, tau-bench, 200 records (out/bench-quality/tau-bench/summary.json, commit b6ed4dc)
MEASURED_LLM = {"records": 200, "failures": 116, "candidates": 29, "relabel_calls": 66, "judge_calls": 17,
                "prompt_tokens": 53_278, "completion_tokens": 4_170, "accepted": 5}
CLIENT_CPU_MS_PER_CALL = 3.0  # bench/README.md "Where the CPU goes": litellm + our client, per call


def from_scale_report(path: Path, records: int | None = None) -> dict:
    """The largest size of a stages_scale.py --json report as MEASURED_SCALE."""
    sizes = json.loads(path.read_text())
    report = max(sizes, key=lambda r: r["records"]) if records is None else next(
        r for r in sizes if r["records"] == records)
    return {"records": report["records"],
            "cpu_seconds": {s: report["stages"][s]["cpu_seconds"] for s in STAGES},
            "shards_cpu_seconds": {s: report["stages"][s].get("shards_cpu_seconds", 0.0) for s in ("ingest", "package")},
            "input_jsonl": report["bytes"]["input_jsonl"],
            "tables": sum(report["bytes"]["tables"].values()),
            "exports": report["bytes"]["exports"]}


def stage_hours(serial: float, spread: float, cores: int) -> float:
    return (serial + spread / cores) / 3600


def model(n: float, scale: dict, llm: dict, args: argparse.Namespace) -> list[str]:
    out = []
    per = {s: scale["cpu_seconds"][s] / scale["records"] for s in STAGES}
    cpu = sum(per.values()) * n
    out.append(f"## {n:,.0f} trajectories\n")
    out.append("Non-LLM stages (measured per trajectory, x N):\n")
    out.append("| stage | CPU ms / trajectory | CPU-hours for N |")
    out.append("| --- | --- | --- |")
    for s in STAGES:
        out.append(f"| {s} | {per[s] * 1e3:.2f} | {per[s] * n / 3600:,.1f} |")
    out.append(f"| **all four** | {sum(per.values()) * 1e3:.2f} | {cpu / 3600:,.1f} |")
    # classify and extract run batch by batch, ingest and package shard by shard (spread over workers);
    # what ingest and package do around their shards (plans, ingest's merge of its parts, package's
    # dedup, summary and report) runs in one process: one core whatever the cluster.
    shards = sum(scale["shards_cpu_seconds"].values()) / scale["records"]
    serial = (per["ingest"] + per["package"] - shards) * n
    spread = (per["classify"] + per["extract"] + shards) * n
    out.append("")
    for cores in args.cores:
        out.append(f"- on {cores} cores: what runs in one process {serial / 3600:,.1f} h + the batches and shards "
                   f"spread {spread / 3600:,.1f} CPU-h / {cores} = **{stage_hours(serial, spread, cores):,.1f} h** "
                   f"(if everything spread: {cpu / cores / 3600:,.2f} h)")
    gb = scale["records"] / n * 1e9  # bytes measured for `records` -> GB for n
    out.append("\nBytes (measured per trajectory, x N):\n")
    out.append("| what | bytes / trajectory | for N |")
    out.append("| --- | --- | --- |")
    for label, key in (("input JSONL", "input_jsonl"), ("work tables (Parquet, zstd)", "tables"),
                       ("exports (every file of the output folder)", "exports")):
        out.append(f"| {label} | {scale[key] / scale['records']:,.0f} | {scale[key] / gb:,.1f} GB |")

    failure_share = llm["failures"] / llm["records"]
    calls = (llm["relabel_calls"] + llm["judge_calls"]) / llm["records"] * n
    prompt = llm["prompt_tokens"] / llm["records"] * n
    completion = llm["completion_tokens"] / llm["records"] * n
    accepted = llm["accepted"] / llm["records"] * n
    tokens_per_call = (llm["prompt_tokens"] + llm["completion_tokens"]) / (llm["relabel_calls"] + llm["judge_calls"])
    out.append(f"\nLLM stages (funnel of the measured log: {failure_share:.0%} failures, "
               f"{llm['candidates'] / llm['failures']:.0%} of them relabel candidates, "
               f"{llm['accepted'] / llm['candidates']:.0%} of candidates accepted):\n")
    out.append("| | per trajectory | for N |")
    out.append("| --- | --- | --- |")
    out.append(f"| LLM calls (relabel + judges) | {calls / n:.3f} | {calls / 1e6:,.2f} M |")
    out.append(f"| prompt tokens | {prompt / n:,.1f} | {prompt / 1e9:,.2f} G |")
    out.append(f"| completion tokens | {completion / n:,.1f} | {completion / 1e9:,.3f} G |")
    out.append(f"| accepted hindsight samples | {accepted / n:.4f} | {accepted / 1e3:,.0f} k |")
    out.append(f"| client CPU ({CLIENT_CPU_MS_PER_CALL} ms per call) | | {calls * CLIENT_CPU_MS_PER_CALL / 1e3 / 3600:,.1f} CPU-h |")

    rpm, tpm = args.hosted_rpm, args.hosted_tpm
    minutes_rpm, minutes_tpm = calls / rpm, (prompt + completion) / tpm
    hosted_h = max(minutes_rpm, minutes_tpm) / 60
    dollars = prompt / 1e6 * args.price_in + completion / 1e6 * args.price_out
    bound = "requests per minute" if minutes_rpm >= minutes_tpm else "tokens per minute"
    out.append(f"\nHosted model at {rpm:,} RPM and {tpm:,} TPM, ${args.price_in}/M prompt and "
               f"${args.price_out}/M completion tokens ({tokens_per_call:.0f} tokens per call):\n")
    out.append(f"- by RPM: {calls:,.0f} calls / {rpm:,} = {minutes_rpm:,.0f} min; by TPM: "
               f"{prompt + completion:,.0f} tokens / {tpm:,} = {minutes_tpm:,.0f} min -> "
               f"**{hosted_h:,.1f} h**, bound by {bound}")
    out.append(f"- cost: {prompt / 1e6:,.0f} M x ${args.price_in} + {completion / 1e6:,.0f} M x ${args.price_out} = "
               f"**${dollars:,.0f}** (${dollars / accepted:.4f} per accepted sample)")
    in_flight = rpm / 60 * args.latency_s
    out.append(f"- in flight to hold the limit at {args.latency_s} s per call: {in_flight:,.0f} (`llm.concurrency`)")

    rps = args.fleet_rps
    fleet_h = calls / rps / 3600
    out.append(f"\nSelf-hosted fleet answering {rps:,} requests/s ({args.latency_s} s per call):\n")
    out.append(f"- {calls:,.0f} calls / {rps:,} per s = **{fleet_h:,.1f} h**; {rps * args.latency_s:,.0f} requests "
               f"in flight; the clients' CPU {rps * CLIENT_CPU_MS_PER_CALL / 1e3:.1f} cores "
               f"({CLIENT_CPU_MS_PER_CALL} ms per call)")
    out.append(f"- GPU time: {fleet_h:,.1f} h x fleet; at ${args.gpu_hour}/GPU-hour and "
               f"{args.fleet_gpus} GPUs: **${fleet_h * args.fleet_gpus * args.gpu_hour:,.0f}**")
    out.append("\nBottleneck, per number of cores for the non-LLM stages:\n")
    for cores in args.cores:
        stage_h = stage_hours(serial, spread, cores)
        out.append(f"- {cores} cores: stages {stage_h:,.2f} h vs LLM {hosted_h:,.1f} h hosted / {fleet_h:,.1f} h fleet: "
                   + ("the LLM limits" if min(hosted_h, fleet_h) > stage_h else "the CPU stages limit"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=float, default=10e6)
    parser.add_argument("--scale", type=Path, help="a bench/stages_scale.py --json report (default: the figures above)")
    parser.add_argument("--cores", type=int, nargs="+", default=[2, 64, 256])
    parser.add_argument("--hosted-rpm", type=int, default=30_000)
    parser.add_argument("--hosted-tpm", type=int, default=150_000_000)
    parser.add_argument("--price-in", type=float, default=0.15, help="$ per million prompt tokens")
    parser.add_argument("--price-out", type=float, default=0.60, help="$ per million completion tokens")
    parser.add_argument("--latency-s", type=float, default=2.0, help="seconds per call (a guess: state yours)")
    parser.add_argument("--fleet-rps", type=int, default=1_000)
    parser.add_argument("--fleet-gpus", type=int, default=8)
    parser.add_argument("--gpu-hour", type=float, default=2.0, help="$ per GPU-hour")
    args = parser.parse_args()
    scale = from_scale_report(args.scale) if args.scale else MEASURED_SCALE
    print("\n".join(model(args.trajectories, scale, MEASURED_LLM, args)))


if __name__ == "__main__":
    main()
