"""Passkey retrieval: a random number hidden at a given depth of a long haystack.

The prompt is completion-style, like the compression papers' needle prompt
(reference-eval.md B.2): instruction, haystack with the needle sentence, then the question, and the
answer is read from what the model writes next. Lengths are in tokens of the model's tokenizer and
are met to within a few tokens; the needle goes in at the requested depth of the haystack, moved
back to the nearest sentence end.
"""

from __future__ import annotations

import random

from harness.tasks import checks
from harness.tasks.base import Sample, Task
from harness.tasks.haystack import check_haystack_task, haystack_data_identity, load_haystack

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_PREFIX = " The pass key is"


def _sentence_start(tokens: list[int], index: int, tokenizer) -> int:
    """Move ``index`` back until the token before it ends a sentence (a period)."""
    while index > 0 and not tokenizer.decode(tokens[index - 1:index]).rstrip().endswith("."):
        index -= 1
    return index


def build_prompt(tokenizer, haystack_tokens: list[int], context_length: int, depth: float, key: str,
                 count_tokens) -> str:
    """Prompt text whose model input (``count_tokens(text)``: chat template and answer prefix
    included) is ``context_length`` tokens, with the needle at ``depth`` percent of the haystack."""
    needle = NEEDLE.format(key=key)
    budget = context_length - count_tokens(INSTRUCTION + needle + QUESTION)
    text = ""
    for _ in range(4):  # re-tokenising the joined text shifts the length by a few tokens: correct it
        if budget <= 0:   # known only once the tokenizer measures the frame
            raise checks.ConfigError(f"task.context_lengths: {context_length} tokens is too short for the passkey "
                                     f"frame ({context_length - budget} tokens with this model's tokenizer); fix: "
                                     f"lengths of at least {context_length - budget + 32}")
        hay = haystack_tokens[:budget]
        cut = len(hay) if depth >= 100 else _sentence_start(hay, int(len(hay) * depth / 100), tokenizer)
        text = INSTRUCTION + tokenizer.decode(hay[:cut]) + needle + tokenizer.decode(hay[cut:]) + QUESTION
        error = count_tokens(text) - context_length
        if error == 0:
            break
        budget -= error
    return text


def build_samples(cfg, tokenizer, count_tokens=None, **_) -> list[Sample]:
    """One sample per (repeat, length, depth). ``count_tokens(prompt_text)`` gives the length of
    the model input the runner will build (defaults to the raw prompt + answer prefix with BOS)."""
    if count_tokens is None:
        def count_tokens(text):
            return len(tokenizer(text + ANSWER_PREFIX).input_ids)
    lengths = [int(x) for x in cfg.context_lengths]
    depths = [float(x) for x in cfg.depths]
    haystack = load_haystack(cfg.haystack, cfg.get("haystack_dir"), min_chars=max(lengths) * 8)
    haystack_tokens = tokenizer(haystack, add_special_tokens=False).input_ids
    rng = random.Random(int(cfg.seed))
    samples = []
    for repeat in range(int(cfg.samples_per_cell)):
        for length in lengths:
            for depth in depths:
                key = str(rng.randint(10000, 99999))
                prompt = build_prompt(tokenizer, haystack_tokens, length, depth, key, count_tokens)
                samples.append(Sample(id=f"len{length}_depth{depth:g}_r{repeat}", prompt=prompt, answers=[key],
                                      max_new_tokens=int(cfg.max_new_tokens), answer_prefix=ANSWER_PREFIX,
                                      question_start=len(prompt) - len(QUESTION),
                                      meta={"context_length": length, "depth": depth}))
    return samples


def validate(cfg) -> None:
    """Before the model loads: every task setting (``cfg`` is the whole run config)."""
    task = cfg.task
    limit, why = checks.model_limit(cfg)
    checks.int_list("task.context_lengths", task.get("context_lengths"), minimum=16, maximum=limit, maximum_why=why)
    checks.percent_list("task.depths", task.get("depths"))
    checks.positive_int("task.samples_per_cell", task.samples_per_cell)
    check_haystack_task(task)


data_identity = haystack_data_identity


def score(prediction: str, answers: list[str]) -> float:
    """1.0 if the passkey's digits appear in the prediction."""
    return float(any(a in prediction for a in answers))


def scores(prediction: str, sample: Sample) -> dict:
    return {"score": score(prediction, sample.answers)}


TASK = Task(name="passkey", validate=validate, data_identity=data_identity, build_samples=build_samples,
            scores=scores, answer_prefix=ANSWER_PREFIX)
