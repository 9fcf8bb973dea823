"""The `hindsight` flow: logs in, training data out. Parameters mirror params.yaml."""

from __future__ import annotations

from prefect import flow

from agenther.params import load_params
from tasks.stages import run_pipeline


@flow(name="hindsight", log_prints=True)
def hindsight(params_file: str = "params.yaml", out_dir: str = "data/processed") -> dict:
    params = load_params(params_file)
    summary = run_pipeline(params, out_dir)
    print(f"accepted {summary['gates']['passed_judges']} of {summary['gates']['relabels_proposed']} relabels")
    return summary


if __name__ == "__main__":
    hindsight()
