"""Prefect flows, one per stage, and the `cllm` command line: the deployment entrypoints."""
