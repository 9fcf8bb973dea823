"""The watcher on an S3 prefix, end to end: a real SeaweedFS, a real Prefect server and
`python -m flows.serve --watch s3://...` (stopped and started again with the same state file),
with LLM answers from the scripted server. Each new or changed object must give exactly one
completed `hindsight/on-new-logs` run whose input is that object's URL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, TAU
from llm_server import FakeLLMServer, picky_brain
from prefect_isolation import server_env, start_server, wait_for
from test_prefect import _try, flow_params, free_port, stop  # also isolates this process's Prefect

from agenther.devtools.seaweedfs import SeaweedFS
from agenther.s3 import s3_client

pytestmark = pytest.mark.slow  # real servers

BUCKET, PREFIX = "incoming", "logs/"
WATCHED = f"s3://{BUCKET}/{PREFIX}"


class Watched:
    """The servers, and `flows.serve` watching WATCHED, startable and stoppable."""

    def __init__(self, root: Path, api: str, store: SeaweedFS, env: dict[str, str], params: Path):
        self.root, self.api, self.store, self.env, self.params = root, api, store, env, params
        self.out, self.logs = root / "out", [root / "server.log"]
        self.serving: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.root / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        self.serving = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--params", str(self.params), "--watch", WATCHED,
             "--out", str(self.out), "--watch-every", "8", "--limit", "3",
             "--watch-state", str(self.root / "watch-state.json")],
            env=self.env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.serving is not None:
            stop(self.serving)
            self.serving = None

    def put(self, key: str, records: list) -> str:
        s3_client(self.store.settings()).put_object(Bucket=BUCKET, Key=PREFIX + key, Body=json.dumps(records).encode())
        return WATCHED + key

    def runs(self, deployment: str) -> list:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with SyncPrefectClient(self.api) as client:
            d = client.read_deployment_by_name(deployment)
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))

    def completed(self, deployment: str) -> list:
        return [r for r in self.runs(deployment) if r.state and r.state.is_completed()]

    def rounds_of(self, url: str) -> list[dict]:
        """The manifest entries of the rounds (one lineage, under <out>/rounds) that read `url`."""
        (manifest,) = (self.out / "rounds").glob("*/manifest.json")
        return [r for r in json.loads(manifest.read_text())["rounds"] if r["input"] == url]

    def round_dir(self, entry: dict) -> Path:
        (lineage,) = (self.out / "rounds").glob("*/manifest.json")
        return lineage.parent / f"round-{entry['round']:04d}"

    def wait_completed(self, deployment: str, n: int, timeout_s: float = 300) -> list:
        return wait_for(f"{n} completed run(s) of {deployment}",
                        lambda: _try(lambda: (done := self.completed(deployment)) and len(done) >= n and done),
                        timeout_s, self.logs, every_s=2)


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Iterator[Watched]:
    root = tmp_path_factory.mktemp("watched")
    port = free_port()
    env = server_env(root)
    server: subprocess.Popen | None = None
    watched: Watched | None = None
    with SeaweedFS(root / "s3") as store, FakeLLMServer(picky_brain) as llm:
        s3_client(store.settings()).create_bucket(Bucket=BUCKET)
        try:
            server, api = start_server(root, env, port, root / "server.log")
            params = flow_params(root / "params.yaml", llm.api_base, root / "cache")
            # The store's keys reach the watcher and its flow runs through the environment only.
            serve_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
            serve_env |= {"PREFECT_API_URL": api, "PREFECT_HOME": str(root / "serve-home"),
                          "PREFECT_RUNNER_POLL_FREQUENCY": "2", "AGENTHER_S3_ENDPOINT": store.endpoint,
                          "AWS_ACCESS_KEY_ID": store.access_key, "AWS_SECRET_ACCESS_KEY": store.secret_key}
            watched = Watched(root, api, store, serve_env, params)
            yield watched
        finally:
            if watched is not None:
                watched.stop()
            if server is not None:
                stop(server)


def test_each_object_uploaded_while_watching_or_stopped_triggers_exactly_one_run(watched):
    records = json.loads(TAU.read_text())
    watched.start()
    first = watched.put("run-a.json", records[100:106])
    runs = watched.wait_completed("hindsight/on-new-logs", 1)
    assert [r.parameters["input"] for r in runs] == [first]
    # Each run is an incremental round on that object (flows.serve's default, under <out>/rounds).
    (entry,) = watched.rounds_of(first)
    assert entry["counts"]["new_trajectories"] == 6 and entry["reconciled"]
    folder = watched.round_dir(entry)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["input"]["path"] == first  # the round read the object itself
    assert summary["stages"]["ingest"]["in"] == 6 and summary["reconciliation"]["ok"]
    trajectories = pl.read_parquet(folder / "00_trajectories.parquet")
    assert set(trajectories["source_file"]) == {first}

    # Uploaded while nobody watches: found when the watcher is back, from the same state file.
    watched.stop()
    second = watched.put("day 2/run-b.json", records[106:110])
    s3_client(watched.store.settings()).put_object(Bucket=BUCKET, Key=PREFIX + "notes.txt", Body=b"not a log")
    watched.start()
    runs = watched.wait_completed("hindsight/on-new-logs", 2)
    assert sorted(r.parameters["input"] for r in runs) == sorted([first, second])
    (entry,) = watched.rounds_of(second)
    summary = json.loads((watched.round_dir(entry) / "summary.json").read_text())
    assert summary["input"]["path"] == second and summary["stages"]["ingest"]["in"] == 4

    # A changed object (new ETag and size) is news once more: a round of its 3 new runs.
    watched.put("run-a.json", records[110:113])
    runs = watched.wait_completed("hindsight/on-new-logs", 3)
    assert sorted(r.parameters["input"] for r in runs) == sorted([first, first, second])
    assert [e["counts"]["new_trajectories"] for e in watched.rounds_of(first)] == [6, 3]
    published = json.loads((watched.round_dir(entry).parent / "published" / "summary.json").read_text())
    assert published["stages"]["ingest"]["in"] == 13 and published["reconciliation"]["ok"]

    # Listed again unchanged, on later watcher runs: nothing more.
    ticks = len(watched.completed("watch-logs/watch"))
    watched.wait_completed("watch-logs/watch", ticks + 3)
    assert len(watched.runs("hindsight/on-new-logs")) == 3
    state = json.loads((watched.root / "watch-state.json").read_text())["seen"]
    assert sorted(state) == sorted([first, second])
    for text in [p.read_text(errors="replace") for p in watched.logs if p.exists()]:
        assert watched.store.secret_key not in text
