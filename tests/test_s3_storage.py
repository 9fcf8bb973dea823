"""Shared storage on S3 against a real SeaweedFS: the LLM response cache on s3://bucket/prefix
(from a real `agenther run`, in a subprocess, against the scripted LLM server) and ingest from
s3:// objects and prefixes (the same tables as from the same files on disk)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, TAU, TOOLBENCH, ingest, list_keys, write_params

from agenther.cli import main
from agenther.devtools.seaweedfs import SeaweedFS
from agenther.llm import cache
from agenther.params import load_params
from agenther.s3 import s3_client
from agenther.stages.ingest import IngestError
from agenther.workdir import logs_digest

pytestmark = pytest.mark.slow  # a real SeaweedFS

WEBSHOP = ROOT / "tests/fixtures/react_webshop.jsonl"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with SeaweedFS(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3_env(store, monkeypatch) -> dict[str, str]:
    """The store's settings in the environment, where agenther.s3 reads them (as a user sets them)."""
    env = {"AGENTHER_S3_ENDPOINT": store.endpoint, "AWS_ACCESS_KEY_ID": store.access_key,
           "AWS_SECRET_ACCESS_KEY": store.secret_key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def upload(store: SeaweedFS, local: Path, url: str) -> None:
    """Every file under `local` (or the file itself) to s3://bucket/prefix/<relative path>."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = s3_client(store.settings())
    if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=bucket)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        name = f.name if f == local else f.relative_to(local).as_posix()
        client.upload_file(str(f), bucket, f"{prefix.rstrip('/')}/{name}" if prefix else name)


# -- the LLM cache ----------------------------------------------------------------------------------
def agenther_run(params: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`agenther run -v` in a process of its own, as a user runs it (its stdout and stderr kept)."""
    return subprocess.run([sys.executable, "-m", "agenther.cli", "run", "--params", str(params), "--out", str(out),
                           "-v"], cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)


def test_llm_cache_on_s3_makes_a_rerun_free_and_a_corrupt_entry_a_miss(tmp_path, store, s3_env, llm_server):
    url = "s3://llm-cache/runs/shared"  # the bucket does not exist yet: the first put creates it
    params = write_params(tmp_path / "params.yaml", llm_server, ingest={"input": str(TAU), "limit": 16},
                          llm={"cache_dir": url, "concurrency": 4})
    first = agenther_run(params, tmp_path / "a", s3_env)
    assert first.returncode == 0, first.stderr[-3000:]
    calls = len(llm_server.requests)
    assert calls > 0
    keys = list_keys(url, store.settings())
    assert len(keys) == calls  # one entry per call: the scripted answers differ per request
    assert all(k.startswith("runs/shared/") and k.endswith(".json") and k.split("/")[2] == k.split("/")[3][:2]
               for k in keys), keys[:3]
    assert not (ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()  # never a local folder named like the URL

    # Another work folder (no stamps to skip on): every answer comes from the store.
    second = agenther_run(params, tmp_path / "b", s3_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(llm_server.requests) == calls
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["llm"]["total"]["calls"] == 0 and summary["llm"]["total"]["cache_hits"] == calls
    exported = json.loads((tmp_path / "a" / "summary.json").read_text())["exports"]["files"]
    assert exported
    for name in (*exported, "04_verified.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    # A corrupt entry (truncated by hand) is a miss: that one request is asked again, and rewritten.
    client = s3_client(store.settings())
    bucket, victim = "llm-cache", keys[len(keys) // 2]
    good = client.get_object(Bucket=bucket, Key=victim)["Body"].read()
    client.put_object(Bucket=bucket, Key=victim, Body=good[: len(good) // 2])
    third = agenther_run(params, tmp_path / "c", s3_env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(llm_server.requests) == calls + 1
    assert f"corrupt LLM cache entry {Path(victim).name}" in third.stderr
    assert client.get_object(Bucket=bucket, Key=victim)["Body"].read() == good
    for name in exported:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name

    # The keys are in the environment only: not in what the runs printed or wrote.
    secrets = (store.access_key, store.secret_key)
    for run in (first, second, third):
        for text in (run.stdout, run.stderr):
            assert not any(s in text for s in secrets)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path


def _share(url: str, env: dict[str, str], keys: list[str]) -> list[bool]:
    """In a fresh process: write every key (each writer the same answers), then read them all back."""
    os.environ.update(env)
    for key in keys:
        cache.put(url, key, {"raw": f"answer {key[:8]}", "prompt_tokens": 3, "completion_tokens": 5})
    return [cache.get(url, key) == {"raw": f"answer {key[:8]}", "prompt_tokens": 3, "completion_tokens": 5}
            for key in keys]


def test_the_s3_cache_is_shared_by_many_processes(store, s3_env):
    url = "s3://llm-cache/many"
    keys = [cache.request_key({"n": i}) for i in range(24)]
    assert all(cache.get(url, key) is None for key in keys)  # misses, not errors
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_share, [url] * 4, [s3_env] * 4, [keys[i:] + keys[:i] for i in range(0, 24, 6)]))
    assert all(all(r) for r in results)
    assert len(list_keys(url, store.settings())) == len(keys)
    assert all(cache.get(url, key)["raw"] == f"answer {key[:8]}" for key in keys)


def test_an_s3_cache_the_keys_may_not_write_stops_with_one_line(store, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret_key[::-1])
    with pytest.raises(cache.CacheError) as refused:
        cache.put("s3://llm-cache/refused", cache.request_key({"x": 1}), {"raw": "{}"})
    message = str(refused.value)
    assert message.startswith("LLM cache s3://llm-cache/refused: cannot write") and "check AWS_ACCESS_KEY_ID" in message
    assert store.secret_key[::-1] not in message and store.access_key not in message
    assert not refused.value.transient


# -- logs on S3 -------------------------------------------------------------------------------------
def same_tables(local: Path, url: str, fmt: str = "auto", limit: int | None = None) -> int:
    """Ingest `local` and `url`; assert the tables equal, source_file apart (the URL of the same
    file); returns the trajectories."""
    on_disk, on_s3 = ingest(local, fmt, limit=limit), ingest(url, fmt, limit=limit)  # type: ignore[arg-type]
    prefix = str(local) if local.is_file() else f"{local}/"
    target = url if local.is_file() else f"{url.rstrip('/')}/"
    for name in ("trajectories", "quarantine"):
        mine, theirs = getattr(on_disk, name), getattr(on_s3, name)
        assert mine.height == theirs.height, name
        if mine.height:
            expected = mine.with_columns(pl.col("source_file").str.replace(prefix, target, literal=True))
            assert theirs["source_file"].str.starts_with("s3://").all()
            assert theirs.equals(expected), name
    assert on_disk.records_in == on_s3.records_in
    assert {k: v for k, v in on_disk.stats.items() if k != "seconds"} == {
        k: v for k, v in on_s3.stats.items() if k != "seconds"}
    return on_disk.trajectories.height


def test_ingest_from_an_s3_prefix_equals_ingest_from_the_same_files_on_disk(tmp_path, store, s3_env):
    # ToolBench: nested folders (ids use the folder name), one record per JSON file.
    upload(store, TOOLBENCH, "s3://logs/toolbench/answer")
    assert same_tables(TOOLBENCH, "s3://logs/toolbench/answer/") > 10
    assert same_tables(TOOLBENCH, "s3://logs/toolbench/answer") > 10  # no trailing slash: the same folder

    # Chat logs as JSONL, one line broken and one not UTF-8, plus a file that is not a log.
    chats = tmp_path / "chats"
    (chats / "day2").mkdir(parents=True)
    shutil.copy(WEBSHOP, chats / "day1.jsonl")
    lines = WEBSHOP.read_bytes().splitlines(keepends=True)
    (chats / "day2" / "more.jsonl").write_bytes(lines[0].replace(b'"webshop-', b'"again-') + b'{"id": "broken", \n'
                                                + b"\xff\xfe not utf-8\n" + lines[1])
    (chats / "notes.txt").write_text("not read")
    upload(store, chats, "s3://logs/chats")
    assert same_tables(chats, "s3://logs/chats", "messages") >= 6
    quarantined = ingest("s3://logs/chats", "messages").quarantine  # type: ignore[arg-type]
    assert sorted(quarantined["source_file"]) == ["s3://logs/chats/day2/more.jsonl"] * 2
    assert sorted(quarantined["record_pointer"]) == ["line 2", "line 3"]

    # One object named directly (a JSON array, read whole as a local file is), with a limit.
    upload(store, TAU, "s3://logs/tau")
    assert same_tables(TAU, f"s3://logs/tau/{TAU.name}", limit=30) == 30


def test_s3_input_digest_follows_etags_and_errors_name_the_url(tmp_path, store, s3_env):
    chats = tmp_path / "chats"
    chats.mkdir()
    shutil.copy(WEBSHOP, chats / "a.jsonl")
    upload(store, chats, "s3://digests/in")
    params = load_params(None, {"ingest": {"input": "s3://digests/in/"}})
    before = logs_digest(params)
    assert logs_digest(params) == before  # listing again, nothing changed
    lines = WEBSHOP.read_bytes().splitlines(keepends=True)
    s3_client(store.settings()).put_object(Bucket="digests", Key="in/a.jsonl", Body=b"".join(lines[:2]))
    changed = logs_digest(params)
    assert changed != before
    s3_client(store.settings()).put_object(Bucket="digests", Key="in/b.jsonl", Body=lines[2])
    assert logs_digest(params) not in (before, changed)  # a new object is a new input

    with pytest.raises(IngestError, match=r"input not found: s3://digests/nothing-here"):
        ingest("s3://digests/nothing-here")  # type: ignore[arg-type]
    with pytest.raises(IngestError, match=r"s3://no-such-bucket/x: cannot list \(NoSuchBucket\)"):
        ingest("s3://no-such-bucket/x")  # type: ignore[arg-type]
    with pytest.raises(IngestError, match="must not carry credentials") as leaked:
        ingest("s3://AKIDLEAK:wJalrSECRET@digests/in")  # type: ignore[arg-type]
    assert "wJalrSECRET" not in str(leaked.value)


# -- rounds over logs that land in a bucket -----------------------------------------------------------
def test_rounds_over_an_s3_prefix_read_only_the_objects_that_landed_since(tmp_path, store, s3_env, llm_server,
                                                                          capsys):
    """`agenther round --input s3://…/` twice: the second round reads the new object only (an object is its
    URL, its version its ETag and size), and the unchanged prefix a third time makes no round."""
    records = json.loads(TAU.read_text())
    days = tmp_path / "days"
    days.mkdir()
    for name, part in (("day1.json", records[:12]), ("day2.json", records[50:62])):
        (days / name).write_text(json.dumps(part))
    params = write_params(tmp_path / "params.yaml", llm_server, cache=tmp_path / "cache")
    root = tmp_path / "rounds"

    def round_() -> tuple[int, dict]:
        capsys.readouterr()
        code = main(["round", "--input", "s3://landing/airline/", "--root", str(root), "--params", str(params)])
        printed = capsys.readouterr()
        return code, json.loads(printed.out) if printed.out.strip() else {"said": printed.err}

    upload(store, days / "day1.json", "s3://landing/airline")
    code, first = round_()
    assert code == 0, first
    assert (first["round"], first["records_read"], first["new_trajectories"]) == (1, 12, 12)
    calls = len(llm_server.requests)

    upload(store, days / "day2.json", "s3://landing/airline")
    code, second = round_()
    assert code == 0, second
    assert (second["round"], second["records_read"], second["new_trajectories"], second["skipped_seen"]) == (2, 12, 12, 0)
    manifest = json.loads((Path(second["folder"]) / "manifest.json").read_text())
    assert list(manifest["rounds"][1]["files"]) == ["s3://landing/airline/day2.json"]
    assert manifest["rounds"][1]["files"]["s3://landing/airline/day2.json"].startswith("etag ")
    assert len(llm_server.requests) > calls
    published = pl.read_parquet(Path(second["folder"]) / "published" / "01_classified.parquet")
    assert published.height == 24 and all(s.startswith("s3://landing/airline/") for s in published["source_file"])

    calls = len(llm_server.requests)
    code, third = round_()
    assert code == 0 and third.get("round") is None, third
    assert len(llm_server.requests) == calls
