"""The project's dvc.yaml with the real DVC CLI, a real S3 remote (SeaweedFS) and LLM answers
from the scripted server: `dvc repro` runs every stage, a `package` param change reruns only
`package`, and `dvc push` -> `git clone` -> `dvc pull` gives byte-identical outputs. No secret
ends up in a tracked file, dvc.lock, an output or the git history.

The test repo is a copy of the project (code, dvc.yaml, params.yaml, .gitignore, .dvcignore,
.dvc/config and the tau-bench sample) so the stages run the copied code (PYTHONPATH) and the
code deps in dvc.yaml resolve; S3 keys go only into .dvc/config.local, as for a user.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import list_keys
from llm_server import FakeLLMServer, careful_brain, prompt_kind, user_text

from agenther.devtools.seaweedfs import SeaweedFS
from agenther.s3 import ensure_bucket, s3_client
from agenther.workdir import STAGES, STATS, TABLES

pytestmark = pytest.mark.slow  # real DVC, SeaweedFS and `dvc repro` of every stage

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, agenther, weed
LIMIT = 20
INTERIM = sorted(f"data/interim/{name}" for name in [*TABLES.values(), *STATS.values()])
TIMINGS: dict[str, float] = {}


def _env(base: Path, repo: Path) -> dict[str, str]:
    # Nothing from the caller's AWS/DVC/git setup leaks in: the keys must come from config.local.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DVC_", "GIT_", "AGENTHER_", "PYTHON"))}
    gitconfig = base / "gitconfig"
    if not gitconfig.exists():
        gitconfig.write_text("[user]\n\tname = test\n\temail = test@example.com\n"
                             "[init]\n\tdefaultBranch = main\n[commit]\n\tgpgsign = false\n")
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `agenther` in dvc.yaml's cmd
        "PYTHONPATH": str(repo),  # the stages run the repo's own copy of the code
        "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(base / "dvc-global"), "DVC_SYSTEM_CONFIG_DIR": str(base / "dvc-system"),
        "AWS_EC2_METADATA_DISABLED": "true", "DO_NOT_TRACK": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "GIT_CONFIG_GLOBAL": str(gitconfig), "GIT_CONFIG_NOSYSTEM": "1",
    })
    return env


class Repo:
    def __init__(self, path: Path, base: Path):
        self.path, self.base = path, base

    def run(self, *cmd: str | Path, timeout: float = 900) -> str:
        tool = BIN / "dvc" if cmd[0] == "dvc" else cmd[0]
        started = time.monotonic()
        done = subprocess.run([str(tool), *map(str, cmd[1:])], cwd=self.path, env=_env(self.base, self.path),
                              capture_output=True, text=True, timeout=timeout)
        self.last_s = time.monotonic() - started
        assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n" \
                                     f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout + done.stderr

    def outs(self) -> dict[str, bytes]:
        files = [self.path / p for p in INTERIM] + sorted((self.path / "data/processed").rglob("*"))
        return {str(f.relative_to(self.path)): f.read_bytes() for f in files if f.is_file()}

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)


def picky_brain(request: dict):
    """careful_brain, except that the trajectory judge turns down about a third of the relabels
    (chosen by a hash of the prompt, so reruns agree): a realistic acceptance rate, which
    the acceptance-rate gate in front of `package` insists on."""
    if prompt_kind(request) == "judge_trajectory" and hashlib.sha256(user_text(request).encode()).digest()[0] % 3 == 0:
        return json.dumps({"satisfied": False, "consistent_with_user": True, "confidence": 0.9,
                           "reason": "the run does not do all of that"})
    return careful_brain(request)


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    """Not a check: the times the tests measured, printed once the module is done (`pytest -s`)."""
    yield
    for what, seconds in TIMINGS.items():
        print(f"\n  {what}: {seconds:.1f} s", end="")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc")
    with SeaweedFS(base / "s3") as s3, FakeLLMServer(picky_brain) as llm:
        yield base, s3, llm


@pytest.fixture(scope="module")
def repo(stack) -> Repo:
    """A git+DVC repo made of the project's files, the remote on the test S3, after a cold `dvc repro`."""
    base, s3, llm = stack
    r = Repo(base / "repo", base)
    r.path.mkdir()
    shutil.copytree(ROOT / "agenther", r.path / "agenther", ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
    shutil.copytree(ROOT / "data/raw/tau-bench", r.path / "data/raw/tau-bench")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, r.path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["limit"] = LIMIT
    params["llm"] |= {"model": "openai/local", "api_base": llm.api_base, "cache_dir": str(base / "llm-cache"),
                      "timeout_s": 30, "max_retries": 2, "concurrency": 4}
    (r.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    r.run("git", "init", "-q")
    r.run("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", r.path / ".dvc/config")  # the project's committed remote `store`
    # What `scripts/s3.sh start` does for a user, here for the test server on its free port.
    r.run("dvc", "remote", "modify", "--local", "store", "endpointurl", s3.endpoint)
    r.run("dvc", "remote", "modify", "--local", "store", "access_key_id", s3.access_key)
    r.run("dvc", "remote", "modify", "--local", "store", "secret_access_key", s3.secret_key)
    ensure_bucket(s3_client(s3.settings()), "agenther")
    r.commit("project")

    r.cold_output = r.run("dvc", "repro")
    TIMINGS["dvc repro (cold, 6 stages)"] = r.last_s
    r.cold_requests = len(llm.requests)
    r.commit("cold run")
    return r


def test_repro_runs_every_stage_and_writes_every_declared_out(repo, stack):
    assert _ran(repo.cold_output) == list(STAGES)
    outs = repo.outs()
    assert set(INTERIM) <= set(outs)
    summary = json.loads(outs["data/processed/summary.json"])
    assert summary["stages"]["ingest"]["in"] == LIMIT
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    # 20 records, one trial per task: no pairs, so no dpo.jsonl (a file with no rows is not written)
    assert {"sft.jsonl", "sharegpt.jsonl", "dataset_card.md", "rejected.parquet", "trl/sft.jsonl"} <= {
        p.removeprefix("data/processed/") for p in outs if p.startswith("data/processed/")}
    assert "dpo.jsonl" in summary["exports"]["not_written"]
    assert repo.cold_requests > 0  # relabel and verify asked the scripted LLM
    assert 0 < summary["gates"]["passed_judges"] < summary["gates"]["passed_confidence_gate"]
    # The stages ran the repo's copy of the code (its bytecode is there), yet bytecode in the
    # dir deps (.dvcignore) and the LLM cache change nothing DVC watches.
    assert (repo.path / "agenther/adapters/__pycache__").is_dir()
    assert "Data and pipelines are up to date" in repo.run("dvc", "status")
    # Outputs are DVC's, never git's (the project's .gitignore).
    tracked = repo.run("git", "ls-files").split()
    assert not [p for p in tracked if p.startswith(("data/interim", "data/processed"))]
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert "cache_dir" not in json.dumps(lock)  # runtime-only llm keys are not params of any stage


def test_a_package_param_change_reruns_only_package(repo, stack):
    _, _, llm = stack
    before = repo.outs()
    mtimes = {p: (repo.path / p).stat().st_mtime_ns for p in INTERIM}
    requests = len(llm.requests)

    params_file = repo.path / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["package"]["weight_alpha"] = 0.8
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))

    status = json.loads(repo.run("dvc", "status", "--json"))
    assert set(status) == {"package"}, status
    output = repo.run("dvc", "repro")
    TIMINGS["dvc repro (package param changed)"] = repo.last_s
    assert _ran(output) == ["package"], output
    for stage in STAGES[:-1]:
        assert f"Stage '{stage}' didn't change, skipping" in output
    after = repo.outs()
    for path in INTERIM:  # upstream untouched: same bytes, not even rewritten
        assert after[path] == before[path], path
        assert (repo.path / path).stat().st_mtime_ns == mtimes[path], path
    assert len(llm.requests) == requests  # package asks no LLM
    old, new = (json.loads(o["data/processed/summary.json"])["lineage"]["params_hash"] for o in (before, after))
    assert old != new  # the new params are in the lineage
    assert "Data and pipelines are up to date" in repo.run("dvc", "status")
    repo.commit("weight_alpha 0.8")


