"""The judges a verify run can name (params verify.judges), defined once: which model each asks.

`environment` and `rules` judges are deterministic (no LLM call: they run first, so their rejections
cost nothing; `environment`: replayed in the agent's own environment, where one exists);
`main` asks the relabeling model, `judge` the evidence-judge model (llm.judge_model, else the main
one). agenther.stages.verify holds each judge's function under the same name (a test keeps the two
in step); the params model, the run summary's lineage and the report read this table.
"""

from __future__ import annotations

from typing import Literal

ModelRole = Literal["environment", "rules", "main", "judge"]

# In the default order: deterministic judges first.
JUDGE_MODELS: dict[str, ModelRole] = {
    "replay": "environment",  # the agent's own environment replays the sample's writes (agenther.envs)
    "coverage": "rules",
    "grounding": "rules",
    "coherence": "rules",
    "policy": "judge",  # asks the judge model only where the log has no ground truth; by rules otherwise
    "trajectory": "main",
    "evidence": "judge",
}
JUDGE_NAMES = tuple(JUDGE_MODELS)
