"""One Prefect task per stage. Each is a thin wrapper: the work is agenther's stage function.

The cache key is built from the content of the task's inputs plus the task's source
(`INPUTS + TASK_SOURCE`): `INPUTS` alone would share entries between different tasks
called with equal inputs (see STACK.md). Per-stage GX gates, batching and S3 pushes are
the next issue's work; this is the shape they hang on.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from agenther.pipeline import run

CACHE = INPUTS + TASK_SOURCE


@task(name="hindsight-pipeline", cache_policy=CACHE, cache_expiration=timedelta(days=30),
      retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, persist_result=True)
def run_pipeline(params: dict, out_dir: str) -> dict:
    """All stages in one task for now (issue 3 splits them into a task each)."""
    return run(params, out_dir)
