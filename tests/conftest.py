from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/llm_server.py

from llm_server import FakeLLMServer, careful_brain  # noqa: E402

import agenther  # noqa: E402,F401  (quiet-environment defaults before anything else)

TAU = ROOT / "data/raw/tau-bench/gpt-4o-airline.json"
TOOLBENCH = ROOT / "data/raw/toolbench/answer"


@pytest.fixture
def llm_server():
    """A scripted OpenAI-compatible server; tests may replace `.brain`."""
    with FakeLLMServer(careful_brain) as server:
        yield server


def params_overrides(cache: Path, server: FakeLLMServer | str | None = None, **sections: dict) -> dict:
    """The params a test sets over params.yaml's defaults: the LLM cache in `cache`; with a
    `server` (the scripted one, or an api_base URL) the model `openai/local` at it with short
    retries; then each of `sections` merged into its section (llm={...} adds to the llm keys)."""
    llm: dict = {"cache_dir": str(cache)}
    if server is not None:
        api_base = server if isinstance(server, str) else server.api_base
        llm |= {"model": "openai/local", "api_base": api_base, "max_retries": 2, "timeout_s": 20}
    overrides: dict = {"llm": llm}
    for name, values in sections.items():
        overrides[name] = overrides.get(name, {}) | values
    return overrides


def make_params(tmp_path: Path, server: FakeLLMServer | str | None = None, **sections: dict) -> dict:
    """Loaded params (params_overrides, cache in tmp_path/cache), for calling stage functions."""
    from agenther.params import load_params

    return load_params(None, params_overrides(tmp_path / "cache", server, **sections))


def write_params(path: Path, server: FakeLLMServer | str | None = None, *, cache: Path | None = None,
                 **sections: dict) -> Path:
    """A params file (params_overrides, cache beside it unless given) for `--params`; returns its path."""
    path.write_text(yaml.safe_dump(params_overrides(cache or path.parent / "cache", server, **sections)))
    return path


def whole_run_goal(messages: list[dict]) -> str:
    """An achieved goal (JSON) whose sample is the whole run, every assistant turn training: for
    tests of what packaging and judging do with a goal, not of how extract computes one."""
    from agenther.evidence.goal import AchievedGoal

    train = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return AchievedGoal(start=first, sample_end=len(messages), train_steps=train).model_dump_json()


def opening_rewritten(row: dict, prompt: str, goal_json: str | None = None) -> dict:
    """`row` relabeled as tests need it: its goal (default: the whole run, whole_run_goal) and its
    sample's opening user turn rewritten as `prompt` (the relabeled table's columns)."""
    import json

    from agenther.evidence.goal import AchievedGoal, first_user_index

    goal_json = goal_json or whole_run_goal(row["messages"])
    opening = AchievedGoal.model_validate_json(goal_json).start or first_user_index(row["messages"])
    before = row["messages"][opening]["content"]
    return row | {"achieved_goal": goal_json, "hindsight_prompt": prompt,
                  "rewrites": json.dumps([{"step": opening, "before": before, "after": prompt}]),
                  "relabel_confidence": 0.9, "relabel_attempts": 1, "relabel_rationale": "", "relabel_model": "test"}


def ingest(path: Path, fmt: str = "auto", mapping: dict | None = None, limit: int | None = None) -> SimpleNamespace:
    """The ingest stage as every run calls it (agenther.stages.ingest.write_tables), into a temporary
    work folder: its two tables read back, and records_in."""
    import polars as pl

    from agenther.params import load_params
    from agenther.stages.ingest import write_tables
    from agenther.workdir import TABLES

    params = load_params(None, {"ingest": {"input": str(path), "format": fmt, "messages": mapping or {}, "limit": limit}})
    with tempfile.TemporaryDirectory() as tmp:
        stats = write_tables(params, Path(tmp))
        return SimpleNamespace(trajectories=pl.read_parquet(Path(tmp) / TABLES["trajectories"]),
                               quarantine=pl.read_parquet(Path(tmp) / TABLES["quarantine"]),
                               records_in=stats["records_in"], stats=stats)


def package(verified, classified, params: dict, lineage: dict, batch_rows: int = 500,
            out: Path | None = None, measure_tokens: bool = False, spread=None) -> SimpleNamespace:
    """The package stage's exports as every run writes them (agenther.stages.packaging.export_samples,
    classified read from a Parquet file in batches), into `out` (default: a temporary folder): the
    rows of each export file as written, and the stage's rejections, counts and digests. `params`:
    the package section's values over its defaults (load_params checks them)."""
    import json

    from agenther.params import load_params
    from agenther.stages.packaging import export_samples

    section = load_params(None, {"package": params}).package

    with tempfile.TemporaryDirectory() as tmp:
        classified_path = Path(tmp) / "classified.parquet"
        classified.write_parquet(classified_path)
        folder = out or Path(tmp) / "out"
        exported = export_samples(verified, classified_path, section, lineage, folder, batch_rows,
                                  measure_tokens=measure_tokens, **({"spread": spread} if spread else {}))
        # a file with no rows is not written: no rows
        rows = {name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
                if (folder / f"{name}.jsonl").exists() else [] for name in ("sft", "dpo", "sharegpt")}
    return SimpleNamespace(**rows, rejections=exported.rejections, counts=exported.counts, digests=exported.digests,
                           exported=exported)


def list_keys(url: str, settings=None) -> list[str]:
    """Every key under s3://bucket/prefix, sorted: what a test finds in the store."""
    from agenther.s3 import parse_s3_url, s3_client

    bucket, prefix = parse_s3_url(url)
    paginator = s3_client(settings).get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def install_distribution(tmp_path: Path, monkeypatch, name: str, version: str, modules: dict[str, str],
                         entry_points: str) -> None:
    """A plugin installed the way a user's is: its modules, and a distribution's metadata with its
    entry points, on sys.path (real importlib.metadata, no patching of ours)."""
    for module, source in modules.items():
        (tmp_path / f"{module}.py").write_text(source)
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(tmp_path))
