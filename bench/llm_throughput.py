"""LLM stage throughput: relabel + verify at several `llm.concurrency` values against a server
that answers every call after a fixed latency; then warm reruns and compacted vs whole prompts.

    .venv/bin/python bench/llm_throughput.py [--concurrency 1 8 64 128] [--processes 0 2]
                                             [--serial-subset 24] [--latency 0.2]
                                             [--in-process-server] [--no-staged]

Ingest, classify and extract run once on the tau-bench sample (data/raw/tau-bench/gpt-4o-airline.json,
116 failures). Then, for every concurrency N, on copies of those tables with `llm.concurrency = N`
and a fresh LLM cache each (every call goes to the server):
- staged: `stage_relabel` then `stage_verify` (a barrier between them: how `agenther stage` and
  `dvc repro` run them);
- fused: `run_stages(fuse=True)` (how `agenther run` runs them: one concurrent map over the records,
  each judged as soon as its relabel passes; two records per request slot, at most N requests open);
- warm: fused again on the same work folder and cache: both stages are skipped by their stamps;
- warm-cache: the same with the stamps deleted: tables, gates and stamps redone, every answer
  read from the LLM cache (zero calls).
Times are the stages' wall time (table reads and writes, Great Expectations gates, stamps included);
"relabel_verify()" is the time inside the LLM work alone. The scripted server (tests/llm_server.py,
the careful relabeler plus a trajectory judge that turns down about a third, as in
prefect_overhead.py) sleeps `--latency` seconds in every answer. By default it runs in its own
process, so its request parsing does not share this process's GIL with the client;
`--in-process-server` puts it back in (as the tests do) to see what that costs.

Every concurrency runs once per `--processes` value (llm.processes: 0 = the calls run in this
process, N = in N worker processes, agenther/llm/call_pool.py); "vs 1" compares with concurrency 1 of
the first value. A pool's start (workers importing litellm) happens in the unmeasured warm-up,
as it does once per process in a real run; it is printed apart. "CPU" is this process's only.

Concurrency 1 at 200 ms takes ~50 s on all candidates; it runs on the first `--serial-subset`
candidates only (0 = all) and its records/s and calls/s are rates, so they compare directly.

Last, the token bench: relabel + verify at the highest concurrency with compaction effectively
off (`llm.context_tokens` huge) against the compacted run above; prompt tokens are the server's
count (prompt chars / 4), divided by the samples the judges accepted.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted LLM server the tests use

import argparse  # noqa: E402
import heapq  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from http.server import ThreadingHTTPServer  # noqa: E402

import polars as pl  # noqa: E402
from llm_server import FakeLLMServer, Reply, picky_brain, slow  # noqa: E402

from agenther.llm import LLMs  # noqa: E402
from agenther.params import Params, load_params  # noqa: E402
from agenther.runner import run_stage, run_stages  # noqa: E402
from agenther.stages import relabel as relabel_module  # noqa: E402
from agenther.stages import verify as verify_module  # noqa: E402
from agenther.workdir import TABLES  # noqa: E402

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
LATENCY = {"s": 0.2}


def brain(request: dict) -> Reply:
    return slow(picky_brain, LATENCY["s"])(request)  # every answer after the provider's latency


def _serve(conn, latency: float, answer=brain) -> None:  # the server process
    LATENCY["s"] = latency
    with FakeLLMServer(answer) as server:
        conn.send(server.api_base)
        conn.recv()  # until told to stop
        conn.send(len(server.requests))


@contextmanager
def llm_server(latency: float, in_process: bool, answer=brain):
    """The scripted server's api_base; `answer(request)` gives each Reply (delayed by `latency`)."""
    # socketserver listens with a backlog of 5: at 64-128 simultaneous connects (the test
    # server answers HTTP/1.0, one connection per call) the kernel drops SYNs and the client
    # retries them after 1 s. A real endpoint has a deep backlog; so does this one.
    ThreadingHTTPServer.request_queue_size = 1024
    if in_process:
        LATENCY["s"] = latency
        with FakeLLMServer(answer) as server:
            yield server.api_base
        return
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_serve, args=(child, latency, answer), daemon=True)
    proc.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        parent.recv()
        proc.join(10)


