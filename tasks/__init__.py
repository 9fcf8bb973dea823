"""Prefect tasks: one per pipeline stage, thin wrappers around agenther's stage functions."""
