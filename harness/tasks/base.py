"""What a task is: the ``Sample`` it builds and the ``Task`` the runner knows it through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Sample:
    """One model input and what it is scored against."""
    id: str
    prompt: str                 # the user-facing prompt text (before any chat template)
    answers: list[str]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    answer_prefix: str = ""     # text the assistant turn starts with (completion-style prompts)
    group: str | None = None    # results file: <group>.jsonl (LongBench: the dataset); None: predictions.jsonl
    dataset: str | None = None  # the name the protocol's per-dataset rules use (LongBench's base name; None: default)
    question_start: int | None = None   # character offset in ``prompt`` where the question begins (what
    #                                     compression_scope=context appends uncompressed); None: no split


@dataclass(frozen=True)
class Task:
    """A benchmark as the runner sees it (the only interface it uses; registered in ``harness.tasks``).

    ``validate(cfg)``: every check of the full config that needs no model (``ConfigError``).
    ``data_identity(task_cfg) -> dict``: what identifies the task's data for the run identity.
    ``build_samples(task_cfg, tokenizer, count_tokens, max_input_tokens=..., truncation=...) -> [Sample]``:
    ``count_tokens(prompt) -> int`` measures a prompt as the runner will encode it.
    ``scores(prediction, sample) -> dict``: at least ``{"score": float}`` (0-100), written into the row.
    ``answer_prefix``: text the assistant turn starts with (the runner measures prompts with it).
    Optional: ``checksums(task_cfg) -> {file: sha256}`` (the manifest's ``data_sha256``), ``environment()
    -> dict`` (the manifest's ``scorer``), ``finalize(folder) -> dict`` (a run's final scores after a run, the fields of its ``scores.json`` in
    place of the mean ``score``: LongBench's per-dataset scores and averages,
    into ``scores.json``'s ``datasets``), ``records(samples) -> dict`` (the manifest's ``generated``: how
    generated samples were made, e.g. RULER's per task and length), ``evaluate(task_cfg, lm, sample) -> dict``
    (a task scored without generating, e.g. perplexity: the row's fields in place of a generation).
    """
    name: str
    validate: Callable
    data_identity: Callable
    build_samples: Callable
    scores: Callable
    answer_prefix: str = ""
    checksums: Callable | None = None
    environment: Callable | None = None
    finalize: Callable[[Path], dict] | None = None
    records: Callable | None = None
    evaluate: Callable | None = None
