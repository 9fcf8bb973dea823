"""sha256 of every output of the three entry points, to prove that a restructure changed no byte.

    .venv/bin/python bench/output_digests.py --json /work/digests-before.json [--code DIR] [--code DIR2]
    .venv/bin/python bench/output_digests.py --compare A.json B.json

Runs, for each code tree (`--code`, default this one; repeat it to compare trees in one invocation),
on the shipped tau-bench (200 records) and ToolBench (15) logs, only through public entry points
in subprocesses (cwd and PYTHONPATH = the tree, the venv's `agenther` console script):
  run      agenther run --params P --out OUT --model openai/local --api-base URL
  stage    agenther stage NAME --params P --work WORK --out OUT, the six stages of dvc.yaml in order
  prefect  python -m flows.hindsight --params P --out OUT --model ... --api-base ...
           (a fresh PREFECT_HOME per run, Prefect's temporary local API)
P is the tree's params.yaml with ingest.input (relative to the tree), the model, a fresh LLM cache
per run and short retries set. Every answer comes from the scripted server of tests/llm_server.py:
careful_brain, with the trajectory judge turning down about a third (crc32 of the prompt, as in
bench/llm_throughput.py). Its URL is in params_hash, hence in every sample's lineage: it listens on
a fixed port (`--port`), so only runs with the same port compare.

Digests (relative paths, out/... and work/...): the bytes of every file; Parquet also its content
(polars read, write_ndjson: row groups and metadata aside); JSON also a normalised form, without the
VOLATILE keys (each file lists those it had) and with the run's folder written "$DIR" in absolute
paths; report.html also with the stages' wall times (charted) zeroed. No file is left out. JSON and
HTML files are compared by their normalised digest, any other by its bytes.
The printout ends with the files that differ between the entry points of a tree (stage and prefect
against run; by design, stage's NN_<stage>.json add budget_carried_in, the flow writes no stamps and
its Parquet tables are written batch by batch: "content the same") and between trees (each against
the first).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from llm_server import FakeLLMServer, picky_brain  # noqa: E402

DATASETS = {"tau-bench": "data/raw/tau-bench/gpt-4o-airline.json", "toolbench": "data/raw/toolbench/answer"}
STAGES = ("ingest", "classify", "extract", "relabel", "verify", "package")
ENTRIES = ("run", "stage", "prefect")
PACKAGES = ("agenther", "flows", "tasks")
MODEL = "openai/local"
# JSON keys (dotted paths, [] = any list element) that say how or where a run went, not what it made.
# The stages' wall times (stats, stamps, report.html) are left out; absolute paths (gates' results_file and source, the package
# stamp's out) are kept with the run's out/ or work/ folder written "$DIR".
VOLATILE = {
    "stamp.code": "sha256 of the agenther source tree: differs between code trees by design",
    "stamp.params": "sha256 of all params, llm.cache_dir (an absolute temp path) included",
    "seconds": "a stage's wall time (NN_<stage>.json)",
    "stats.seconds": "a stage's wall time, as its stamp keeps its stats",
}
# report.html charts each stage's wall time: its normalised digest has those numbers zeroed, and the
# charts' dataset names (digests of their data) written "data-*".
SECONDS = re.compile(rb'("seconds":\s*)-?[0-9][0-9.eE+-]*')
DATASET = re.compile(rb'data-[0-9a-f]{32}')


brain = picky_brain  # careful_brain; the trajectory judge turns down about a third


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalise(value, run_dir: str, removed: set[str], where: str = ""):
    if isinstance(value, dict):
        removed.update(f"{where}{k}" for k in value if f"{where}{k}" in VOLATILE)
        return {k: normalise(v, run_dir, removed, f"{where}{k}.") for k, v in value.items()
                if f"{where}{k}" not in VOLATILE}
    if isinstance(value, list):
        return [normalise(v, run_dir, removed, f"{where}[].") for v in value]
    if isinstance(value, str):
        return value.replace(f"{run_dir}/out", "$DIR").replace(f"{run_dir}/work", "$DIR")
    return value


def digest(path: Path, run_dir: str) -> dict:
    data = path.read_bytes()
    d = {"bytes": sha(data)}
    if path.suffix == ".parquet":
        buf = io.BytesIO()
        pl.read_parquet(path).write_ndjson(buf)
        d["content"] = sha(buf.getvalue())
    elif path.suffix == ".json":
        removed: set[str] = set()
        d["normalised"] = sha(json.dumps(normalise(json.loads(data), run_dir, removed), sort_keys=True).encode())
        d["removed"] = sorted(removed)
        d["paths"] = run_dir.encode() in data  # absolute paths written "$DIR"
    elif path.suffix == ".html":
        d["normalised"] = sha(DATASET.sub(b"data-*", SECONDS.sub(rb"\g<1>0", data)))
        d["removed"] = ["seconds"] if SECONDS.search(data) else []
    return d


def verdict(d: dict) -> str:
    return d.get("normalised", d["bytes"])


def commands(entry: str, run_dir: Path, api_base: str) -> list[list[str]]:
    p, out, work = str(run_dir / "params.yaml"), str(run_dir / "out"), str(run_dir / "work")
    llm = ["--model", MODEL, "--api-base", api_base]
    agenther = str(Path(sys.executable).with_name("agenther"))
    if entry == "run":
        return [[agenther, "run", "--params", p, "--out", out, *llm]]
    if entry == "stage":
        return [[agenther, "stage", s, "--params", p, "--work", work, "--out", out] for s in STAGES]
    return [[sys.executable, "-m", "flows.hindsight", "--params", p, "--out", out, *llm]]


def environment(code: Path, run_dir: Path) -> dict:
    home = run_dir / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PYTHONPATH": str(code), "DO_NOT_TRACK": "1", "PREFECT_HOME": str(home),
                  "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "storage"),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_TO_API_ENABLED": "false",
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}


def run_entry(code: Path, dataset: str, entry: str, run_dir: Path, api_base: str) -> dict:
    run_dir.mkdir(parents=True)
    params = yaml.safe_load((code / "params.yaml").read_text())
    params["ingest"]["input"] = DATASETS[dataset]
    params["llm"] |= {"model": MODEL, "api_base": api_base, "cache_dir": str(run_dir / "cache"),
                      "max_retries": 2, "timeout_s": 20}
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    env, start, error = environment(code, run_dir), time.perf_counter(), None
    for cmd in commands(entry, run_dir, api_base):
        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        if done.returncode:  # recorded; what was written is still digested
            error = f"{Path(cmd[0]).name} {cmd[1]} exited {done.returncode}"
            print(f"{dataset}/{entry}: {error}\n{done.stderr[-3000:]}", file=sys.stderr)
            break
    seconds = round(time.perf_counter() - start, 1)
    files = {f"{path.relative_to(run_dir)}": digest(path, str(run_dir))
             for folder in ("out", "work") for path in sorted((run_dir / folder).rglob("*")) if path.is_file()}
    return {"seconds": seconds, "error": error, "files": files}


def revision(code: Path) -> str:
    git = ["git", "-C", str(code)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return (head or "not a git tree") + (" + uncommitted changes" if dirty.stdout.strip() else "")


def digest_tree(code: Path, port: int, tmp: Path) -> dict:
    # The venv's editable install maps agenther, flows and tasks to one checkout: PYTHONPATH must win.
    probe = f"import importlib.util as u\nfor m in {PACKAGES!r}:\n    s = u.find_spec(m)\n    print(m, s and s.origin)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=code, env=os.environ | {"PYTHONPATH": str(code)},
                           capture_output=True, text=True).stdout.splitlines()
    for name, _, origin in (line.partition(" ") for line in found):
        if origin.startswith(f"{code}/"):
            continue
        if (code / name).exists():
            sys.exit(f"{code} has a {name}/, yet it is imported from {origin}")
        print(f"WARNING: {code} has no {name}/: `import {name}` gets {origin}", file=sys.stderr)
    tree = {"code": str(code), "revision": revision(code), "runs": {}}
    print(f"\n## {code} ({tree['revision']})", flush=True)
    for dataset in DATASETS:
        for entry in ENTRIES:
            run = f"{dataset}/{entry}"
            r = tree["runs"][run] = run_entry(code, dataset, entry, tmp / run, f"http://127.0.0.1:{port}/v1")
            print(f"\n# {run}: {r['seconds']} s, {len(r['files'])} files" + (f", FAILED: {r['error']}" if r["error"] else ""))
            for name, d in r["files"].items():
                extra = "".join(f"  {k} {d[k]}" for k in ("content", "normalised") if k in d)
                print(f"{d['bytes']}  {name}{extra}" + (f"  (removed {', '.join(d['removed'])})" if d.get("removed") else ""))
    return tree


def differences(a: dict, b: dict) -> list[str]:
    """The files whose digests differ: JSON by the normalised digest, others by the bytes."""
    lines = [f"   {f}: only in {'the first' if f in a else 'the second'}" for f in sorted(a.keys() ^ b.keys())]
    for f in sorted(a.keys() & b.keys()):
        if verdict(a[f]) != verdict(b[f]):
            lines.append(f"   {f}: differs" + (" (content the same)" if a[f].get("content") == b[f].get("content")
                                               and "content" in a[f] else ""))
        elif a[f]["bytes"] != b[f]["bytes"] and "normalised" not in a[f]:
            lines.append(f"   {f}: bytes differ")
    return lines


def compare_trees(trees: list[dict]) -> int:
    """Each tree against the first; returns the number of differing files."""
    found = 0
    for tree in trees[1:]:
        print(f"\n== {trees[0]['code']} ({trees[0]['revision']})  vs  {tree['code']} ({tree['revision']})")
        for run in sorted(trees[0]["runs"].keys() | tree["runs"].keys()):
            a, b = trees[0]["runs"].get(run, {}).get("files", {}), tree["runs"].get(run, {}).get("files", {})
            diff = differences(a, b)
            found += len(diff)
            print(f"-- {run}: {len(a.keys() | b.keys()) - len(diff)} of {len(a.keys() | b.keys())} files identical")
            for line in diff:
                print(line)
    return found


def compare_entries(tree: dict) -> None:
    """Within one tree: stage and prefect against run (file names without out/ or work/)."""
    def strip(files: dict) -> dict:
        return {name.split("/", 1)[1]: d for name, d in files.items()}

    print(f"\n== entry points of {tree['code']}")
    for dataset in DATASETS:
        base = strip(tree["runs"][f"{dataset}/run"]["files"])
        for entry in ENTRIES[1:]:
            diff = differences(base, strip(tree["runs"][f"{dataset}/{entry}"]["files"]))
            print(f"-- {dataset}: run vs {entry}: " + (f"{len(diff)} differences" if diff else "identical"))
            for line in diff:
                print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", type=Path, help="a code tree (repeatable; default: this one)")
    parser.add_argument("--json", type=Path, help="write the digests here")
    parser.add_argument("--port", type=int, default=18740, help="the scripted LLM server's port (default 18740)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="compare two saved results instead of running anything")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (printed)")
    args = parser.parse_args()
    if args.compare:
        trees = [t for path in args.compare for t in json.loads(path.read_text())["trees"]]
        return 1 if compare_trees(trees) else 0

    ThreadingHTTPServer.request_queue_size = 1024  # a deep backlog, as a real endpoint has
    server = FakeLLMServer(brain)
    server.httpd.server_close()  # rebind on the fixed port: its URL is in params_hash
    server.httpd = type(server.httpd)(("127.0.0.1", args.port), server.httpd.RequestHandlerClass)
    server.thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    tmp, start = Path(tempfile.mkdtemp(prefix="agenther-digests-")), time.perf_counter()
    try:
        with server:
            trees = [digest_tree(code.resolve(), args.port, tmp / str(i)) for i, code in enumerate(args.code or [ROOT])]
    finally:
        if args.keep:
            print(f"runs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{time.perf_counter() - start:.0f} s in all; scripted server: {len(server.requests)} requests")
    if args.json:
        args.json.write_text(json.dumps({"volatile": VOLATILE, "port": args.port, "trees": trees}, indent=1) + "\n")
    for tree in trees:
        compare_entries(tree)
    return 1 if compare_trees(trees) or any(r["error"] for t in trees for r in t["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
