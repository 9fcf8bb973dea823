"""Prefect tasks: thin wrappers around agenther's stage functions.

stages.py  the batch tasks and the per-stage runners the flow calls
caching.py cache keys (input content + stage params + code and prompt versions)
retry.py   which failures are transient (retried) and which are final
dask.py    the flow on a Dask cluster: task runner, LLM clients on workers, cluster-wide limits
"""
