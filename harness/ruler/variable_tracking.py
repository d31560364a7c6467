"""RULER's variable tracking task ``vt`` (reference-ruler.md section 1.6.1; RULER
scripts/data/synthetic/variable_tracking.py at c3f5e3b, and at e40fae1 for ``ruler_2024``).

A chain ``VAR X1 = n``, ``VAR X2 = VAR X1 ``, ... (five names of five uppercase letters) hidden among
noise paragraphs; the gold is the five names. Every prompt starts with a one-shot example: a complete
small sample (3-letter names) with its answer, built first from the same random stream at a budget of
500 tokens with the bare task template (no chat wrapper), as RULER does.

* ``ruler_head``: the example is built with value ``12345`` and no generation allowance, and for each
  sample its five names and the value are replaced by fresh random ones; it precedes the task text
  followed by a newline. Noise paragraphs are joined by newlines.
* ``ruler_2024``: one fixed example (random value), whose task template had its whitespace collapsed and
  its last word (``above.``, the word before the answer prefix under the ``base`` wrapper) dropped, is
  inserted as ``" " + example + "\\n\\n"``; noise paragraphs end with a newline and are joined by spaces;
  the answer prefix has RULER's typo ``assgined``.

Deviations (named): ``vt_distinct_names``: a duplicate name draw (probability about 1e-6; 6e-4 for the
3-letter example) keeps the first five distinct names, where RULER's code fails and retries the sample;
``vt_example_bare_count``: the example's tokens are counted as ``count_tokens(text, "") -
count_tokens("", "")`` (RULER tokenizes it bare); ``vt_2024_assembled_check``: ``ruler_2024`` checks the
assembled prompt against the budget, where RULER summed the separately tokenized example and prompt.
"""

from __future__ import annotations

import string

from harness.ruler.fitting import HEAD, Count, Prompt, Streams, TooShort, build_within, fit
from harness.ruler.niah import NOISE
from harness.ruler.tasks import VariableTrackingTask

TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above.")
ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                 "are assigned the value {query}, they are: ")
ANSWER_PREFIX_2024 = ANSWER_PREFIX.replace("assigned the value {query}, they", "assgined the value {query}, they")
EXAMPLE_LENGTH = 500
EXAMPLE_VALUE = "12345"


