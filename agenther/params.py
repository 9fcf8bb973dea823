"""Parameters: defaults, a params.yaml overlay, and a stable hash for lineage and caching."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "ingest": {
        "input": "data/raw/tau-bench/gpt-4o-airline.json",
        "format": "auto",
        "limit": None,
        "max_trajectory_mb": 8.0,  # bigger trajectories are quarantined
        "messages": {},
    },
    "classify": {"mode": "rule", "max_severity": 0.9},
    "extract": {"mode": "rule"},
    "relabel": {
        "confidence_threshold": 0.7,
        "max_attempts": 3,
        "temperatures": [0.2, 0.5, 0.8],
        "max_goal_similarity": 0.9,
    },
    "verify": {
        "policy": "all",
        "judges": ["coverage", "grounding", "policy", "trajectory", "evidence"],
        "judge_confidence_threshold": 0.6,
        "transcript_tokens": 600,  # the sample as an LLM judge reads it, compacted to about this
    },
    # Which tools change state (agenther/evidence/tools.py): by default from each tool's name and schema
    # description; these lists always win. `requests`: tool -> the words that ask for it.
    "tools": {"writes": [], "reads": [], "handoffs": [], "requests": {}, "default_kind": "read"},
    "package": {
        "weight_alpha": 0.5,
        "min_weight": 0.2,
        "include_successes": True,
        "near_dup_threshold": 0.9,
        "max_pairs_per_task": 4,
    },
    # Great Expectations gates at every hand-over between stages (agenther/gates.py).
    # Ranges are [low, high]; distribution checks need min_rows_for_distribution rows.
    "gates": {
        "enabled": True,
        "min_rows_for_distribution": 10,
        "severity": [0.0, 1.0],
        "relabel_confidence": [0.0, 1.0],
        "judge_confidence": [0.0, 1.0],
        "relabel_confidence_mean": [0.05, 0.99],
        "relabel_confidence_min_stdev": 0.0,  # 0 = off (scripted or greedy models repeat one value)
        "acceptance_rate": [0.0, 0.98],
        "max_failure_type_share": 0.95,
    },
    "llm": {
        "model": "local",
        "judge_model": None,
        "api_base": None,
        "local_model": "qwen2.5-coder-1.5b",
        "max_tokens": 384,
        "timeout_s": 120,
        "max_retries": 3,
        "concurrency": 2,
        "processes": 0,  # 0 = calls run in this process; N = in N worker processes (agenther/call_pool.py)
        "cache_dir": ".agenther-cache/llm",
        "context_tokens": 4096,
        "requests_per_minute": None,  # per provider (model + api_base); None = unlimited
        "tokens_per_minute": None,    # per provider, estimated before a call, settled after
        "budget_usd": None,           # run-wide cap; None = none. Once spent, no new call starts
        "budget_tokens": None,        # run-wide cap on prompt + completion tokens; None = none
    },
    # How stages read and write their tables: rows per Parquet row group and per batch in
    # memory. Bounds a non-LLM stage's memory, whatever the input's size.
    "io": {"batch_rows": 500},
    # Read only by the Prefect flow (tasks/stages.py); how a run is orchestrated, not what it produces.
    "prefect": {
        "batch_size": 32,
        "retries": 3,
        "retry_backoff_s": 2.0,
        "retry_jitter": 0.5,
    },
}


OPEN_SECTIONS = {"ingest.messages", "tools.requests"}


class ParamsError(ValueError):
    pass


def _merge(base: dict, over: dict, where: str = "", open_keys: bool = False) -> dict:
    """Overlay `over` on `base`. Keys unknown to `base` are errors, except inside the
    free-form sections (OPEN_SECTIONS, e.g. the ingest.messages mapping)."""
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if key not in base and not open_keys:
            raise ParamsError(f"unknown parameter {where}{key!r} (known: {', '.join(sorted(base))})")
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = _merge(current, value, f"{where}{key}.", open_keys or f"{where}{key}" in OPEN_SECTIONS)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | Path | None = None, overrides: dict | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file (if any), then explicit overrides. Unknown keys are errors."""
    params = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"params file not found: {p}")
        params = _merge(params, yaml.safe_load(p.read_text()) or {})
    if overrides:
        params = _merge(params, overrides)
    _check(params)
    return params


def _check(params: dict) -> None:
    if params["verify"]["policy"] not in ("all", "majority"):
        raise ParamsError(f"verify.policy must be 'all' or 'majority', not {params['verify']['policy']!r}")
    for stage in ("classify", "extract"):
        if params[stage]["mode"] not in ("rule", "llm"):
            raise ParamsError(f"{stage}.mode must be 'rule' or 'llm', not {params[stage]['mode']!r}")
    threshold = params["relabel"]["confidence_threshold"]
    if not 0.0 <= float(threshold) <= 1.0:
        raise ParamsError(f"relabel.confidence_threshold must be within [0, 1], not {threshold}")
    if params["tools"]["default_kind"] not in ("read", "write"):
        raise ParamsError(f"tools.default_kind must be 'read' or 'write', not {params['tools']['default_kind']!r}")
    if not params["verify"]["judges"]:
        raise ParamsError("verify.judges must name at least one judge")
    if int(params["relabel"]["max_attempts"]) < 1:
        raise ParamsError("relabel.max_attempts must be at least 1")
    llm = params["llm"]
    if int(llm["concurrency"]) < 1:
        raise ParamsError(f"llm.concurrency must be at least 1, not {llm['concurrency']}")
    if isinstance(llm["processes"], bool) or not isinstance(llm["processes"], int) or llm["processes"] < 0:
        raise ParamsError(f"llm.processes must be a whole number >= 0, not {llm['processes']!r}")
    for key in ("requests_per_minute", "tokens_per_minute", "budget_usd", "budget_tokens"):
        value = llm.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ParamsError(f"llm.{key} must be a non-negative number or null, not {value!r}")
    from agenther.gates import gate_params  # here, not at import: gates imports this module

    gate_params(params)  # bad gate bounds fail before any stage runs


# Settings that change how a run goes, not what it produces: left out of the lineage hash.
# (Rate limits only pace the calls; a budget decides which records are left undone, so it counts.)
RUNTIME_ONLY = {"llm": ("cache_dir", "concurrency", "processes", "timeout_s", "max_retries", "requests_per_minute",
                        "tokens_per_minute"),
                "io": ("batch_rows",),
                "prefect": ("batch_size", "retries", "retry_backoff_s", "retry_jitter")}


def params_hash(params: dict, sections: tuple[str, ...] | None = None) -> str:
    """sha256 (12 hex) of the canonical JSON of the chosen sections (all when None),
    without the RUNTIME_ONLY settings."""
    chosen = copy.deepcopy(params if sections is None else {s: params[s] for s in sections})
    for section, keys in RUNTIME_ONLY.items():
        for key in keys:
            chosen.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]
