"""Parameters: defaults, a params.yaml overlay, and a stable hash for lineage and caching.

Each section of params.yaml is a pydantic model (below): its fields are the section's keys
with their defaults and constraints, and no other key is allowed (`extra="forbid"`).
`load_params` merges defaults, the YAML file and explicit overrides, validates the result
and returns it as a `Params` model, which stages read by attribute (`params.relabel.mode`);
what must be plain data (hashes, cache keys, JSON) is its `model_dump(mode="json")`. Values
are typed: an int stays an int and a float a float, as written, so the lineage hash of a file
depends on its values only. A bad key or value is a ParamsError naming its dotted path
(`llm.concurrency: ...`, `unknown parameter relabel.confidnce_threshold`) and the file it
came from. Two sections are free-form mappings: `ingest.messages` (checked by
agenther.adapters.messages.MessagesMapping.from_params when ingest reads the logs) and
`tools.requests` (tool name -> the words that ask for it).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agenther.judges import JUDGE_NAMES


class ParamsError(ValueError):
    pass


# --- value types ---------------------------------------------------------------------------
# Numbers are validated, not converted: an int stays an int (JSON 8, not 8.0), so a params
# file's hash is that of the values it states (relabel.temperatures alone become floats: they go
# into the LLM requests as before). bool is no number here.

def _number(low: float | None = None, high: float | None = None, low_open: bool = False,
            to_float: bool = False) -> Any:
    """int | float within [low, high] (`low_open`: (low, high]), validated as is (`to_float`:
    as a float, for values that go into LLM requests, whose JSON is a cache key)."""
    if high is not None:
        bound = f" within {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        bound = "" if low is None else f" {'>' if low_open else '>='} {low:g}"

    def check(value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PydanticCustomError("number_type", "Input should be a number")
        ok = (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
        if not ok:  # NaN fails every comparison
            raise PydanticCustomError("number_range", f"Input should be a number{bound}")
        return float(value) if to_float else value

    return Annotated[float if to_float else int | float, PlainValidator(check)]


def _range(value: Any) -> list:
    """[low, high], 0 <= low <= high <= 1 (a gate's allowed range)."""
    if (not isinstance(value, list | tuple) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value)
            or not 0.0 <= value[0] <= value[1] <= 1.0):
        raise PydanticCustomError("gate_range", "Input should be [low, high] with 0 <= low <= high <= 1")
    return list(value)


def _regex(value: Any) -> str:
    """A regular expression that compiles (checked here: a bad one is a params error, not a crash mid-run)."""
    if not isinstance(value, str):
        raise PydanticCustomError("regex_type", "Input should be a regular expression (a string)")
    try:
        re.compile(value)
    except re.error as exc:
        raise PydanticCustomError("regex", f"not a valid regular expression: {exc}") from None
    return value


