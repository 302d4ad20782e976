"""Thin Prefect tasks over cllm_core functions: resolve paths, call one function, log, return a summary."""