class VariableTracking:
    """Builds vt prompts with ``size`` noise paragraphs. ``increment``: 10 (``ruler_head``: 5 below 4096
    tokens); 5 for the one-shot example. ``example``: the one-shot text inserted before every sample
    (``build(size, index)`` with an index); search probes (``index=None``) leave it out, and the search
    reserves its tokens instead, as RULER."""

    cap = None
    cap_after_step = False

    def __init__(self, task: VariableTrackingTask, length: int, streams: Streams, version: str,
                 example: str | None = None, example_mode: bool = False):
        self.task, self.streams, self.version = task, streams, version
        self.example, self.example_mode = example, example_mode
        if example_mode:
            self.increment = 5
        else:
            self.increment = 5 if version == HEAD and length < 4096 else 10
        self.probe_size = self.increment
        self.template = TEMPLATE
        self.answer_prefix = ANSWER_PREFIX if version == HEAD else ANSWER_PREFIX_2024
        if example_mode and version != HEAD:
            # RULER 2024 cut the chat wrapper off the template by dropping its last word; with the base
            # wrapper that word is the question's "above."
            self.template = " ".join(TEMPLATE.split()[:-1])

    def upper_bound(self, length: int, tokens_per_unit: float) -> int:
        """The binary search's upper end: three times the estimated size."""
        return max(int((length / tokens_per_unit) * 3), self.increment * 2)

    def gold_suffix(self, outputs: list[str]) -> str:
        """What RULER 2024's search appends when counting: a space and the Python repr of the name list."""
        return f" {outputs}"

    def _chains(self) -> tuple[list[list[str]], list[list[str]]]:
        task, rng = self.task, self.streams.py
        letters = 3 if self.example_mode else 5
        hops = min(10, task.num_hops) if self.example_mode else task.num_hops
        needed = (hops + 1) * task.num_chains
        names = ["".join(rng.choices(string.ascii_uppercase, k=letters)) for _ in range(needed)]
        while len(set(names)) < needed:
            names.append("".join(rng.choices(string.ascii_uppercase, k=letters)))
        names = list(dict.fromkeys(names))      # vt_distinct_names
        chain_names, chains = [], []
        for c in range(task.num_chains):
            these = names[c * (hops + 1):(c + 1) * (hops + 1)]
            fixed = self.example_mode and self.version == HEAD
            value = EXAMPLE_VALUE if fixed else str(self.streams.np.randint(10000, 99999))
            chain_names.append(these)
            chains.append([f"VAR {these[0]} = {value}"] + [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)])
        return chain_names, chains

    def _context(self, size: int, chains: list[list[str]]) -> str:
        if self.version == HEAD:
            lines = [NOISE] * size
        else:
            lines = [NOISE + "\n"] * size
            if len(lines) <= len(chains[0]):     # 2024: too few paragraphs, so split them into sentences
                lines = [piece + "." if piece.strip() else piece for paragraph in lines for piece in paragraph.split(".")]
                if len(lines) <= len(chains[0]):
                    chains = [chain[:len(lines) - 1] for chain in chains]
        for chain in chains:
            positions = sorted(self.streams.py.sample(range(len(lines)), len(chain)))
            for j, position in enumerate(positions):
                lines.insert(position + j, chain[j])
        return ("\n" if self.version == HEAD else " ").join(lines).replace(". \n", ".\n")

    def _randomized_example(self) -> str:
        """HEAD (c5341b4): the example's last ``num_hops + 1`` whitespace tokens (its answer names), each
        replaced everywhere by as many random uppercase letters, and ``12345`` by a new random value."""
        example, rng = self.example, self.streams.py
        for name in example.strip().split()[-(self.task.num_hops + 1):]:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return example.replace(EXAMPLE_VALUE, str(self.streams.np.randint(10000, 99999)))

    def build(self, size: int, index: int | None = None) -> Prompt:
        """One prompt with ``size`` noise paragraphs; with an ``index`` (a real sample) the one-shot
        example goes first."""
        names, chains = self._chains()
        value = chains[0][0].split("=")[-1].strip()
        fill = {"context": self._context(size, chains), "query": value, "num_v": self.task.num_hops + 1}
        text = self.template.format(**fill)
        if index is not None and self.example is not None:
            text = (self._randomized_example() + "\n" if self.version == HEAD else " " + self.example + "\n\n") + text
        return Prompt(text, self.answer_prefix.format(**fill), names[0])


def one_shot_example(task: VariableTrackingTask, streams: Streams, version: str, bare_count: Count) -> str:
    """The one-shot example text (the first draws of the stream): a sample fitted to 500 tokens of bare
    text (``ruler_head``: binary search, no generation allowance; ``ruler_2024``: linear search, the
    task's allowance reserved), then its full text + a space + its names joined by spaces + ``"\\n"``
    (``ruler_2024``: ``"\\n\\n"``). Source: RULER variable_tracking.py ``main``."""
    builder = VariableTracking(task, EXAMPLE_LENGTH, streams, version, example_mode=True)
    reserve = 0 if version == HEAD else task.max_new_tokens
    try:
        size = fit(builder, bare_count, EXAMPLE_LENGTH, reserve, version)
        prompt, _, _ = build_within(builder.build, bare_count, EXAMPLE_LENGTH, reserve, size, builder.increment)
    except TooShort as error:
        raise ValueError(f"the vt one-shot example does not fit RULER's {EXAMPLE_LENGTH}-token example budget: "
                         f"{error.size} noise paragraphs give {error.tokens} tokens; count_tokens counts far more "
                         "tokens than a subword tokenizer would; fix: count with the model's tokenizer") from None
    return prompt.input + prompt.answer_prefix + " " + " ".join(prompt.outputs) + ("\n" if version == HEAD else "\n\n")