Regex = Annotated[str, PlainValidator(_regex)]
NonNegative = _number(0.0)
Positive = _number(0.0, low_open=True)
Unit = _number(0.0, 1.0)  # within [0, 1]
Share = _number(0.0, 1.0, low_open=True)  # within (0, 1]
Temperature = _number(0.0, to_float=True)
Count = Annotated[StrictInt, Field(ge=0)]
PositiveCount = Annotated[StrictInt, Field(ge=1)]
Range = Annotated[list[int | float], PlainValidator(_range)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- the sections --------------------------------------------------------------------------

class Grammar(_Section):
    """A text-action grammar of your own (agenther/adapters/regex_actions.py)."""
    action: Regex  # searched in each assistant text turn; named groups: tool, args, or argument names
    tool: str | None = None  # the tool's name when `action` has no `tool` group
    observation: Regex | None = None  # a user turn right after an action that starts so is its result
    final: list[str] = Field(default_factory=list)  # tools whose call is the final report (its argument: the answer)

    @model_validator(mode="after")
    def _names_a_tool(self) -> Grammar:
        if "tool" not in re.compile(self.action).groupindex and not self.tool:
            raise ValueError("action has no (?P<tool>...) group and no tool is given")
        return self


class Ingest(_Section):
    input: str = "data/raw/tau-bench/gpt-4o-airline.json"
    format: str = "auto"  # auto | a registered format (tau-bench, toolbench, messages; checked by ingest)
    limit: Count | None = None
    # bigger trajectories are quarantined: no model context holds one, and a 50 MB tool dump would
    # otherwise flow into every export
    max_trajectory_mb: Positive | None = 8.0
    # Free-form: where each field of a `messages` log lives (MessagesMapping.from_params checks it).
    messages: dict[str, Any] | None = Field(default_factory=dict)
    # How actions written as text are read: auto (detected per log) | none | a grammar's name
    # (react, http, or one of `grammars`; checked by ingest).
    text_actions: str = "auto"
    grammars: dict[str, Grammar] = Field(default_factory=dict)


class Classify(_Section):
    mode: Literal["rule", "llm"] = "rule"
    max_severity: Unit = 0.9


class Extract(_Section):
    mode: Literal["rule", "llm"] = "rule"


class Relabel(_Section):
    confidence_threshold: Unit = 0.7
    max_attempts: PositiveCount = 3
    # attempt i uses temperatures[i] (the last one repeats); floats as the LLM requests state them
    temperatures: Annotated[list[Temperature], Field(min_length=1)] = Field(default_factory=lambda: [0.2, 0.5, 0.8])


class Verify(_Section):
    policy: Literal["all", "majority"] = "all"
    judges: Annotated[list[Literal[JUDGE_NAMES]], Field(min_length=1)] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(JUDGE_NAMES))
    judge_confidence_threshold: Unit = 0.6
    transcript_tokens: PositiveCount = 600  # the sample as an LLM judge reads it, compacted to about this


class Replay(_Section):
    """Which replayable environment (agenther/envs) proves samples and makes tasks: `auto` picks one
    by the record's source format (tau-bench airline logs: tau-bench-airline), `none` turns replay
    off, a name (an installed entry point of group agenther.envs) is used for every record."""
    env: str = "auto"

    @field_validator("env")
    @classmethod
    def _installed(cls, value: str) -> str:
        # a name only, read from the installed metadata (agenther.envs.GROUP): loading is the judge's
        known = sorted(ep.name for ep in importlib.metadata.entry_points(group="agenther.envs"))
        if value not in ("auto", "none", *known):
            raise PydanticCustomError("unknown_env", f"Input should be auto, none or an installed environment "
                                                     f"({', '.join(known) or 'none installed'})")
        return value


class ToolRule(_Section):
    """A call's kind by its tool's name AND its arguments: `click` on "Buy Now" writes, on a product
    it reads. `tool` must match the whole name, `arguments` somewhere in the arguments' text (the
    text of a one-argument call, else its JSON); both ignore case."""
    tool: Regex
    arguments: Regex | None = None
    kind: Literal["write", "read", "handoff"]
    requests: list[str] = Field(default_factory=list)  # words that ask for it (default: from its verb)


class Tools(_Section):
    """Which tools change state (agenther/evidence/tools.py): by default from each tool's name and
    schema description; these lists always win. `requests`: tool -> the words that ask for it.
    `rules`: kinds by name and argument pattern, before the lists (and before the built-in rule:
    a click on a button whose label starts with buy, purchase, checkout, place order ... writes)."""
    writes: list[str] = Field(default_factory=list)
    reads: list[str] = Field(default_factory=list)
    handoffs: list[str] = Field(default_factory=list)
    requests: dict[str, list[str]] = Field(default_factory=dict)
    default_kind: Literal["read", "write"] = "read"
    rules: list[ToolRule] = Field(default_factory=list)


class Package(_Section):
    weight_alpha: NonNegative = 0.5
    min_weight: Unit = 0.2
    include_successes: StrictBool = True
    near_dup_threshold: Unit = 0.9
    max_pairs_per_task: Count = 4
    # step: prompt = the shared history, chosen / rejected = one assistant turn each (where the runs
    # diverge); trajectory: whole continuations, later user and tool turns included (DPO scores them too)
    dpo_pairs: Literal["step", "trajectory"] = "step"


