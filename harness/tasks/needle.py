"""Needle-in-a-Haystack, as the KV-compression papers run it.

Construction (gkamradt/LLMTest_NeedleInAHaystack ``needlehaystack``, KVCache-Factory
``run_needle_in_haystack.py``; reference-eval.md B.1-B.2, reference-methods.md section 5):
1. tokenize the haystack (no special tokens) and trim it to ``context_length`` tokens;
2. leave a ``buffer`` of 200 tokens for the prompt frame: the context is ``context_length - buffer``
   tokens, needle included (the haystack is cut to make room for the needle);
3. insert the needle at ``int(len * depth / 100)``, moved back until the token before it ends a
   sentence (a period); at depth 100 it is appended at the end;
4. decode and wrap in the completion-style prompt of the compression papers (no chat template):
   ``<|im_start|> This is a very long story book: <book> {context} </book>.\\n Based on the content of
   the book, Question: {question}\\nAnswer:``. The protocol's ``chat_template`` rule decides whether
   it is sent raw (``dynamickv_paper``: never) or as the user turn of the model's chat template
   (``default``: auto; the small instruct models here answer only then).
Greedy, 30 new tokens, stop at the first newline; the response is stripped.

Needle presets: ``san_francisco`` (the original needle, the completion question and its expected
answer) and ``passkey`` (a random number per cell). Depths: ``linear`` (``round(linspace(0, 100,
N))``, the papers' 0, 11, ..., 100 for N = 10) or ``sigmoid`` (the original's logistic spacing).
Scores stored per cell: the papers' plotted word recall (``score``), ROUGE-1 and exact match.
"""

from __future__ import annotations

import math
import random

from harness.tasks import checks, needle_scores
from harness.tasks.base import Sample, Task
from harness.tasks.haystack import check_haystack_task, haystack_data_identity, load_haystack

PAPER_PROMPT = ("<|im_start|> This is a very long story book: <book> {context} </book>.\n"
                " Based on the content of the book, Question: {question}\nAnswer:")
