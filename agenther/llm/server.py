"""A llama.cpp server process serving one local model (agenther/llm/models.py) over the OpenAI API.

``LocalLLMServer`` serves the verified GGUF file with ``llama_cpp.server`` so the rest of the
pipeline talks to it through litellm exactly like it would talk to a hosted model.

The server never outlives the Python process that started it, however that process ends
(see ``spawn_tied``): ``stop()`` on exit or ``__exit__``, and on SIGKILL/SIGTERM/a crash of
the parent the server notices within a fraction of a second and exits.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from agenther import stopping
from agenther.llm.models import LocalModelError, model_path

__all__ = ["LocalLLMServer", "spawn_tied"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- children that die with their parent -------------------------------------------------------
TIED = "_tied"  # the argument that marks the child side of spawn_tied: the child side of spawn_tied
PARENT_POLL_S = 0.2  # how often a tied child checks that its parent is still alive
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def spawn_tied(module_argv: list[str], **popen_kwargs) -> subprocess.Popen[bytes]:
    """Start ``python -m <module_argv>`` as a child that dies with this process.

    The child runs the module in-process (``runpy``) after two guards are armed:

    * a watchdog thread that polls ``os.getppid()`` every PARENT_POLL_S seconds and, once
      the parent is gone (SIGKILL, SIGTERM, a crash: the child is re-parented), kills the
      child's process group at once. It works on every POSIX system and does not care which
      thread of the parent started the child;
    * on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, which signals the child the moment its
      parent dies. The kernel ties it to the parent *thread* that forked, so it is armed only
      when this is the main thread (whose end is the end of the process): the server starts
      lazily at the first LLM call, which may be on a pool thread (e.g. a Prefect task), and
      that thread's exit must not kill it.

    The child gets its own session, so a Ctrl-C in the terminal reaches only the parent, which
    stops the child itself. No ``preexec_fn`` (unsafe with threads): the child arms itself.
    """
    pdeathsig = threading.current_thread() is threading.main_thread()
    root = str(Path(__file__).resolve().parents[2])  # the child runs this very copy of agenther
    cmd = [sys.executable, "-c", _TIED_BOOT, root, TIED, str(os.getpid()), "1" if pdeathsig else "0", *module_argv]
    return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


# argv: ROOT _tied PARENT_PID PDEATHSIG MODULE ARGS...; ROOT leaves sys.path before MODULE runs.
_TIED_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); import agenther.llm.server as m; "
              "sys.path.remove(sys.argv[1]); sys.exit(m.main(sys.argv[2:]))")


def _set_pdeathsig(sig: int) -> bool:
    """Linux: get `sig` when the parent thread that forked us dies. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_group() -> None:
    """Kill our whole process group (we lead it: start_new_session), so nothing is left behind."""
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    _die_with_group()


def _run_tied(parent: int, pdeathsig: bool, module_argv: list[str]) -> None:
    """The child side of spawn_tied: arm the guards, then run the module as __main__."""
    if pdeathsig:
        _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the guards were armed
        _die_with_group()
    threading.Thread(target=_watch_parent, args=(parent,), name="agenther-parent-watch", daemon=True).start()
    sys.argv = list(module_argv)
    runpy.run_module(module_argv[0], run_name="__main__", alter_sys=True)


class LocalLLMServer:
    """A llama.cpp OpenAI-compatible server on loopback, as a context manager.

    >>> with LocalLLMServer("smollm2-135m") as srv:
    ...     litellm.completion(messages=[...], **srv.completion_kwargs())

    JSON output: pass ``response_format={"type": "json_object", "schema": {...}}``; the
    server turns the schema into a grammar, so the answer is always valid JSON (it
    does not accept OpenAI's ``"json_schema"`` form).
    """

    model = "openai/local"  # litellm model name: OpenAI protocol, server alias "local"
    api_key = "x"  # the server checks none, but the OpenAI client insists on one

    def __init__(
        self,
        name: str,
        port: int | None = None,
        n_ctx: int = 4096,
        n_threads: int = 2,
        startup_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.port = port
        self._requested_port = port
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None

    @property
    def api_base(self) -> str:
        if self.port is None:
            raise LocalModelError("LocalLLMServer is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    def completion_kwargs(self) -> dict[str, str]:
        """The litellm.completion() arguments that route a call to this server."""
        return {"model": self.model, "api_base": self.api_base, "api_key": self.api_key}

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalLLMServer:
        if self._proc is not None:
            return self
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalModelError(
                "llama-cpp-python is not installed in this environment: run scripts/setup.sh"
            )
        path = model_path(self.name)  # outside the timeout: the first join can take seconds
        if self.port is None:
            self.port = _free_port()
        self._log_dir = Path(tempfile.mkdtemp(prefix="agenther-llm-"))
        self.log_path = self._log_dir / "server.log"
        cmd = [
            "llama_cpp.server",
            "--model", str(path),
            "--model_alias", "local",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            # No logits kept for every prompt token (only logprobs/echo need them, agenther uses
            # neither): prompts process 10-45% faster, and RSS no longer grows ~0.6 MB per context
            # position (1.5B: 2.1 GB instead of 3.0 GB after 25 calls). No --cache: its entries copy
            # the logits, ~300-400 MB per request.
            "--logits_all", "false",
        ]  # fmt: skip
        t0 = time.monotonic()
        with self.log_path.open("wb") as log:
            # Tied to this process: it exits when we die, even by SIGKILL (see spawn_tied).
            self._proc = spawn_tied(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        # Stop the server (gracefully, log removed) even if the caller forgets __exit__.
        atexit.register(self.stop)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop(keep_log=True)
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        url = f"{self.api_base}/models"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalModelError(
                    f"llama.cpp server for {self.name} exited with code {code} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() - t0 > self.startup_timeout:
                raise LocalModelError(
                    f"llama.cpp server for {self.name} not ready after {self.startup_timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM, then SIGKILL after 10 s (1 s when the run was told to stop: the server may
        be generating an answer no one will read). The log is kept if the server had died by itself."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        died_early = proc.poll() is not None
        if not died_early:
            proc.terminate()
            try:
                proc.wait(timeout=1 if stopping.stop_requested() else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_dir is not None and not (keep_log or died_early):
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self.log_path = None
        self._log_dir = None
        self.port = self._requested_port  # a restart picks a fresh free port

    def __repr__(self) -> str:
        state = "running" if self._proc is not None else "stopped"
        return f"LocalLLMServer({self.name!r}, port={self.port}, {state})"


def main(argv: list[str]) -> int:
    """spawn_tied's child: ``_tied PARENT_PID PDEATHSIG MODULE ARGS...``."""
    if not argv or argv[0] != TIED:
        print("agenther.llm.server is started by spawn_tied only", file=sys.stderr)
        return 2
    _run_tied(int(argv[1]), argv[2] == "1", argv[3:])
    return 0
