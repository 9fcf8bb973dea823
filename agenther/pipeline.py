"""The whole pipeline in one process: ingest -> classify -> extract -> relabel -> verify -> package.

The same file-to-file stages that `dvc repro` and the Prefect flow run (agenther/stages.py),
here one after the other with one set of LLM clients (one local model server) for the run.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from agenther.providers import LLMs
from agenther.stages import STAGES, run_stage


def run(params: dict, out_dir: str | Path, llms: LLMs | None = None) -> dict:
    """Run every stage with out_dir as both the work folder and the output folder.
    Returns the run summary (also written to out_dir/summary.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        llms = llms or stack.enter_context(LLMs.from_params(params))
        for name in STAGES:
            result = run_stage(name, params, out, out, llms)
        return result
