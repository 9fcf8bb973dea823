"""Whole-process LLM throughput: `agenther run` processes against a 200 ms scripted server,
this code against another code tree (default: main at 4923a36) in the same invocation.

    .venv/bin/python bench/llm_runs.py [--sets 1 10] [--repeats 3] [--concurrency 64]
                                       [--baseline /work/wt-llm-base] [--baseline-processes 2]
                                       [--processes 0] [--latency 0.2] [--keep]

Inputs: the shipped tau-bench log (data/raw/tau-bench/gpt-4o-airline.json: 200 records, 116
failures) and a 10x set built from it (2,000 records, 1,160 failures): copy k (1..9) of every
record has every ID rewritten the same way throughout the record (user ids' digits, 6-character
reservation codes and flight numbers: letters and digits shifted by k, payment ids' digits), and
its task_id + 1000 k. The rewrite is consistent inside a record, so classify, extract, relabel
and the judges see the same shape of run and the stages find the same candidates, but no two
copies send the same request: every call is a cache miss (checked: the server counts the
requests, the run's summary its cache hits).

Each run is a fresh process, `python -m agenther.cli run --format tau-bench` (imports, all six
stages, exit) with a new output folder and a new LLM cache, `llm.concurrency` N, against the
scripted server of bench/llm_throughput.py (tests/llm_server.py's careful relabeler; the trajectory
judge turns down about a third) in its own process, every answer delayed by `--latency` s.
Measured per run: wall time; the CPU seconds of the run's process and all the processes it
waited for (its LLM worker processes: `os.wait4`'s rusage), apart from the server's; the calls the
server answered. The two code trees run alternately (A B, B A, A B, ...), `--repeats` times each;
the table has the medians. The sha256 of the run's sft.jsonl, dpo.jsonl and sharegpt.jsonl is
compared across every run of a set: same inputs, same scripted answers, so byte-identical outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted LLM server the tests use

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from http.server import ThreadingHTTPServer  # noqa: E402

import yaml  # noqa: E402
from llm_server import FakeLLMServer, Reply, picky_brain, slow  # noqa: E402

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
EXPORTS = ("sft.jsonl", "dpo.jsonl", "sharegpt.jsonl")
LATENCY = {"s": 0.2}


# -- the 10x set -----------------------------------------------------------------------------------
USER_ID = re.compile(r"\b([a-z]+_[a-z]+_)(\d{3,})\b")
CODE = re.compile(r"\b(?=[A-Z0-9]{6}\b)(?=[A-Z0-9]*\d)[A-Z0-9]*[A-Z][A-Z0-9]*\b")  # JG7FMM, HAT041
PAYMENT = re.compile(r"\b((?:credit_card|gift_card|certificate|paypal)_)(\d+)\b")


def _shift(text: str, k: int) -> str:
    out = []
    for ch in text:
        if "A" <= ch <= "Z":
            out.append(chr((ord(ch) - 65 + k) % 26 + 65))
        elif "0" <= ch <= "9":
            out.append(chr((ord(ch) - 48 + k) % 10 + 48))
        else:
            out.append(ch)
    return "".join(out)


def rewrite(text: str, k: int) -> str:
    """Copy k of a record's JSON text: every ID rewritten the same way wherever it occurs."""
    if k == 0:
        return text
    text = USER_ID.sub(lambda m: m.group(1) + _shift(m.group(2), k), text)
    text = PAYMENT.sub(lambda m: m.group(1) + _shift(m.group(2), k), text)
    return CODE.sub(lambda m: _shift(m.group(0), k), text)


def build_set(copies: int, path: Path) -> int:
    """`copies` x the shipped log (copy 0 as shipped) as one JSON array; returns the records."""
    records = json.loads(TAU.read_text())
    out = []
    for k in range(copies):
        for record in records:
            copy = json.loads(rewrite(json.dumps(record), k))
            copy["task_id"] = record["task_id"] + 1000 * k
            out.append(copy)
    path.write_text(json.dumps(out))
    return len(out)


# -- the scripted server, in its own process -----------------------------------------------------------
def brain(request: dict) -> Reply:
    return slow(picky_brain, LATENCY["s"])(request)  # every answer after the provider's latency


def _serve(conn, latency: float) -> None:
    LATENCY["s"] = latency
    server = FakeLLMServer(brain)
    try:
        with server:
            conn.send(server.api_base)
            while conn.recv() == "count":
                with server._lock:
                    conn.send((len(server.requests), len(server.errors)))
                    server.requests.clear()  # a count per run; the bodies are not needed after it
                    server.errors.clear()  # reported with the run that caused them
    finally:
        conn.send("stopped")  # also when the server's exit raised: the bench must not hang


class Server:
    def __init__(self, conn, proc):
        self.conn, self.proc = conn, proc
        self.api_base = conn.recv()

    def requests(self) -> tuple[int, int]:
        """(requests, brain errors) since the last count."""
        self.conn.send("count")
        return self.conn.recv()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def llm_server(latency: float):
    # socketserver's backlog of 5 drops SYNs at 64+ simultaneous connects (the server answers
    # HTTP/1.0: one connection per call); a real endpoint has a deep backlog, so does this one.
    ThreadingHTTPServer.request_queue_size = 1024
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, latency), daemon=True)
    proc.start()
    try:
        yield Server(parent, proc)
    finally:
        parent.send("stop")
        if parent.poll(10):
            parent.recv()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# -- one run -------------------------------------------------------------------------------------------
