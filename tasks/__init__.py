"""Workloads built on :mod:`bilevel`: one sub-package per task (data, model, training script)."""