ANSWER_PREFIX = ""
QUESTION_INTRO = " Based on the content of the book"   # the question part (compression_scope=context) starts here
PRESETS = {
    "san_francisco": {"needle": needle_scores.NEEDLE, "question": needle_scores.QUESTION,
                      "expected": needle_scores.EXPECTED_ANSWER},
    "passkey": {"needle": "\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                "question": "What is the pass key? The pass key is", "expected": "{key}"},
}


#: ``task.depth_grid.kind``
DEPTH_GRID_KINDS = ("linear", "sigmoid")


def context_lengths(cfg) -> list[int]:
    """``task.context_lengths`` (a list), else ``task.context_range`` inclusive of ``stop``
    (``arange(start, stop + 1, step)`` as KVCache-Factory)."""
    if cfg.get("context_lengths") is not None:
        spec = cfg.context_lengths
        return [int(spec)] if isinstance(spec, (int, float)) else [int(x) for x in spec]
    spec = cfg.context_range
    return list(range(int(spec.start), int(spec.stop) + 1, int(spec.step)))


def depth_percents(kind: str, count: int) -> list[float]:
    if count < 1:
        raise ValueError(f"task.depths.count={count} must be >= 1")
    if count == 1:
        return [0.0]
    grid = [100 * i / (count - 1) for i in range(count)]
    if kind == "linear":
        return [float(round(x)) for x in grid]
    if kind == "sigmoid":  # gkamradt: logistic(x; L=100, x0=50, k=0.1), endpoints kept at 0 and 100
        values = [round(100 / (1 + math.exp(-0.1 * (x - 50))), 3) for x in grid]
        values[0], values[-1] = 0.0, 100.0
        return values
    raise ValueError(f"task.depths.kind={kind!r} is not one of {DEPTH_GRID_KINDS}")


def depths(cfg) -> list[float]:
    """``task.depths`` (a list of percents), else ``task.depth_grid`` (kind, count)."""
    if cfg.get("depths") is not None:
        return [float(x) for x in cfg.depths]
    return depth_percents(cfg.depth_grid.kind, int(cfg.depth_grid.count))


def ends_sentence(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).rstrip().endswith(".")


def insert_needle(tokenizer, haystack_tokens: list[int], needle_tokens: list[int], context_length: int,
                  depth: float, buffer: int) -> list[int]:
    """Token list of exactly ``context_length - buffer`` tokens: the haystack with the needle at
    ``depth`` percent, moved back to a sentence start."""
    size = context_length - buffer
    if size <= len(needle_tokens):
        raise checks.ConfigError(f"task.context_lengths: {context_length} leaves no room for the needle "
                                 f"({len(needle_tokens)} tokens) after the {buffer}-token buffer; fix: lengths of at "
                                 f"least {buffer + len(needle_tokens) + 32}")
    if len(haystack_tokens) < size - len(needle_tokens):
        raise checks.ConfigError(f"the haystack has {len(haystack_tokens)} tokens, fewer than context_length="
                                 f"{context_length}; fix: a larger task.haystack_dir or shorter task.context_lengths")
    hay = haystack_tokens[: size - len(needle_tokens)]
    if depth >= 100:
        return hay + needle_tokens
    point = int(len(hay) * depth / 100)
    while point > 0 and not ends_sentence(tokenizer, hay[point - 1]):
        point -= 1
    return hay[:point] + needle_tokens + hay[point:]


def build_samples(cfg, tokenizer, count_tokens=None, **_) -> list[Sample]:
    if cfg.needle not in PRESETS:
        raise ValueError(f"task.needle={cfg.needle!r} is not one of {sorted(PRESETS)}")
    preset = PRESETS[cfg.needle]
    lengths = context_lengths(cfg)
    haystack = load_haystack(cfg.haystack, cfg.get("haystack_dir"), min_chars=max(lengths) * 8)
    haystack_tokens = tokenizer(haystack, add_special_tokens=False).input_ids
    rng = random.Random(int(cfg.seed))
    samples = []
    for length in lengths:
        for depth in depths(cfg):
            key = str(rng.randint(10000, 99999))
            needle = preset["needle"].format(key=key)
            needle_tokens = tokenizer(needle, add_special_tokens=False).input_ids
            context = insert_needle(tokenizer, haystack_tokens, needle_tokens, length, depth, int(cfg.buffer))
            prompt = PAPER_PROMPT.format(context=tokenizer.decode(context, skip_special_tokens=True),
                                         question=preset["question"])
            samples.append(Sample(id=f"len{length}_depth{depth:g}", prompt=prompt,
                                  question_start=prompt.rindex(QUESTION_INTRO),
                                  answers=[preset["expected"].format(key=key)],
                                  max_new_tokens=int(cfg.max_new_tokens),
                                  meta={"context_length": length, "depth": depth, "needle": needle.strip(),
                                        "context_tokens": len(context)}))
    return samples


def validate(cfg) -> None:
    """Before the model loads: every task setting (``cfg`` is the whole run config)."""
    task = cfg.task
    if task.get("needle") not in PRESETS:
        raise checks.ConfigError(f"task.needle={task.get('needle')!r} is not one of {sorted(PRESETS)}; fix: "
                                 "task.needle=san_francisco (the original needle) or passkey")
    buffer = task.buffer
    if not checks._is_int(buffer) or buffer < 0:
        raise checks.ConfigError(f"task.buffer={buffer!r} must be an integer >= 0 (tokens left for the prompt frame)")
    if task.get("context_lengths") is None:
        spec = task.get("context_range")
        keys = ("start", "stop", "step")
        if spec is None or any(not checks._is_int(spec.get(k)) or spec.get(k) < 1 for k in keys) \
                or spec.start > spec.stop:
            raise checks.ConfigError(f"task.context_range={spec!r} needs positive integers start <= stop and step; "
                                     "fix: e.g. task.context_range={start: 1000, stop: 8000, step: 1000}, or "
                                     "task.context_lengths=[1000,2000]")
    limit, why = checks.model_limit(cfg)
    checks.int_list("task.context_lengths", context_lengths(task), minimum=buffer + 32, maximum=limit, maximum_why=why)
    if task.get("depths") is not None:
        checks.percent_list("task.depths", task.depths)
    else:
        grid = task.get("depth_grid") or {}
        if grid.get("kind") not in DEPTH_GRID_KINDS:
            raise checks.ConfigError(f"task.depth_grid.kind={grid.get('kind')!r} is not one of {DEPTH_GRID_KINDS}")
        checks.positive_int("task.depth_grid.count", grid.get("count"))
    check_haystack_task(task)


data_identity = haystack_data_identity


def postprocess(text: str) -> str:
    """Stop at the first newline (the papers stop generation on it) and strip."""
    return text.strip().split("\n")[0].strip()


def scores(prediction: str, sample: Sample) -> dict:
    response = postprocess(prediction)
    expected = sample.answers[0]
    return {"score": needle_scores.needle_word_recall(response, expected),
            "word_recall_normalized": needle_scores.needle_word_recall(response, expected, normalize=True),
            "rouge1_f": needle_scores.rouge1(response, sample.meta["needle"])["f"],
            "exact_match": needle_scores.exact_match(response, expected.rstrip("."))}


def score(prediction: str, answers: list[str]) -> float:
    return needle_scores.needle_word_recall(postprocess(prediction), answers[0])


TASK = Task(name="needle", validate=validate, data_identity=data_identity, build_samples=build_samples,
            scores=scores, answer_prefix=ANSWER_PREFIX)
