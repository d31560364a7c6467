"""RULER's question answering tasks ``qa_1`` (SQuAD v2 dev) and ``qa_2`` (HotpotQA dev distractor)
(reference-ruler.md section 1.6.4; RULER scripts/data/synthetic/qa.py at c3f5e3b, and at e40fae1 for
``ruler_2024``).

Sample i asks question i (in file order; SQuAD: the answerable ones) over ``size`` documents: its own
(SQuAD: its paragraph; HotpotQA: its up to 10 context paragraphs), then SQuAD's other paragraphs of the
same article, then a random sample of the rest of the corpus; the documents are shuffled with a fresh
``Random(seed)`` (so the gold document sits at the same slot for a given size) and numbered from 1.
``ruler_head`` cycles the sorted corpus when the size reaches it; ``ruler_2024`` caps the size at the
corpus.

Deviation (named ``qa_2024_no_corpus_mutation``): at the 2024 cap RULER shuffled its global document
list in place, so later samples' document indices pointed at other documents; here the whole corpus is
shuffled as a copy. Only a length above the whole corpus reaches this (SQuAD dev: about 150K tokens).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from harness.ruler.fitting import HEAD, Prompt, Streams
from harness.ruler.tasks import QATask

TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
            "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
            "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
ANSWER_PREFIX = " Answer:"
DOCUMENT = "Document {i}:\n{document}"


@dataclass(frozen=True)
class Question:
    """One question: its text, gold answers, own document ids and (SQuAD) its article's other paragraphs."""
    query: str
    outputs: tuple[str, ...]
    documents: tuple[int, ...]
    more_documents: tuple[int, ...] = ()


@dataclass(frozen=True)
class QAData:
    """A QA corpus: the questions, the sorted unique documents, and the file's name and sha256."""
    questions: tuple[Question, ...]
    documents: tuple[str, ...]
    file: str
    sha256: str


def _parse_squad(data: dict) -> tuple[list[Question], list[str]]:
    documents = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
    ids = {document: i for i, document in enumerate(documents)}
    questions = []
    for article in data["data"]:
        article_ids = [ids[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            own = ids[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    questions.append(Question(qa["question"], tuple(a["text"] for a in qa["answers"]), (own,),
                                              tuple(i for i in article_ids if i != own)))
    return questions, documents


def _parse_hotpotqa(data: list) -> tuple[list[Question], list[str]]:
    def text(title, sentences):
        return f"{title}\n{''.join(sentences)}"
    documents = sorted({text(title, sentences) for item in data for title, sentences in item["context"]})
    ids = {document: i for i, document in enumerate(documents)}
    questions = [Question(item["question"], (item["answer"],),
                          tuple(ids[text(title, sentences)] for title, sentences in item["context"])) for item in data]
    return questions, documents


def load_qa(dataset: str, path: str | Path) -> QAData:
    """The corpus of ``dataset`` (``squad``: SQuAD v2 dev json; ``hotpotqa``: HotpotQA dev distractor
    json) read from ``path``, as RULER's ``read_squad`` / ``read_hotpotqa``. Cached per path, size and
    mtime. ``ValueError`` for a missing or unreadable file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"the {dataset} file {str(file)!r} does not exist; fix: download it on a machine with internet "
                         "(RULER scripts/data/synthetic/json/download_qa_dataset.sh) and give its path")
    stat = file.stat()
    return _load(dataset, str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(dataset: str, file: str, size: int, mtime: int) -> QAData:
    raw = Path(file).read_bytes()
    try:
        data = json.loads(raw)
        questions, documents = (_parse_squad if dataset == "squad" else _parse_hotpotqa)(data)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{file}: not a {dataset} json as RULER reads it ({type(error).__name__}: {error}); fix: give "
                         f"the official {'SQuAD v2.0 dev' if dataset == 'squad' else 'HotpotQA dev distractor'} file") from None
    return QAData(tuple(questions), tuple(documents), Path(file).name, hashlib.sha256(raw).hexdigest())


class QuestionAnswering:
    """Builds qa prompts with ``size`` documents. ``increment`` 10 documents; search probes ask question 0;
    ``ruler_2024`` caps the size at the corpus."""

    cap_after_step = True       # 2024: the size is capped after the step (qa.py e40fae1)

    def __init__(self, task: QATask, length: int, streams: Streams, version: str, data: QAData):
        self.task, self.streams, self.version, self.data = task, streams, version, data
        self.increment = self.probe_size = 10
        self.cap = len(data.documents) if version != HEAD else None

    def upper_bound(self, length: int, tokens_per_unit: float) -> int:
        """The binary search's upper end: three times the estimated size."""
        return max(int((length / tokens_per_unit) * 3), self.increment * 2)

    def gold_suffix(self, outputs: list[str]) -> str:
        """What RULER 2024's search appends when counting: a space and the Python repr of the gold list."""
        return f" {outputs}"

    def _documents(self, question: Question, size: int) -> list[str]:
        corpus = self.data.documents
        if size >= len(corpus):
            if self.version == HEAD:
                return (list(corpus) * (-(-size // len(corpus))))[:size]
            return list(corpus)
        own, more = list(question.documents), list(question.more_documents)
        if size - len(own) > len(more):
            taken = set(own + more)
            rest = [i for i in range(len(corpus)) if i not in taken]
            chosen = own + more + self.streams.py.sample(rest, max(0, size - len(own) - len(more)))
        else:
            chosen = own + self.streams.py.sample(more, size - len(own))
        return [corpus[i] for i in chosen]

    def build(self, size: int, index: int | None = None) -> Prompt:
        """The prompt for question ``index`` (0 for a search probe) over ``size`` documents."""
        question = self.data.questions[0 if index is None else index]
        documents = self._documents(question, size)
        self.streams.fresh().shuffle(documents)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=document) for i, document in enumerate(documents))
        return Prompt(TEMPLATE.format(context=context, query=question.query), ANSWER_PREFIX, list(question.outputs))
