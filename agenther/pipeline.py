"""The whole pipeline in one process: ingest -> classify -> extract -> relabel -> verify -> package.

The same file-to-file stages that `dvc repro` and the Prefect flow run (agenther/runner.py),
here one after the other with one set of LLM clients (one local model server) for the run.
Relabel and verify run fused (`runner.run_stages(fuse=True)`: each record is judged as soon
as its relabel passes, no barrier between the two stages; the same tables) unless the run
has an LLM budget: then relabel finishes before verify starts, so the records a spent budget
leaves undone are the ones `agenther stage` / `dvc repro` leave undone.

A stage that is up to date (its stamp matches: agenther/workdir.py) is skipped. The stages
up to date at the start are checked from the work folder alone, and agenther.runner (with the
libraries the stages use) is imported only when one has to run: a rerun on which every stage
is up to date reads stamps and digests files, and returns the summary package wrote.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from agenther.llm import LLMs
from agenther.params import Params
from agenther.workdir import STAGES, unchanged_stage


def fuse_relabel_verify(llms: LLMs) -> bool:
    """Whether relabel and verify may run as one pass: always, except under an LLM budget."""
    return not llms.budget.limited


def run(params: Params, out_dir: str | Path, llms: LLMs | None = None) -> dict:
    """Run every stage with out_dir as both the work folder and the output folder.
    Returns the run summary (also written to out_dir/summary.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(STAGES):
        result = unchanged_stage(name, params, out, out)
        if result is None:
            with ExitStack() as stack:
                return _run_stages(STAGES[i:], params, out, llms or stack.enter_context(LLMs.from_params(params)))
    return result  # every stage was up to date: package's summary


def _run_stages(names: tuple[str, ...], params: Params, out: Path, llms: LLMs) -> dict:
    from agenther.runner import run_stages

    return run_stages(names, params, out, out, llms, fuse=fuse_relabel_verify(llms))["package"]