def test_push_clone_pull_restores_identical_outputs(repo, stack):
    base, s3, _ = stack
    assert "Data and pipelines are up to date" in repo.run("dvc", "status")
    repo.commit("state to share")
    repo.run("dvc", "push")
    TIMINGS["dvc push"] = repo.last_s
    assert list_keys("s3://agenther/dvcstore", s3.settings())  # the objects are in S3

    clone = Repo(base / "clone", base)
    Repo(base, base).run("git", "clone", "-q", repo.path, clone.path)
    assert not (clone.path / "data/processed").exists()
    assert not (clone.path / ".dvc/config.local").exists()  # keys never travel with git
    clone.run("dvc", "remote", "modify", "--local", "store", "endpointurl", s3.endpoint)
    clone.run("dvc", "remote", "modify", "--local", "store", "access_key_id", s3.access_key)
    clone.run("dvc", "remote", "modify", "--local", "store", "secret_access_key", s3.secret_key)
    clone.run("dvc", "pull")
    TIMINGS["dvc pull (fresh clone)"] = clone.last_s
    original, pulled = repo.outs(), clone.outs()
    assert set(pulled) == set(original)
    for path, data in original.items():
        assert pulled[path] == data, path
    # The clone is up to date without rerunning anything: code, params and data all match dvc.lock.
    assert "Data and pipelines are up to date" in clone.run("dvc", "status")


def test_no_secret_in_tracked_files_lock_outputs_or_history(repo, stack):
    _, s3, _ = stack
    secrets = (s3.secret_key, s3.access_key)
    tracked = repo.run("git", "ls-files", "-z").split("\0")
    assert "dvc.lock" in tracked and ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    files = {p for p in tracked if p} | set(repo.outs())
    files |= {str(p.relative_to(repo.path)) for p in (repo.path / ".dvc/cache").rglob("*") if p.is_file()}
    for name in sorted(files):
        data = (repo.path / name).read_bytes()
        assert not any(s.encode() in data for s in secrets), f"a key is in {name}"
    history = repo.run("git", "log", "--all", "-p", "--no-color")
    assert not any(s in history for s in secrets)
    assert s3.secret_key in (repo.path / ".dvc/config.local").read_text()  # where it belongs, git-ignored
    assert repo.run("git", "check-ignore", ".dvc/config.local").strip() == ".dvc/config.local"
