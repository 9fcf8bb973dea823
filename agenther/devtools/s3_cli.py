"""`agenther s3 start|stop|status` (also `bash scripts/s3.sh ...`): the project's local S3,
a SeaweedFS on 127.0.0.1:8333 that backs DVC's default remote `store`.

State lives in `.agenther-s3/` at the repo root (ignored by git through its own .gitignore):
`credentials.env` (generated once, mode 600, `source` it for boto3/agenther), `weed.pid`,
`weed.ports.json` and `weed/` (SeaweedFS data, identity file, weed.log). `start` also writes the keys into
DVC's local config (.dvc/config.local, ignored by git) so `dvc push`/`dvc pull` just work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from agenther.devtools.seaweedfs import (
    SeaweedError,
    SeaweedFS,
    port_is_free,
    process_alive,
    random_access_key,
    random_secret_key,
    remove_grpc_sockets,
    stop_process,
)
from agenther.s3 import ensure_bucket, parse_s3_url, s3_client, s3_settings

STATE_DIR = ".agenther-s3"
DEFAULT_PORT = 8333
REMOTE = "store"  # the DVC remote this server backs (.dvc/config)
DEFAULT_BUCKET = "agenther"


def add_parser(sub: argparse._SubParsersAction) -> None:
    s3 = sub.add_parser("s3", help="start/stop/status of the local S3 (SeaweedFS) behind DVC's remote")
    _arguments(s3)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="S3 port on 127.0.0.1 (default 8333)")
    parser.add_argument("--dir", default=STATE_DIR, help="state folder, relative to the repo root")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agenther s3", description=__doc__.split("\n\n")[0])
    _arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    root = repo_root(Path.cwd())
    state = root / args.dir
    try:
        return {"start": start, "stop": stop, "status": status}[args.action](root, state, args.port)
    except SeaweedError as exc:
        print(f"agenther s3: error: {exc}", file=sys.stderr)
        return 2


def repo_root(start: Path) -> Path:
    for d in (start, *start.parents):
        if (d / ".dvc").is_dir() or (d / ".git").exists():
            return d
    return start


# -- commands ------------------------------------------------------------------------------------

def start(root: Path, state: Path, port: int) -> int:
    state.mkdir(parents=True, exist_ok=True)
    (state / ".gitignore").write_text("# agenther local S3: data and credentials, never committed\n*\n")
    creds = load_or_create_credentials(state, port)
    pid = running_pid(state)
    if pid:
        print(f"agenther s3: already running (pid {pid})")
    else:
        if not port_is_free(port):
            raise SeaweedError(f"127.0.0.1:{port} is in use (another S3 or an old server?): stop it or pass --port")
        server = SeaweedFS(state / "weed", creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"], s3_port=port)
        server.start(detach=True)  # keeps running after this command returns
        (state / "weed.pid").write_text(f"{server.pid}\n")
        (state / "weed.ports.json").write_text(json.dumps(server.ports))  # for cleaning up at stop
        pid = server.pid
    settings = s3_settings(creds)
    bucket = dvc_bucket(root)
    created = ensure_bucket(s3_client(settings), bucket)
    dvc_note = configure_dvc(root, creds, port)
    rel = os.path.relpath(state, Path.cwd())
    print(f"agenther s3: running (pid {pid}) at {settings.endpoint}, bucket s3://{bucket} "
          f"({'created' if created else 'exists'}); log {os.path.relpath(state / 'weed' / 'weed.log', Path.cwd())}")
    print(f"  {dvc_note}")
    print(f"  for boto3/agenther in this shell:  source {shlex.quote(rel)}/credentials.env")
    return 0


def stop(root: Path, state: Path, port: int) -> int:
    pid = running_pid(state)
    if pid and not stop_process(pid, timeout_s=20):
        raise SeaweedError(f"could not stop pid {pid}")
    (state / "weed.pid").unlink(missing_ok=True)  # also a stale one
    if not pid:
        print("agenther s3: not running")
        return 0
    with contextlib.suppress(OSError, ValueError):
        remove_grpc_sockets(json.loads((state / "weed.ports.json").read_text()))
    print(f"agenther s3: stopped (pid {pid}); data kept in {os.path.relpath(state, Path.cwd())}/weed")
    return 0


def status(root: Path, state: Path, port: int) -> int:
    pid = running_pid(state)
    if not pid:
        print("agenther s3: not running (bash scripts/s3.sh start)")
        return 1
    creds = read_env_file(state / "credentials.env")
    settings = s3_settings(creds)
    try:
        buckets = [b["Name"] for b in s3_client(settings, max_attempts=1).list_buckets().get("Buckets", [])]
    except Exception as exc:  # status reports, it does not fail on a flaky answer
        print(f"agenther s3: pid {pid} alive but S3 at {settings.endpoint} does not answer: {type(exc).__name__}")
        return 1
    print(f"agenther s3: running (pid {pid}) at {settings.endpoint}; buckets: {', '.join(buckets) or '(none)'}")
    return 0


# -- state ---------------------------------------------------------------------------------------

def running_pid(state: Path) -> int | None:
    """The pid in weed.pid if that process is alive AND is our weed (pids get reused)."""
    try:
        pid = int((state / "weed.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    ours = b"mini" in cmdline and f"-dir={(state / 'weed').resolve()}".encode() in cmdline
    return pid if ours and process_alive(pid) else None


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                key, _, value = line.removeprefix("export ").partition("=")
                values[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def load_or_create_credentials(state: Path, port: int) -> dict[str, str]:
    """The keys are generated once and kept; the endpoint line follows --port."""
    path = state / "credentials.env"
    creds = read_env_file(path)
    creds.setdefault("AWS_ACCESS_KEY_ID", random_access_key())
    creds.setdefault("AWS_SECRET_ACCESS_KEY", random_secret_key())
    creds["AGENTHER_S3_ENDPOINT"] = f"http://127.0.0.1:{port}"
    text = ("# agenther local S3 (SeaweedFS). Generated by `agenther s3 start`; private, never commit.\n"
            "# Use in a shell:  source .agenther-s3/credentials.env\n"
            + "".join(f"export {k}={shlex.quote(creds[k])}\n"
                      for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AGENTHER_S3_ENDPOINT")))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)
    return creds


# -- DVC -----------------------------------------------------------------------------------------

def dvc_bucket(root: Path) -> str:
    """The bucket of remote `store` if it is an s3:// URL, else the default."""
    if not (root / ".dvc").is_dir():
        return DEFAULT_BUCKET
    from dvc.config import Config

    url = Config(dvc_dir=str(root / ".dvc")).get("remote", {}).get(REMOTE, {}).get("url", "")
    return parse_s3_url(url)[0] if url.startswith("s3://") else DEFAULT_BUCKET


def configure_dvc(root: Path, creds: dict[str, str], port: int) -> str:
    """Put the keys into DVC's LOCAL config (.dvc/config.local: ignored by git), through DVC's
    Python API rather than `dvc remote modify --local` so the secret never sits in argv."""
    if not (root / ".dvc").is_dir():
        return "no DVC repo here: DVC remote not configured"
    from dvc.config import Config

    config = Config(dvc_dir=str(root / ".dvc"))
    with config.edit("local") as conf:
        remote = conf.setdefault("remote", {}).setdefault(REMOTE, {})
        remote["access_key_id"] = creds["AWS_ACCESS_KEY_ID"]
        remote["secret_access_key"] = creds["AWS_SECRET_ACCESS_KEY"]
        if port != DEFAULT_PORT:  # the committed endpointurl says :8333
            remote["endpointurl"] = creds["AGENTHER_S3_ENDPOINT"]
        else:
            remote.pop("endpointurl", None)
    local = root / ".dvc" / "config.local"
    local.chmod(0o600)
    return f"DVC remote '{REMOTE}': keys written to {os.path.relpath(local, Path.cwd())} (git-ignored)"


if __name__ == "__main__":
    sys.exit(main())