def run(code: Path, server: Server, log: Path, out: Path, llm: dict, extra: dict) -> dict:
    params = out.with_suffix(".yaml")
    overrides = {section: dict(values) for section, values in extra.items()}
    overrides.setdefault("llm", {}).update({"model": "openai/local", "api_base": server.api_base,
                                            "cache_dir": str(out.with_suffix(".cache")), **llm})
    params.write_text(yaml.safe_dump(overrides))
    cmd = [sys.executable, "-m", "agenther.cli", "run", "--input", str(log), "--format", "tau-bench",
           "--out", str(out), "--params", str(params)]
    env = dict(os.environ, PYTHONPATH=str(code), LITELLM_LOCAL_MODEL_COST_MAP="True")
    server.requests()  # reset the count
    server_cpu = server.cpu_s()
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    calls, errors = server.requests()
    if proc.returncode != 0 or errors:
        raise SystemExit(f"{code}: agenther run exit {proc.returncode}, {errors} server errors; "
                         f"see {out.with_suffix('.log')}")
    summary = json.loads((out / "summary.json").read_text())
    usage = _usage(summary)
    return {"wall": wall, "cpu": rusage.ru_utime + rusage.ru_stime, "server_cpu": server.cpu_s() - server_cpu,
            "calls": calls, "cache_hits": usage.get("cache_hits", 0), "client_calls": usage.get("calls", 0),
            "failures": _failures(summary), "accepted": _accepted(out),
            "digest": hashlib.sha256(b"".join((out / f).read_bytes() for f in EXPORTS if (out / f).exists()))
            .hexdigest()[:12]}


def _usage(summary: dict) -> dict:
    total: dict[str, float] = {}

    def walk(node: object) -> None:  # every stage's usage block, wherever the summary keeps it
        if isinstance(node, dict):
            if "cache_hits" in node and "calls" in node:
                for key in ("calls", "cache_hits"):
                    total[key] = total.get(key, 0) + node[key]
                return
            for value in node.values():
                walk(value)

    walk(summary.get("llm") or summary.get("stages") or summary)
    return total


def _failures(summary: dict) -> int | None:
    text = json.dumps(summary)
    found = re.search(r'"failures": (\d+)', text)
    return int(found.group(1)) if found else None


def _accepted(out: Path) -> int:
    path = out / "sft.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.open() if '"hindsight' in line)


# -- the table -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, nargs="+", default=[1, 10], help="copies of the shipped log")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--baseline", type=Path, default=Path("/work/wt-llm-base"), help="another code tree")
    parser.add_argument("--baseline-name", default="4923a36 (before)")
    parser.add_argument("--baseline-processes", type=int, default=2, help="its llm.processes")
    parser.add_argument("--processes", type=int, default=0, help="this tree's llm.processes")
    parser.add_argument("--only", choices=["baseline", "this"], help="run one side only")
    parser.add_argument("--param", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a params override for both sides (YAML value), e.g. classify.mode=llm")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    extra: dict[str, dict] = {}
    for item in args.param:
        dotted, _, value = item.partition("=")
        section, _, key = dotted.partition(".")
        extra.setdefault(section, {})[key] = yaml.safe_load(value)
    sides = [(args.baseline_name, args.baseline, args.baseline_processes), ("this tree", ROOT, args.processes)]
    if args.only:
        sides = [sides[0] if args.only == "baseline" else sides[1]]
    work = Path(tempfile.mkdtemp(prefix="agenther-llm-runs-"))
    results: dict[tuple[int, str], list[dict]] = {}
    try:
        logs = {}
        for copies in args.sets:
            logs[copies] = work / f"tau-x{copies}.json"
            n = build_set(copies, logs[copies])
            print(f"set x{copies}: {n} records", flush=True)
        with llm_server(args.latency) as server:
            for rep in range(args.repeats):
                for copies in args.sets:
                    order = sides if rep % 2 == 0 else sides[::-1]
                    for name, code, processes in order:
                        out = work / f"x{copies}-{len(results.get((copies, name), []))}-{code.name}"
                        r = run(code, server, logs[copies], out,
                                {"concurrency": args.concurrency, "processes": processes}, extra)
                        results.setdefault((copies, name), []).append(r)
                        print(f"x{copies} {name} (processes {processes}): {r['wall']:.2f} s wall, "
                              f"{r['cpu']:.2f} s CPU, {r['calls']} calls, {r['cache_hits']} cache hits, "
                              f"failures {r['failures']}, accepted {r['accepted']}, exports {r['digest']}, "
                              f"server CPU {r['server_cpu']:.2f} s", flush=True)
                        shutil.rmtree(out.with_suffix(".cache"), ignore_errors=True)
        print(f"\n`agenther run`, llm.concurrency {args.concurrency}, {args.latency * 1000:.0f} ms per answer, "
              f"medians of {args.repeats}" + (f", {' '.join(args.param)}" if args.param else ""))
        print("| set | code | llm.processes | failures | calls | wall | failures/s | CPU (all processes) | "
              "CPU per call | server CPU | exports identical |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for copies in args.sets:
            digests = {r["digest"] for name, *_ in sides for r in results[(copies, name)]}
            for name, _, processes in sides:
                runs = results[(copies, name)]
                wall = statistics.median(r["wall"] for r in runs)
                cpu = statistics.median(r["cpu"] for r in runs)
                calls = statistics.median(r["calls"] for r in runs)
                failures = runs[0]["failures"]
                per_call = statistics.median(r["cpu"] / max(1, r["calls"]) for r in runs)
                server_cpu = statistics.median(r["server_cpu"] for r in runs)
                print(f"| x{copies} | {name} | {processes} | {failures} | {calls:.0f} | {wall:.2f} s | "
                      f"{(failures or 0) / wall:.1f} | {cpu:.2f} s | {per_call * 1000:.1f} ms | {server_cpu:.2f} s | "
                      f"{'yes' if len(digests) == 1 else 'NO: ' + ', '.join(sorted(digests))} |")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
