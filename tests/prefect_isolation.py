"""A temporary Prefect of the test's own, never a user's ~/.prefect, profile or server.

`isolate()` must run BEFORE prefect is imported (prefect reads its settings at import): it points
PREFECT_HOME, the database and the result storage at a temporary folder. `start_server()` starts
`prefect server start` on a free port with its own home and database, for the deployment tests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def isolate(prefix: str, **extra: str) -> tuple[Path, dict[str, str]]:
    """(home, the settings set in os.environ) for this test process; `extra` joins the settings."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # fresh starts of 15 s seen on 2 loaded cores
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        **extra,
    }
    os.environ.update(env)
    os.environ.pop("PREFECT_API_URL", None)  # the temporary local API, never a user's server
    atexit.register(shutil.rmtree, home, True)  # registered before prefect's own exit handlers: runs after them
    return home, env


def server_env(root: Path) -> dict[str, str]:
    """This process's environment without its Prefect settings, and a server home and database under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                  "PREFECT_HOME": str(root / "server-home"),
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/server.db"}


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, logs: list[Path], every_s: float = 1.0) -> Any:
    """check()'s first true value; on a timeout the test fails with the tails of `logs`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    tails = "\n".join(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:])
                      for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


def start_server(root: Path, env: dict[str, str], port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:`port` in its own process group; (process, API URL) once it answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off"], env=env, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for("the Prefect server to answer", healthy, 120, [log])
    except BaseException:
        server.kill()
        raise
    return server, api
