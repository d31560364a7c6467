"""Tasks: each builds samples (prompt text + reference answers) and scores a prediction."""

from dataclasses import dataclass, field


@dataclass
class Sample:
    id: str
    prompt: str                 # the user-facing prompt text (before any chat template)
    answers: list[str]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    answer_prefix: str = ""     # text the assistant turn starts with (completion-style prompts)
    group: str | None = None    # results file: <group>.jsonl (LongBench: the dataset); None: predictions.jsonl
    dataset: str | None = None  # the name the protocol's per-dataset rules use (LongBench's base name; None: default)


TASKS = ("passkey", "needle", "longbench")


def get_task(name: str):
    if name == "passkey":
        from harness.tasks import passkey
        return passkey
    if name == "needle":
        from harness.tasks import needle
        return needle
    if name == "longbench":
        from harness.tasks import longbench
        return longbench
    from methods import ConfigError
    raise ConfigError(f"task={name!r} is not one of {TASKS}; fix: task=passkey, task=needle or task=longbench")