class Gates(_Section):
    """Great Expectations gates at every hand-over between stages (agenther/gates.py).
    Ranges are [low, high]; distribution checks need min_rows_for_distribution rows."""
    enabled: StrictBool = True
    min_rows_for_distribution: PositiveCount = 10
    severity: Range = Field(default_factory=lambda: [0.0, 1.0])
    relabel_confidence: Range = Field(default_factory=lambda: [0.0, 1.0])
    judge_confidence: Range = Field(default_factory=lambda: [0.0, 1.0])
    relabel_confidence_mean: Range = Field(default_factory=lambda: [0.05, 0.99])
    relabel_confidence_min_stdev: NonNegative = 0.0  # 0 = off (scripted or greedy models repeat one value)
    acceptance_rate: Range = Field(default_factory=lambda: [0.0, 0.98])
    max_failure_type_share: Share = 0.95
    # A failed distribution check (confidence mean and spread, acceptance rate, failure-type share):
    # stop the run, or warn and go on (what `agenther inspect` always does). Schema checks always stop.
    distributions: Literal["stop", "warn"] = "stop"


class LLM(_Section):
    model: str = "local"
    judge_model: str | None = None
    api_base: str | None = None
    local_model: str = "qwen2.5-coder-1.5b"
    max_tokens: PositiveCount = 384
    timeout_s: Positive = 120
    max_retries: Count = 3
    concurrency: PositiveCount = 2
    processes: Count = 0  # 0 = calls run in this process; N = in N worker processes (agenther/llm/call_pool.py)
    cache_dir: str | None = ".agenther-cache/llm"
    context_tokens: PositiveCount = 4096
    requests_per_minute: NonNegative | None = None  # per provider (model + api_base); None = unlimited
    tokens_per_minute: NonNegative | None = None    # per provider, estimated before a call, settled after
    budget_usd: NonNegative | None = None           # run-wide cap; None = none. Once spent, no new call starts
    budget_tokens: NonNegative | None = None        # run-wide cap on prompt + completion tokens; None = none


class IO(_Section):
    """How stages read and write their tables: rows per Parquet row group and per batch in
    memory. Bounds a non-LLM stage's memory, whatever the input's size."""
    batch_rows: PositiveCount = 500
    part_mb: Positive = 64  # how much of the logs one ingest shard reads (agenther/stages/ingest.py)


class Prefect(_Section):
    """Read only by the Prefect flow (tasks/stages.py); how a run is orchestrated, not what it produces."""
    batch_size: PositiveCount = 32
    retries: Count = 3
    retry_backoff_s: NonNegative = 2.0
    retry_jitter: NonNegative = 0.5
    task_runner: Literal["local", "dask"] = "local"  # dask: batches on a Dask cluster (tasks/dask.py)
    dask_address: str | None = None  # tcp://host:8786 of a running cluster; None = a LocalCluster for the run
    dask_workers: PositiveCount = 2  # worker processes of that LocalCluster
    result_storage: str | None = None  # the batch cache: None = PREFECT_RESULTS_LOCAL_STORAGE_PATH; s3://bucket/prefix


class Review(_Section):
    """`agenther review sample`: how many judged relabels people are asked about, drawn with which seed."""
    size: PositiveCount = 40
    seed: Count = 0


class Params(_Section):
    ingest: Ingest = Field(default_factory=Ingest)
    classify: Classify = Field(default_factory=Classify)
    extract: Extract = Field(default_factory=Extract)
    relabel: Relabel = Field(default_factory=Relabel)
    verify: Verify = Field(default_factory=Verify)
    replay: Replay = Field(default_factory=Replay)
    tools: Tools = Field(default_factory=Tools)
    package: Package = Field(default_factory=Package)
    gates: Gates = Field(default_factory=Gates)
    llm: LLM = Field(default_factory=LLM)
    io: IO = Field(default_factory=IO)
    prefect: Prefect = Field(default_factory=Prefect)
    review: Review = Field(default_factory=Review)


