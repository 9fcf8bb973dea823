"""The pipeline's stages, each one record: what it reads and writes, which params it reads, whether
it asks the LLM, and the function that does it. Everything that needs a fact about a stage reads it
here: the runner (agenther/runner.py: which function, which tables, how its input is counted), the
work folder's stats and stamps (agenther/workdir.py), the Prefect flow and its cache keys (flows/,
tasks/caching.py), dvc.yaml's deps and params (tests/test_layout.py checks them against these
records), the incremental rounds (agenther/rounds.py), the run summary and the report.

    logs ─ingest─▶ trajectories ─classify─▶ classified ─extract─▶ extracted ─relabel─▶ relabeled
         ─verify─▶ verified ─package─▶ the output folder (sft / dpo / sharegpt and the consumers' files)

Standard library only: agenther/workdir.py reads these records on a warm rerun, which must not import
the stages' libraries. So a record names its function as an entry point does ("module:attribute",
the way a plugin would register one) and `Stage.load()` imports it when the stage runs; importing
every stage's module here would make every stage's code a dependency of every other stage (dvc.yaml).

A table stage's function is `step(batch, params, llms) -> StageOutput`: one batch of its input table
(`reads[0]`) in, its kept rows and its rejections out (`llms`: the run's clients, a per-batch view;
None when the stage asks no LLM with these params). Ingest's function writes the logs into its tables
(`(params, work) -> stats`); package's writes the output folder (`(params, work, out, llms, spread) ->
summary`, `spread(fn, jobs)`: the executor runs its shards, agenther/stages/packaging.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # this module imports the standard library only
    from agenther.params import Params


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:attribute", imported by load() when the stage runs
    reads: tuple[str, ...]  # the work tables it reads (workdir.TABLES keys); a table stage: its input first
    writes: tuple[str, ...]  # the work tables it writes; a table stage: kept, then <name>_rejected if it rejects
    sections: tuple[str, ...]  # the params sections its output depends on (besides `llm`, see `llm`)
    llm: Literal["never", "by_mode", "always"] = "never"  # by_mode: when params' <name>.mode is "llm"
    stats: str | None = None  # its stats file in the work folder (package writes summary.json instead)
    counted: str | None = None  # a boolean column of its input: only those rows count as its input
    batched: bool = False  # runs batch by batch over reads[0] (the runner's loop), else one call

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]

    @property
    def kept(self) -> str:
        return self.writes[0]

    @property
    def rejects(self) -> bool:
        return f"{self.name}_rejected" in self.writes

    def uses_llm(self, params: Params) -> bool:
        return self.llm == "always" or (self.llm == "by_mode" and getattr(params, self.name).mode == "llm")

    def params_read(self, params: Params) -> tuple[str, ...]:
        """The sections this run of the stage reads: its own, and `llm` when it asks the LLM."""
        return self.sections + (("llm",) if self.uses_llm(params) and "llm" not in self.sections else ())

    def load(self) -> Any:
        return load(self.function)


def load(function: str) -> Any:
    """The object an entry-point-style reference ("module:attribute") names, its module imported now."""
    module, _, attribute = function.partition(":")
    return getattr(importlib.import_module(module), attribute)


# Which params sections package's output depends on: every sample's lineage carries params_hash over
# every section but the run-only ones (params.RUNTIME_ONLY; io and prefect say how a run goes, review
# how people check it).
LINEAGE = ("ingest", "classify", "extract", "relabel", "verify", "replay", "tools", "package", "gates", "llm")

PIPELINE = (
    Stage("ingest", "agenther.stages.ingest:write_tables", reads=(), writes=("trajectories", "quarantine"),
          sections=("ingest",), stats="00_ingest.json"),
    Stage("classify", "agenther.stages.classify:step", reads=("trajectories",), writes=("classified",),
          sections=("classify",), llm="by_mode", stats="01_classify.json", batched=True),
    Stage("extract", "agenther.stages.extract:step", reads=("classified",), writes=("extracted", "extract_rejected"),
          sections=("extract", "tools"), llm="by_mode", stats="02_extract.json", counted="is_failure", batched=True),
    Stage("relabel", "agenther.stages.relabel:step", reads=("extracted",), writes=("relabeled", "relabel_rejected"),
          sections=("relabel", "tools"), llm="always", stats="03_relabel.json", batched=True),
    Stage("verify", "agenther.stages.verify:step", reads=("relabeled",), writes=("verified", "verify_rejected"),
          sections=("verify", "replay", "tools"), llm="always", stats="04_verify.json", batched=True),
    Stage("package", "agenther.stages.package:package_run",
          reads=("classified", "verified", "extract_rejected", "relabel_rejected", "verify_rejected"), writes=(),
          sections=LINEAGE),
)
STAGES = {s.name: s for s in PIPELINE}
NAMES = tuple(STAGES)
LLM_STAGES = tuple(s.name for s in PIPELINE if s.llm != "never")  # the stages whose stats carry LLM usage
FUSED = ("relabel", "verify")  # may run as one pass (agenther/runner.py): each record judged once relabeled
FUSED_STEP = "agenther.stages.verify:relabel_verify"  # that pass: (batch, params, llm, judge, workers) -> (relabel's, verify's)


# How a whole-run stage's shards run: spread(fn, jobs) -> fn(job) per job, results in order (an
# executor's, or in_process).
Spread = Callable[[Callable[[Any], Any], list], Iterable[Any]]


def in_process(fn: Callable[[Any], Any], jobs: list) -> Iterator[Any]:
    """fn(job) for each job, one after another in this process, results in order: how a stage's shards
    run when no executor spreads them (agenther.runner.LocalExecutor.spread)."""
    return (fn(job) for job in jobs)


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(NAMES)}")
    return STAGES[name]
