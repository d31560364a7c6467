"""Tasks: each builds samples (prompt text + reference answers) and scores a prediction.

A task is a module that defines ``TASK`` (a ``harness.tasks.base.Task``); ``REGISTRY`` maps each
task name (the ``task.name`` of its config, ``conf/task/<name>.yaml``) to that module, imported when
the task is asked for. Adding a task: one module with ``TASK``, one line here, one YAML file and its
schema (``harness/config/schema.py``).

May import: ``harness.longbench``, ``harness.run.results`` (file helpers), ``methods`` (``ConfigError``).
Task modules import ``harness.tasks.base``, never this package's ``__init__``.
"""

from __future__ import annotations

import importlib

from harness.tasks.base import Sample, Task

__all__ = ["REGISTRY", "Sample", "Task", "get_task"]

REGISTRY = {"passkey": "harness.tasks.passkey", "needle": "harness.tasks.needle", "longbench": "harness.tasks.longbench",
            "ruler": "harness.tasks.ruler", "perplexity": "harness.tasks.perplexity"}


def get_task(name: str) -> Task:
    """The registered task ``name``; ``ConfigError`` naming the choices otherwise."""
    if name not in REGISTRY:
        from methods import ConfigError
        raise ConfigError(f"task={name!r} is not one of {sorted(REGISTRY)}; fix: task=<one of them>")
    return importlib.import_module(REGISTRY[name]).TASK
