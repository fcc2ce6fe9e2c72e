"""Prefect tasks: thin wrappers that run one pipeline stage or one workspace operation."""
