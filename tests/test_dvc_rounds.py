"""rounds/dvc.yaml with the real DVC CLI: `dvc repro` after data/incoming grew makes a second round
with only the new logs, the earlier round is kept (`persist: true`), and `dvc push` puts the rounds
in the S3 remote (SeaweedFS). LLM answers from the scripted server."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import ROOT, TAU, list_keys
from llm_server import FakeLLMServer, careful_brain
from test_dvc import Repo

from agenther.devtools.seaweedfs import SeaweedFS
from agenther.lineage import read_manifest
from agenther.s3 import ensure_bucket, s3_client

pytestmark = pytest.mark.slow  # real DVC, SeaweedFS, and `agenther round` as DVC's command


def test_dvc_repro_after_new_logs_landed_makes_a_round_of_only_them(tmp_path):
    records = json.loads(TAU.read_text())
    with SeaweedFS(tmp_path / "s3") as s3, FakeLLMServer(careful_brain) as llm:
        repo = Repo(tmp_path / "repo", tmp_path)
        repo.path.mkdir()
        shutil.copytree(ROOT / "agenther", repo.path / "agenther", ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
        (repo.path / "rounds").mkdir()
        for name in ("rounds/dvc.yaml", ".dvcignore", ".gitignore"):
            shutil.copy(ROOT / name, repo.path / name)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["llm"] |= {"model": "openai/local", "api_base": llm.api_base, "cache_dir": str(tmp_path / "llm-cache"),
                          "timeout_s": 30, "max_retries": 2, "concurrency": 4}
        (repo.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        repo.run("git", "init", "-q")
        repo.run("dvc", "init", "-q")
        shutil.copy(ROOT / ".dvc/config", repo.path / ".dvc/config")
        repo.run("dvc", "remote", "modify", "--local", "store", "endpointurl", s3.endpoint)
        repo.run("dvc", "remote", "modify", "--local", "store", "access_key_id", s3.access_key)
        repo.run("dvc", "remote", "modify", "--local", "store", "secret_access_key", s3.secret_key)
        ensure_bucket(s3_client(s3.settings()), "agenther")

        def land(day: str, part: slice) -> None:
            path = repo.path / "data/incoming" / day / "gpt-4o-airline.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(records[part]))
            repo.run("dvc", "add", "data/incoming")
            repo.commit(f"logs {day}")

        land("day1", slice(0, 10))
        first = repo.run("dvc", "repro", "rounds/dvc.yaml")
        assert "Running stage 'rounds/dvc.yaml:rounds'" in first
        repo.commit("round 1")
        land("day2", slice(50, 60))
        requests = len(llm.requests)
        repo.run("dvc", "repro", "rounds/dvc.yaml")
        round2_requests = len(llm.requests) - requests
        repo.commit("round 2")
        assert "didn't change, skipping" in repo.run("dvc", "repro", "rounds/dvc.yaml")  # nothing landed
        repo.run("dvc", "push")
        keys = list_keys("s3://agenther/dvcstore", s3.settings())

    (folder,) = (repo.path / "data/rounds").iterdir()
    manifest = read_manifest(folder)
    assert [(r["round"], r["counts"]["records_read"], r["counts"]["new_trajectories"]) for r in manifest["rounds"]] \
        == [(1, 10, 10), (2, 10, 10)]
    assert all(r["reconciled"] for r in manifest["rounds"])
    round2 = json.loads((folder / "round-0002/summary.json").read_text())
    assert round2["llm"]["total"]["calls"] == round2_requests > 0  # round 2 asked about day 2's runs only
    assert (folder / "round-0001/summary.json").exists()  # persist: DVC kept round 1 when it reran the stage
    published = json.loads((folder / "published/summary.json").read_text())
    assert published["stages"]["ingest"]["out"] == 20 and published["reconciliation"]["ok"]
    lock = yaml.safe_load((repo.path / "rounds/dvc.lock").read_text())
    (out,) = lock["stages"]["rounds"]["outs"]
    assert out["path"] == "data/rounds" and out["nfiles"] > 0
    assert keys  # the rounds (and the logs) are in the remote
    assert "data/rounds" not in repo.run("git", "ls-files")  # DVC's, not git's