def params_for(api_base: str, cache: Path, concurrency: int, context_tokens: int | None = None,
               processes: int = 0) -> Params:
    llm = {"model": "openai/local", "api_base": api_base, "cache_dir": str(cache), "concurrency": concurrency,
           "processes": processes}
    if context_tokens:
        llm["context_tokens"] = context_tokens
    return load_params(ROOT / "params.yaml", {"ingest": {"input": str(TAU), "format": "tau-bench"}, "llm": llm})


# Time spent inside relabel(), verify() and relabel_verify() themselves (the LLM work), apart
# from the stage's table I/O, Great Expectations gates and stamps around them.
INNER: dict[str, float] = {}


def _timed_inner(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            INNER[name] = INNER.get(name, 0.0) + time.perf_counter() - start
    return wrapper


relabel_module.relabel = _timed_inner("relabel", relabel_module.relabel)
verify_module.verify = _timed_inner("verify", verify_module.verify)
verify_module.relabel_verify = _timed_inner("relabel_verify", verify_module.relabel_verify)
MODES = ("staged", "fused", "warm", "warm-cache")


def relabel_verify(params: Params, base: Path, work: Path, subset: int | None, mode: str) -> dict:
    """Relabel + verify on a copy of the extracted tables; returns time, counts and usage.
    staged: stage_relabel then stage_verify (a barrier between them, as `agenther stage` runs
    them); fused: run_stages(fuse=True) (what `agenther run` runs); warm: fused again on the same
    work folder (stages skipped by their stamps); warm-cache: the same without the stamps, so
    every answer is read from the LLM cache and the tables, gates and stamps are redone."""
    if not work.exists():
        shutil.copytree(base, work)
        if subset:
            path = work / TABLES["extracted"]
            pl.read_parquet(path).head(subset).write_parquet(path)
    if mode == "warm-cache":
        shutil.rmtree(work / "stamps", ignore_errors=True)
    INNER.clear()
    with LLMs.from_params(params) as llms:
        start, cpu = time.perf_counter(), time.process_time()
        if mode == "staged":
            run_stage("relabel", params, work, work, llms)
            stats = run_stage("verify", params, work, work, llms)
        else:
            stats = run_stages(("relabel", "verify"), params, work, work, llms, fuse=True)["verify"]
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        usage = llms.usage()
    verified = pl.read_parquet(work / TABLES["verified"])
    # Each record's chain of sequential calls: relabel attempts, then the LLM judges it reached.
    relabeled = pl.read_parquet(work / TABLES["relabeled"])
    attempts = dict(zip(relabeled["id"].to_list(), relabeled["relabel_attempts"].to_list(), strict=True))
    ids = pl.read_parquet(work / TABLES["extracted"])["id"].to_list()
    judged = {i: sum(j["judge"] != "grounding" for j in js)
              for i, js in zip(verified["id"].to_list(), verified["judgements"].to_list(), strict=True)}
    relabel_chain = [attempts.get(i, params.relabel.max_attempts) for i in ids]
    verify_chain = [judged.get(i, 0) for i in ids]
    return {"seconds": seconds, "inner": sum(INNER.values()), "records": len(ids),
            "relabeled": stats["in"], "accepted": int(verified["verified"].sum()) if verified.height else 0,
            "calls": sum(u.calls for u in usage.values()), "hits": sum(u.cache_hits for u in usage.values()),
            "prompt_tokens": sum(u.prompt_tokens for u in usage.values()),
            "calls_by_stage": {s: u.calls for s, u in usage.items()}, "cpu": cpu,
            "chains": (relabel_chain, verify_chain)}


def makespan(chains: list[int], workers: int, latency: float) -> float:
    """A thread pool's wall time when record i needs chains[i] sequential calls and nothing
    else costs time (ThreadPoolExecutor.map: records start in order as workers free up)."""
    free = [0.0] * min(workers, max(len(chains), 1))
    for n in chains:
        heapq.heappush(free, heapq.heappop(free) + n * latency)
    return max(free)


def makespan_slots(chains: list[int], slots: int, workers: int, latency: float) -> float:
    """The same when `workers` threads take records in order but at most `slots` calls are open
    at once (the in-flight limit; waiting calls get a slot first come, first served)."""
    pending, active, rounds = list(chains), [], 0
    while pending or active:
        while len(active) < workers and pending:
            active.append([pending.pop(0), rounds])  # [calls left, waiting since]
        active.sort(key=lambda a: a[1])
        for a in active[:slots]:
            a[0], a[1] = a[0] - 1, rounds + 1
        active = [a for a in active if a[0] > 0]
        rounds += 1
    return rounds * latency


def ideal(r: dict, concurrency: int, latency: float, fused: bool = True) -> float:
    relabel, verify = r["chains"]
    if fused:  # one map: each record's relabel attempts, then its judges; 2 records per request slot
        chains = [a + b for a, b in zip(relabel, verify, strict=True)]
        return makespan_slots(chains, concurrency, 2 * concurrency if concurrency > 1 else 1, latency)
    # staged: relabel must finish before verify starts (a stage barrier)
    return makespan(relabel, concurrency, latency) + makespan([n for n in verify if n], concurrency, latency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 128])
    parser.add_argument("--processes", type=int, nargs="+", default=[0, 2],
                        help="llm.processes values to run every concurrency with")
    parser.add_argument("--serial-subset", type=int, default=24,
                        help="concurrency 1 runs on the first N extracted candidates (0 = all)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server sleeps per answer")
    parser.add_argument("--in-process-server", action="store_true")
    parser.add_argument("--no-staged", action="store_true", help="skip the staged (barrier) runs")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="agenther-bench-llm-"))
    rows = []
    try:
        with llm_server(args.latency, args.in_process_server) as api_base:
            base = tmp / "base"
            params = params_for(api_base, tmp / "cache-base", 1)
            with LLMs.from_params(params) as llms:
                for name in ("ingest", "classify", "extract"):
                    run_stage(name, params, base, base, llms)
            n = pl.read_parquet(base / TABLES["extracted"]).height
            failures = int(pl.read_parquet(base / TABLES["classified"])["is_failure"].sum())
            print(f"{failures} failures, {n} relabel candidates after extract; "
                  f"server latency {args.latency * 1000:.0f} ms, "
                  f"{'in-process' if args.in_process_server else 'separate-process'} server", flush=True)
            for procs in args.processes:
                # An unmeasured warm-up: litellm's first call pays imports and client set-up, and
                # with processes > 0 it starts the pool (its workers import litellm).
                started = time.perf_counter()
                relabel_verify(params_for(api_base, tmp / f"cache-warmup-{procs}", 8, processes=procs), base,
                               tmp / f"warmup-{procs}", 4, "fused")
                print(f"processes {procs}: warm-up (4 records{', pool start' if procs else ''}) "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
                for c in args.concurrency:
                    subset = args.serial_subset if c == 1 and args.serial_subset else None
                    row = {"c": c, "p": procs}
                    if not args.no_staged:
                        row["staged"] = relabel_verify(params_for(api_base, tmp / f"cache-s{c}-{procs}", c,
                                                                  processes=procs), base,
                                                       tmp / f"work-s{c}-{procs}", subset, "staged")
                    params = params_for(api_base, tmp / f"cache-{c}-{procs}", c, processes=procs)
                    for mode in ("fused", "warm", "warm-cache"):  # the same cache and work folder
                        row[mode] = relabel_verify(params, base, tmp / f"work-{c}-{procs}", subset, mode)
                    rows.append(row)
                    cold, warm, cached = row["fused"], row["warm"], row["warm-cache"]
                    staged = f"staged {row['staged']['seconds']:6.2f} s, " if "staged" in row else ""
                    print(f"processes {procs}, concurrency {c:4d}: {cold['records']:3d} records, {cold['calls']:3d} "
                          f"calls; {staged}fused {cold['seconds']:6.2f} s (relabel_verify() {cold['inner']:5.2f} s, "
                          f"CPU {cold['cpu']:5.2f} s); warm rerun {warm['seconds']:5.3f} s ({warm['calls']} calls, "
                          f"{warm['hits']} hits), from the LLM cache {cached['seconds']:5.2f} s ({cached['calls']} "
                          f"calls, {cached['hits']} hits)", flush=True)

            top = max(args.concurrency)
            whole = relabel_verify(params_for(api_base, tmp / "cache-whole", top, context_tokens=10**7), base,
                                   tmp / "work-whole", None, "fused")
            compact = next(r["fused"] for r in rows if r["c"] == top and r["p"] == args.processes[0])
            if compact["records"] != n:  # the top concurrency ran a subset: run the compacted side in full
                compact = relabel_verify(params_for(api_base, tmp / "cache-compact", top), base, tmp / "work-compact",
                                         None, "fused")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rate(r: dict, what: str = "records", inner: bool = False) -> float:
        return r[what] / (r["inner"] if inner else r["seconds"])

    one = rows[0]
    print(f"\nrelabel + verify, tau-bench ({n} candidates), {args.latency * 1000:.0f} ms per call, fresh cache each; "
          "vs 1: against the same path at concurrency 1")
    print("| processes | concurrency | records | calls | staged | fused | fused: relabel_verify() | CPU (fused) | ideal staged "
          "| ideal fused | records/s (fused) | vs 1 (records/s) | vs 1 (calls/s) | vs 1 (inner) | vs 1 staged "
          "| warm rerun | warm / cold | from LLM cache | cache / cold |")
    print("| --- " * 19 + "|")
    for row in rows:
        c, cold, warm, cached = row["c"], row["fused"], row["warm"], row["warm-cache"]
        st = row.get("staged")
        staged_t = f"{st['seconds']:.2f} s" if st else "-"
        staged_x = f"{rate(st) / rate(one['staged']):.1f}x" if st else "-"
        print(f"| {row['p']} | {c} | {cold['records']} | {cold['calls']} | {staged_t} | {cold['seconds']:.2f} s | {cold['inner']:.2f} s "
              f"| {cold['cpu']:.2f} s | {ideal(cold, c, args.latency, fused=False):.2f} s "
              f"| {ideal(cold, c, args.latency):.2f} s | {rate(cold):.2f} "
              f"| {rate(cold) / rate(one['fused']):.1f}x | {rate(cold, 'calls') / rate(one['fused'], 'calls'):.1f}x "
              f"| {rate(cold, inner=True) / rate(one['fused'], inner=True):.1f}x | {staged_x} "
              f"| {warm['seconds'] * 1000:.0f} ms ({warm['calls']} calls) | {warm['seconds'] / cold['seconds'] * 100:.1f}% "
              f"| {cached['seconds']:.2f} s ({cached['calls']} calls) | {cached['seconds'] / cold['seconds'] * 100:.0f}% |")
    c1 = one["fused"]
    print("\nideal: latency x the thread pool's makespan over each record's chain of sequential calls "
          "(relabel attempts, then judges); staged: relabel and verify one after the other; no CPU cost.")
    print(f"client CPU per call at concurrency 1: {c1['cpu'] / max(c1['calls'], 1) * 1000:.1f} ms; "
          f"wall per call: {c1['seconds'] / max(c1['calls'], 1) * 1000:.0f} ms")
    chains = compact["chains"]
    bound = ideal(compact, 10**6, args.latency)
    print(f"longest chains: relabel {max(chains[0])} calls, verify {max(chains[1])} calls; "
          f"unlimited workers: {bound:.2f} s for all {compact['records']} candidates"
          + (f" = {compact['records'] / bound:.0f} records/s at most" if bound else ""))
    print("\n| prompts | context_tokens | prompt tokens (relabel+verify) | calls | accepted | tokens / accepted sample |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r, ctx in (("compacted", compact, "2048 (params.yaml)"), ("whole trajectory", whole, "10^7")):
        per = r["prompt_tokens"] / r["accepted"] if r["accepted"] else float("nan")
        print(f"| {label} | {ctx} | {r['prompt_tokens']} | {r['calls']} | {r['accepted']} | {per:.0f} |")


if __name__ == "__main__":
    main()
