"""The embedded llama.cpp server never outlives the process that started it.

A parent Python process starts a child the way LocalLLMServer does (agenther.llm.server.spawn_tied),
then is killed; the child must be gone within seconds. Also from a pool thread that has
exited since (the server is started lazily at the first LLM call, possibly on a worker
thread, and Linux's PR_SET_PDEATHSIG follows the forking *thread*, not the process).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import ROOT

GONE_WITHIN_S = 5.0
TIMINGS: dict[str, float] = {}
LOG_DIRS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    """Not a check: how soon each server was gone after its parent died, printed once the module is
    done (`pytest -s`); each test asserts its own bound (GONE_WITHIN_S)."""
    yield
    for name, took in TIMINGS.items():
        print(f"\n  server gone after its parent was killed: {name}: {took:.2f} s", end="")

# A parent that starts a tied child (from the main thread or a pool thread that then ends),
# prints "<child pid> <extra>" and waits to be killed.
SPAWN_STANDIN = """
import subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from agenther.llm.server import spawn_tied
start = lambda: spawn_tied(["http.server", "--bind", "127.0.0.1", "0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def start_and_wait():  # like LocalLLMServer.start(): the thread lives on while the child starts up
    proc = start()
    time.sleep(1.0)
    return proc
if sys.argv[1] == "pool":
    with ThreadPoolExecutor(1) as pool:
        proc = pool.submit(start_and_wait).result()
else:
    proc = start()
print(proc.pid, "-", flush=True)
time.sleep(120)
"""

START_SERVER = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from agenther.llm.server import LocalLLMServer
server = LocalLLMServer("smollm2-135m", n_ctx=512)
if sys.argv[1] == "pool":  # like a lazy start at the first LLM call on a worker thread
    with ThreadPoolExecutor(1) as pool:
        pool.submit(server.start).result()
else:
    server.start()
print(server.pid, server.api_base, server.log_path.parent, flush=True)
time.sleep(120)
"""

CLI_SERVER = """
import sys, time
from agenther import stopping
from agenther.llm.server import LocalLLMServer
try:  # as agenther.cli.main: a signal stops the run, the server's context exits, then the exit code
    with stopping.on_signals(), LocalLLMServer("smollm2-135m", n_ctx=512) as server:
        print(server.pid, server.log_path.parent, flush=True)
        time.sleep(120)
except stopping.Interrupted as exc:
    sys.exit(exc.exit_code)
"""


def _parent(code: str, *args: str) -> tuple[subprocess.Popen, int, str, float]:
    parent = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = parent.stdout.readline().split()
    if not line:
        parent.kill()
        pytest.fail(f"the parent printed nothing: {parent.communicate(timeout=10)[1][-3000:]}")
    pid, extra = int(line[0]), line[1]
    if len(line) > 2:  # the server's log folder: nobody is left to remove it after a SIGKILL
        LOG_DIRS.append(line[2])
    return parent, pid, extra, psutil.Process(pid).create_time()


def _alive(pid: int, created: float) -> bool:
    """Running (a zombie waiting for a reaper, or a recycled pid, counts as gone)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_after(pid: int, created: float, limit: float = GONE_WITHIN_S) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if not _alive(pid, created):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _cleanup(parent: subprocess.Popen, pid: int, created: float) -> None:
    if parent.poll() is None:
        parent.kill()
    parent.wait(timeout=10)
    if _alive(pid, created):  # the test failed: do not leave the child behind
        os.kill(pid, signal.SIGKILL)
    while LOG_DIRS:
        shutil.rmtree(LOG_DIRS.pop(), ignore_errors=True)


def _answers(api_base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_base}/models", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.parametrize(("started_on", "sig"), [("main", signal.SIGKILL), ("pool", signal.SIGKILL),
                                                 ("pool", signal.SIGTERM)])
def test_tied_child_dies_with_its_parent(started_on, sig):
    parent, pid, _, created = _parent(SPAWN_STANDIN, started_on)
    try:
        time.sleep(0.5)  # the pool thread that started it has ended by now
        assert _alive(pid, created), "the child died with the thread that started it, not with the process"
        parent.send_signal(sig)
        took = _gone_after(pid, created)
        assert took is not None, f"child {pid} still running {GONE_WITHIN_S} s after {sig.name} of its parent"
        TIMINGS[f"stand-in, started on {started_on} thread, {sig.name}"] = took
    finally:
        _cleanup(parent, pid, created)


@pytest.mark.parametrize("started_on", ["main", "pool"])
def test_real_server_dies_with_its_sigkilled_parent(started_on):
    parent, pid, api_base, created = _parent(START_SERVER, started_on)
    try:
        time.sleep(0.5)
        assert _answers(api_base)
        parent.kill()
        took = _gone_after(pid, created)
        assert took is not None, f"llama.cpp server {pid} outlived its SIGKILLed parent"
        assert not _answers(api_base)
        TIMINGS[f"llama.cpp server, started on {started_on} thread, SIGKILL"] = took
    finally:
        _cleanup(parent, pid, created)


def test_sigterm_of_the_cli_stops_the_server_cleanly():
    """`agenther run/stage` turn SIGTERM into an exit: stop() runs (the log folder is removed),
    rather than the server merely noticing that its parent is gone."""
    parent, pid, log_dir, created = _parent(CLI_SERVER)
    try:
        parent.terminate()
        assert parent.wait(timeout=20) == 128 + signal.SIGTERM
        assert not _alive(pid, created)
        assert not os.path.exists(log_dir), "stop() did not run"
    finally:
        _cleanup(parent, pid, created)
