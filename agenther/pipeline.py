"""The whole pipeline in one process: ingest -> classify -> extract -> relabel -> verify -> package.

The same file-to-file stages that `dvc repro` and the Prefect flow run (agenther/stages.py),
here one after the other with one set of LLM clients (one local model server) for the run.
Relabel and verify run fused (`stages.stage_relabel_verify`: each record is judged as soon
as its relabel passes, no barrier between the two stages; the same tables) unless the run
has an LLM budget: then relabel finishes before verify starts, so the records a spent budget
leaves undone are the ones `agenther stage` / `dvc repro` leave undone.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from agenther.providers import LLMs
from agenther.stages import STAGES, run_stage, stage_relabel_verify


def fuse_relabel_verify(llms: LLMs) -> bool:
    """Whether relabel and verify may run as one pass: always, except under an LLM budget."""
    return not llms.budget.limited


def run(params: dict, out_dir: str | Path, llms: LLMs | None = None) -> dict:
    """Run every stage with out_dir as both the work folder and the output folder.
    Returns the run summary (also written to out_dir/summary.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        llms = llms or stack.enter_context(LLMs.from_params(params))
        fused = fuse_relabel_verify(llms)
        for name in STAGES:
            if fused and name == "relabel":
                stage_relabel_verify(params, out, llms)
            elif not (fused and name == "verify"):
                result = run_stage(name, params, out, out, llms)
        return result
