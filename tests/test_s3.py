"""agenther.s3 (and the dev tooling's SeaweedFS) against a real SeaweedFS (`weed mini`) on free loopback ports."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import list_keys

from agenther.devtools import s3_cli
from agenther.devtools.seaweedfs import SeaweedFS, free_port
from agenther.s3 import S3Settings, push_dir, s3_client, s3_settings

pytestmark = pytest.mark.slow  # each test starts a real SeaweedFS

ROOT = Path(__file__).resolve().parents[1]
# SeaweedFS's defaults: a test instance must not touch any of them (a user's S3 may be there).
DEFAULT_PORTS = {7333, 8181, 8333, 8888, 9101, 9333, 9340, 23646, 18333, 18888, 19333, 19340, 33646}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    with SeaweedFS(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def listening(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket `pid` listens on, from /proc (no ss/netstat needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                addr, port = cols[1].split(":")
                ip = "v6:" + addr if v6 else ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                found.append((ip, int(port, 16)))
    return sorted(found)


def error_code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


def test_s3_answers_only_the_right_keys(seaweed):
    assert isinstance(s3_client(seaweed.settings()).list_buckets()["Buckets"], list)
    wrong_secret = S3Settings(seaweed.endpoint, seaweed.access_key, seaweed.secret_key[::-1])
    with pytest.raises(ClientError) as bad_secret:
        s3_client(wrong_secret).list_buckets()
    assert error_code(bad_secret.value) == "SignatureDoesNotMatch"
    unknown_key = S3Settings(seaweed.endpoint, "AGTHNOSUCHKEY0000000", seaweed.secret_key)
    with pytest.raises(ClientError) as bad_key:
        s3_client(unknown_key).list_buckets()
    assert error_code(bad_key.value) == "InvalidAccessKeyId"


def test_push_dir_creates_the_bucket_and_uploads_every_file(seaweed, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "deep.parquet").write_bytes(os.urandom(300_000))
    (src / "top.jsonl").write_text('{"x": 1}\n')
    (src / "a" / "note.md").write_text("hi")
    keys = push_dir(src, "s3://pushed/run/42/", seaweed.settings())
    assert keys == ["run/42/a/b/deep.parquet", "run/42/a/note.md", "run/42/top.jsonl"]
    assert list_keys("s3://pushed/run/42", seaweed.settings()) == keys
    body = s3_client(seaweed.settings()).get_object(Bucket="pushed", Key="run/42/a/b/deep.parquet")["Body"].read()
    assert body == (src / "a" / "b" / "deep.parquet").read_bytes()
    # Bucket root, into the now existing bucket.
    assert push_dir(src / "a", "s3://pushed", seaweed.settings()) == ["b/deep.parquet", "note.md"]
    with pytest.raises(NotADirectoryError):
        push_dir(src / "top.jsonl", "s3://pushed/x", seaweed.settings())


def test_server_listens_on_loopback_only_and_on_no_default_port(seaweed, tmp_path):
    with SeaweedFS(tmp_path / "second") as second:  # a second instance beside the first: no clash
        mine, theirs = listening(seaweed.pid), listening(second.pid)
        assert mine and theirs
        assert {ip for ip, _ in mine + theirs} == {"127.0.0.1"}
        ports_a, ports_b = {p for _, p in mine}, {p for _, p in theirs}
        assert not ports_a & ports_b
        assert not (ports_a | ports_b) & DEFAULT_PORTS
        assert int(seaweed.endpoint.rsplit(":", 1)[1]) in ports_a


def test_secrets_stay_out_of_reprs_logs_and_world_readable_files(seaweed, monkeypatch):
    settings = seaweed.settings()
    for text in (repr(settings), str(settings), repr(seaweed)):
        assert seaweed.secret_key not in text and seaweed.access_key not in text
    assert "endpoint='http://127.0.0.1:" in repr(settings)
    assert seaweed.secret_key not in seaweed.log_path.read_text(errors="replace")
    identity = seaweed.data_dir / "s3.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600

    monkeypatch.delenv("AGENTHER_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    from_env = s3_settings()
    assert (from_env.endpoint, from_env.access_key, from_env.region) == ("http://127.0.0.1:8333", "AKIDEXAMPLE",
                                                                         "us-east-1")
    assert "wJalrXUtnFEMI" not in repr(from_env) and "AKIDEXAMPLE" not in repr(from_env)
    monkeypatch.setenv("AGENTHER_S3_ENDPOINT", "")  # AWS S3 itself
    assert s3_settings().endpoint is None


def test_data_survives_a_restart_on_other_ports(tmp_path):
    server = SeaweedFS(tmp_path / "s3", access_key="AGTHFIXEDKEY00000000", secret_key="s" * 40)
    with server:
        push_dir(Path(__file__).parent, "s3://keep/tests", server.settings())
        first = server.endpoint
        keys = list_keys("s3://keep/tests", server.settings())
    with SeaweedFS(tmp_path / "s3", access_key="AGTHFIXEDKEY00000000", secret_key="s" * 40) as again:
        assert again.endpoint != first
        assert list_keys("s3://keep/tests", again.settings()) == keys


def test_project_command_start_status_stop(tmp_path, monkeypatch, capsys):
    """`agenther s3 start|status|stop` (what scripts/s3.sh runs) in a DVC repo, on a free port."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([Path(sys.executable).parent / "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    (repo / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())  # the project's remote
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site"))
    port = free_port()
    args = ["--port", str(port)]
    try:
        assert s3_cli.main(["start", *args]) == 0
        state = repo / ".agenther-s3"
        creds = s3_cli.read_env_file(state / "credentials.env")
        assert stat.S_IMODE((state / "credentials.env").stat().st_mode) == 0o600
        assert creds["AGENTHER_S3_ENDPOINT"] == f"http://127.0.0.1:{port}"
        settings = S3Settings(creds["AGENTHER_S3_ENDPOINT"], creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
        assert "agenther" in [b["Name"] for b in s3_client(settings).list_buckets()["Buckets"]]
        local = (repo / ".dvc" / "config.local").read_text()
        assert creds["AWS_SECRET_ACCESS_KEY"] in local and f"127.0.0.1:{port}" in local
        assert creds["AWS_SECRET_ACCESS_KEY"] not in (repo / ".dvc" / "config").read_text()
        assert creds["AWS_SECRET_ACCESS_KEY"] not in capsys.readouterr().out
        # Both secret files are invisible to git: nothing to commit by mistake.
        ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local", ".agenther-s3/credentials.env"],
                                 cwd=repo, env=env, capture_output=True, text=True)
        assert ignored.stdout.split() == [".dvc/config.local", ".agenther-s3/credentials.env"]
        assert s3_cli.main(["start", *args]) == 0  # idempotent: same server, same keys
        assert s3_cli.read_env_file(state / "credentials.env") == creds
        assert s3_cli.main(["status", *args]) == 0
    finally:
        assert s3_cli.main(["stop", *args]) == 0
    assert s3_cli.main(["status", *args]) == 1
    assert "not running" in capsys.readouterr().out
