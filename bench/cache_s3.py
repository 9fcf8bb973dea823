"""Per-call cost of the LLM response cache: a local folder against s3://bucket/prefix on SeaweedFS.

    .venv/bin/python bench/cache_s3.py [--calls 300] [--threads 1]

Starts a SeaweedFS of its own on loopback (agenther/devtools/seaweedfs.py; keys in this process's
environment only), then times agenther.llm.cache.put (a new entry), get (a hit) and get (a miss)
for `--calls` distinct keys, each call on its own, with entries the size of a typical relabel
answer (~1.2 kB). With `--threads N`, N threads call at once (the LLM layer's concurrency) and the
per-call time is wall time / calls. Prints the median and p90 per operation and backend, in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agenther.devtools.seaweedfs import SeaweedFS  # noqa: E402
from agenther.llm import cache  # noqa: E402

ANSWER = {"raw": '{"prompt": "' + "Book flight HAT123 for 2024-05-17 in economy; " * 24 + '", "confidence": 0.9}',
          "prompt_tokens": 612, "completion_tokens": 148}


def timed(fn, keys: list[str], threads: int) -> list[float]:
    """Seconds per call: each call timed (1 thread), or wall time / calls (N threads)."""
    if threads == 1:
        out = []
        for key in keys:
            started = time.perf_counter()
            fn(key)
            out.append(time.perf_counter() - started)
        return out
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, keys))
    return [(time.perf_counter() - started) / len(keys)]


def measure(where: Path | str, calls: int, threads: int, tag: str) -> dict[str, list[float]]:
    keys = [cache.request_key({"bench": tag, "n": i}) for i in range(calls)]
    misses = [cache.request_key({"bench": tag, "miss": i}) for i in range(calls)]
    cache.put(where, cache.request_key({"warm": tag}), ANSWER)  # first use: client, bucket, folder
    cache.get(where, cache.request_key({"warm": tag}))
    return {"put": timed(lambda k: cache.put(where, k, ANSWER), keys, threads),
            "get (hit)": timed(lambda k: cache.get(where, k), keys, threads),
            "get (miss)": timed(lambda k: cache.get(where, k), misses, threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agenther-bench-cache-") as tmp, SeaweedFS(Path(tmp) / "s3") as store:
        os.environ.update({"AGENTHER_S3_ENDPOINT": store.endpoint, "AWS_ACCESS_KEY_ID": store.access_key,
                           "AWS_SECRET_ACCESS_KEY": store.secret_key})
        results = {"local folder": measure(Path(tmp) / "llm", args.calls, args.threads, "local"),
                   "s3 (SeaweedFS)": measure("s3://bench-cache/llm", args.calls, args.threads, "s3")}
    print(f"{args.calls} calls per operation, {args.threads} thread(s); ms per call")
    print(f"{'backend':16} {'operation':11} {'median':>8} {'p90':>8}")
    for backend, ops in results.items():
        for op, seconds in ops.items():
            ms = sorted(s * 1000 for s in seconds)
            p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
            print(f"{backend:16} {op:11} {statistics.median(ms):8.3f} {p90:8.3f}")


if __name__ == "__main__":
    main()
