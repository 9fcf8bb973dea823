"""agenther: hindsight relabeling of failed LLM-agent trajectories into training data."""

import os

__version__ = "0.1.0"

# No phoning home from any tool we drive (see STACK.md). setdefault: a user may override.
for _key, _value in {
    "DVC_NO_ANALYTICS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}.items():
    os.environ.setdefault(_key, _value)