DEFAULTS: dict[str, Any] = Params().model_dump()


def _merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`, mapping into mapping; any other value replaces (validation follows)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _has(tree: Any, loc: tuple) -> bool:
    """Whether `tree` (a loaded YAML, overrides) states the value at `loc`."""
    for key in loc:
        if not isinstance(tree, dict | list) or (key not in tree if isinstance(tree, dict) else
                                                 not (isinstance(key, int) and key < len(tree))):
            return False
        tree = tree[key]
    return True


def _known(loc: tuple) -> list[str]:
    """The keys allowed where `loc` points (the parent of an unknown key)."""
    model: Any = Params
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return sorted(model.model_fields)


def _problem(error: dict) -> str:
    path = ".".join(str(k) for k in error["loc"])
    if error["type"] == "extra_forbidden":
        known = _known(error["loc"][:-1])
        return f"unknown parameter {path}" + (f" (known: {', '.join(known)})" if known else "")
    got = repr(error["input"])
    return f"{path}: {error['msg']}, got {got if len(got) <= 80 else got[:77] + '...'}"


def _error(exc: ValidationError, sources: list[tuple[str, dict]]) -> ParamsError:
    """One line: each bad key's dotted path and problem, after the file (or overrides) that set it."""
    by_source: dict[str, list[str]] = {}
    for error in exc.errors():
        source = next((name for name, tree in reversed(sources) if _has(tree, error["loc"])), "params")
        by_source.setdefault(source, []).append(_problem(error))
    return ParamsError("; ".join(f"{source}: {'; '.join(problems)}" for source, problems in by_source.items()))


def validate(params: dict, sources: list[tuple[str, dict]] | None = None) -> Params:
    """Every section of `params` checked (missing keys are errors: merge with DEFAULTS first).
    `sources`: (name, the values it stated) in the order applied, for messages."""
    try:
        return Params.model_validate(params)
    except ValidationError as exc:
        raise _error(exc, sources or []) from None


def load_params(path: str | Path | None = None, overrides: dict | None = None) -> Params:
    """Defaults, then the YAML file (if any), then explicit overrides, validated.
    Unknown keys and bad values are a ParamsError naming the key's dotted path and its source."""
    params = copy.deepcopy(DEFAULTS)
    sources: list[tuple[str, dict]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"params file not found: {p}")
        try:
            stated = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:  # one line, like every ParamsError
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ParamsError(f"{p}: not valid YAML{where}: {problem}") from None
        sources.append((str(p), _stated(stated, str(p))))
    if overrides:
        sources.append(("overrides", _stated(overrides, "overrides")))
    for _, stated in sources:
        params = _merge(params, stated)
    return validate(params, sources)


def _stated(values: Any, source: str) -> dict:
    """A params file's or the overrides' top level: a mapping of sections (an empty section,
    e.g. `llm:` with every key commented out, states nothing)."""
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: params must be a mapping of sections, got {type(values).__name__}")
    return {k: {} if v is None else v for k, v in values.items()}


# Settings that change how a run goes, not what it produces: left out of the lineage hash.
# (Rate limits only pace the calls; a budget decides which records are left undone, so it counts.)
RUNTIME_ONLY = {"llm": ("cache_dir", "concurrency", "processes", "timeout_s", "max_retries", "requests_per_minute",
                        "tokens_per_minute"),
                "io": ("batch_rows", "part_mb"),
                "prefect": ("batch_size", "retries", "retry_backoff_s", "retry_jitter", "task_runner", "dask_address",
                            "dask_workers", "result_storage")}


def params_hash(params: Params, leave_out: dict[str, tuple[str, ...]] | None = None) -> str:
    """sha256 (12 hex) of the canonical JSON of `params` without review, the RUNTIME_ONLY settings
    and `leave_out` (section -> keys)."""
    excluded: dict[str, Any] = {"review": True}
    for section, keys in (*RUNTIME_ONLY.items(), *(leave_out or {}).items()):
        excluded[section] = {*excluded.get(section, ()), *keys}
    chosen = params.model_dump(mode="json", exclude=excluded)
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]
