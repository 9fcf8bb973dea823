"""Prefect flows: `hindsight` (the pipeline), `watch-logs` (new-log events) and `serve` (deployments)."""
