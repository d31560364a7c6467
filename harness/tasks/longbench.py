"""LongBench v1 and LongBench-E (Bai et al., 2023, arXiv 2308.14508), as its pred.py prepares them.

Data: the official ``<dataset>.jsonl`` files (``<dataset>_e.jsonl`` for LongBench-E), read from
``task.data_dir`` or, with no directory, from the hub dataset ``THUDM/LongBench`` (its ``data.zip``,
at ``task.hub_revision``; ``datasets`` no longer runs the hub's loading script, so the zip's jsonl
is read directly). The prompt templates and generation lengths come from the official config files
(``dataset2prompt.json``, ``dataset2maxlen.json``), read from ``task.config_dir`` or downloaded from
the official repository at ``task.config_commit`` and cached; they are never re-typed here.

Per sample (THUDM/LongBench 2e00731 ``LongBench/pred.py``; reference-eval.md A.5):
* ``prompt = template.format(**row)``;
* middle truncation by tokens to the model's ``max_input_tokens``: tokenize with special tokens; if
  longer, keep the first and last ``int(max / 2)`` tokens, decode each with special tokens skipped and
  join the two strings (the chat template, if any, is applied after this, by the runner);
* greedy, ``dataset2maxlen`` new tokens; samsum also stops at the newline token and generates at
  least one token (``min_length = context + 1``).
The chat template rule (``protocol.chat_template`` and its skip list) is applied by the runner.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import urllib.request
import zipfile
from pathlib import Path

from harness.longbench import jsonl, metrics
from harness.run import results
from harness.tasks import checks
from harness.tasks.base import Sample, Task
from methods import ConfigError

log = logging.getLogger(__name__)

ANSWER_PREFIX = ""
CONFIG_URL = "https://raw.githubusercontent.com/THUDM/LongBench/{commit}/LongBench/config/{name}"
CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")
#: seconds a config-file download may wait for the server
DOWNLOAD_TIMEOUT_S = 30
#: sha256 of official data files we have seen (THUDM/LongBench data.zip), checked when present.
KNOWN_SHA256 = {
    "multi_news.jsonl": "f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b",
    "multifieldqa_zh.jsonl": "e5b4fd1a437c53c1c9e4e31eda7a259110b06d14be79c3ec455008c11fb9fab5",
    "passage_retrieval_zh.jsonl": "d71c1f71f9fee4c2108f822e9c58ac3cef94db47902c40ddfe168ecb5aab3cc0",
}


def _cache_dir() -> Path:
    return results.cache_root() / "longbench"


def config_tables(cfg) -> dict[str, dict]:
    """The official prompt and length tables, from ``config_dir`` or the pinned official commit
    (downloaded once into the cache: written aside and renamed, under a lock)."""
    folder = Path(cfg.config_dir).expanduser() if cfg.get("config_dir") else _cache_dir() / f"config-{cfg.config_commit}"
    tables = {}
    for name in CONFIG_FILES:
        path = folder / name
        if not path.exists():
            if cfg.get("config_dir"):
                raise ConfigError(f"task.config_dir={str(folder)!r} has no {name}; give the folder holding "
                                  f"the official LongBench config files, or set task.config_dir=null to "
                                  f"download them from {CONFIG_URL.format(commit=cfg.config_commit, name='')}")
            _download(CONFIG_URL.format(commit=cfg.config_commit, name=name), path)
        try:
            tables[name.removesuffix(".json")] = results.read_json(path)
        except results.ResultFileError as error:
            raise ConfigError(f"{error}") from None
    return tables


def _download(url: str, path: Path) -> None:
    """``url`` to ``path``: into a temporary file, renamed into place; concurrent runs wait on a lock."""
    from filelock import FileLock
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return
        log.info("downloading %s", url)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:   # a stalled network fails
                tmp.write_bytes(response.read())
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"task.config_dir=null: could not download {url} ({error}).\nfix: "
                              "task.config_dir=<folder with dataset2prompt.json and dataset2maxlen.json> or the "
                              "environment variable KV_HARNESS_LONGBENCH_CONFIG (README: Your own data)") from None
        tmp.replace(path)


def data_file(cfg, dataset: str) -> Path:
    """The official jsonl of ``dataset``, from ``data_dir`` or the hub's data.zip (cached: unpacked into
    a temporary folder and renamed into place, under a lock)."""
    name = f"{dataset}.jsonl"
    if cfg.get("data_dir"):
        path = Path(cfg.data_dir).expanduser() / name
        if not path.parent.is_dir():
            raise ConfigError(f"task.data_dir={str(cfg.data_dir)!r} is not a folder; fix: check the path (the folder "
                              f"with the official <dataset>.jsonl files, e.g. {name}), or KV_HARNESS_LONGBENCH_DIR")
        if not path.is_file():
            raise ConfigError(f"task.data_dir={str(path.parent)!r} has no {name}; it needs the official "
                              f"LongBench files (data.zip of the hub dataset {cfg.hub_repo}); fix: put them there, "
                              "or task.data_dir=null to download them, or choose task.datasets among the files there")
        return path
    folder = _cache_dir() / f"data-{cfg.hub_revision}"
    path = folder / name
    if not folder.is_dir():
        from filelock import FileLock
        from huggingface_hub import hf_hub_download

        from harness.engine.hub import check_hub_file
        check_hub_file(cfg.hub_repo, "data.zip", cfg.hub_revision, repo_type="dataset",
                       setting=f"task.data_dir=null (LongBench's data.zip from the hub, {cfg.hub_repo})",
                       instead="task.data_dir=<a folder with the official <dataset>.jsonl files> or the environment "
                               "variable KV_HARNESS_LONGBENCH_DIR (README: Your own data)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not folder.is_dir():
                try:
                    archive = hf_hub_download(cfg.hub_repo, "data.zip", repo_type="dataset", revision=cfg.hub_revision)
                except Exception as error:   # offline, unknown revision, ...: the hub's own message
                    raise ConfigError(f"could not get data.zip of {cfg.hub_repo} at {cfg.hub_revision} "
                                      f"({type(error).__name__}: {str(error)[:200]}); fix: task.data_dir=<folder with "
                                      "the official jsonl files> (or KV_HARNESS_LONGBENCH_DIR)") from None
                tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                (tmp / "SOURCE").write_text(f"{cfg.hub_repo} data.zip, snapshot {Path(archive).parent.name}, "
                                            f"sha256 {results.file_sha256(Path(archive))}\n")
                with zipfile.ZipFile(archive) as z:
                    for member in z.namelist():
                        if member.endswith(".jsonl"):
                            (tmp / Path(member).name).write_bytes(z.read(member))
                tmp.rename(folder)
    if not path.exists():
        raise ConfigError(f"{name} is not in {cfg.hub_repo} data.zip at {cfg.hub_revision}; fix: choose "
                          f"task.datasets among {sorted(p.stem for p in folder.glob('*.jsonl'))}")
    return path


def read_rows(path: Path, dataset: str, fields: tuple[str, ...] = ()) -> list[dict]:
    """The rows of one official data file, checked: ConfigError naming ``file:line`` for an empty
    file, a line that is not a JSON object, a missing or mistyped field, or a repeated ``_id``."""
    base = dataset.removesuffix("_e")
    needs = ["_id", "answers", *fields]
    if metrics.DATASET_METRIC.get(base) is metrics.classification_score:
        needs.append("all_classes")
    if dataset.endswith("_e"):
        needs.append("length")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason}); fix: re-download the official file") from None
    rows, seen = [], {}
    lines = jsonl.numbered_objects(
        path, text,
        not_json=lambda where, error: ConfigError(f"{where}: not valid JSON ({error.msg}, column {error.colno}); "
                                                  "fix: repair or re-download the file"),
        not_object=lambda where, row: ConfigError(f"{where}: a line must be a JSON object (a LongBench row), got "
                                                  f"{type(row).__name__}"))
    for where, number, row in lines:
        missing = [key for key in needs if key not in row]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}; a {dataset} row needs "
                              f"{', '.join(needs)} (the official files have them); fix: re-download the file")
        if not isinstance(row["_id"], str) or not row["_id"]:
            raise ConfigError(f"{where}: _id={row['_id']!r} must be a non-empty string")
        if row["_id"] in seen:
            raise ConfigError(f"{where}: _id {row['_id']!r} repeats line {seen[row['_id']]}; sample ids must be unique "
                              "(results are resumed by id)")
        seen[row["_id"]] = number
        if not isinstance(row["answers"], list) or not all(isinstance(a, str) for a in row["answers"]):
            raise ConfigError(f"{where}: answers must be a list of strings, got {row['answers']!r:.80}")
        if "all_classes" in needs and (not isinstance(row["all_classes"], list) or not row["all_classes"]
                                       or not all(isinstance(c, str) for c in row["all_classes"])):
            raise ConfigError(f"{where}: all_classes must be a non-empty list of class names for {dataset} (its "
                              f"metric is classification), got {row['all_classes']!r:.80}")
        if "length" in needs and (isinstance(row["length"], bool) or not isinstance(row["length"], (int, float))):
            raise ConfigError(f"{where}: length must be a number for {dataset} (LongBench-E buckets by it), got "
                              f"{row['length']!r:.40}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows (the file is empty); fix: re-download the official {path.name}, or "
                          f"leave {dataset} out of task.datasets")
    return rows


def template_fields(template: str) -> tuple[str, ...]:
    """The row fields a prompt template formats (``{context}``, ``{input}``)."""
    return tuple(sorted({name for _, name, _, _ in string.Formatter().parse(template) if name}))


def check_datasets(names) -> list[str]:
    known = metrics.known_datasets()
    names = checks._plain(names)
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"task.datasets={names!r} must be a non-empty list of dataset names; fix: e.g. "
                          "task.datasets=[qasper,trec]")
    for name in names:
        if name not in known:
            raise ConfigError(f"task.datasets: unknown dataset {name!r}; choose from {known}")
    if len(set(names)) != len(names):
        raise ConfigError(f"task.datasets={list(names)} names a dataset twice")
    return list(names)


def validate(cfg) -> None:
    """Before the model loads: settings, the official config tables, and every data file (exists,
    rows valid, fields present, ids unique)."""
    task = cfg.task
    datasets = check_datasets(task.get("datasets"))
    checks.positive_int("task.limit", task.get("limit"), allow_none=True)
    checks.positive_int("task.max_new_tokens", task.get("max_new_tokens"), allow_none=True)
    tables = config_tables(task)
    prompts = tables["dataset2prompt"]
    for dataset in datasets:
        for name, table in tables.items():
            if dataset.removesuffix("_e") not in table:
                raise ConfigError(f"{name}.json has no entry for {dataset.removesuffix('_e')}; fix: the official "
                                  "config files (task.config_dir=null downloads them), or leave the dataset out")
        read_rows(data_file(task, dataset), dataset, template_fields(prompts[dataset.removesuffix("_e")]))
    check_truncation(cfg, max(int(tables["dataset2maxlen"][d.removesuffix("_e")]) for d in datasets))


def check_truncation(cfg, longest_answer: int) -> None:
    """LongBench truncates every prompt to ``model.max_input_tokens``; where that is null and the model's
    files declare a context window (``model.context_window``), prompts longer than the window would run
    past it: ConfigError with the setting to give (the window minus the longest answer of the datasets,
    ``longest_answer`` tokens). Without a known window: a warning that prompts are not truncated."""
    model = cfg.model
    if model.get("max_input_tokens"):
        return
    window = model.get("context_window")
    if window:
        raise ConfigError(f"task=longbench truncates every prompt to model.max_input_tokens, which is null, and "
                          f"{model.name}'s context window is {window} tokens, so its longer prompts would run past it; "
                          f"fix: model.max_input_tokens={int(window) - longest_answer} (the window minus the longest "
                          f"answer of these datasets, {longest_answer} tokens)")
    log.warning("model.max_input_tokens is null and %s's context window is unknown: LongBench prompts are not truncated "
                "(set model.max_input_tokens to the model's context minus the longest answer)", model.name)


def data_identity(cfg) -> dict:
    """For the run identity: sha256 of each data file and of the two official config tables."""
    task = cfg.task
    sums = {name: digest for name, digest in checksums(task).items() if name != "_source"}
    folder = Path(task.config_dir).expanduser() if task.get("config_dir") else _cache_dir() / f"config-{task.config_commit}"
    sums.update({name: results.file_sha256(folder / name) for name in CONFIG_FILES})
    return sums


def checksums(cfg) -> dict[str, str]:
    """sha256 of every data file this task reads (for the manifest); known files are verified."""
    source = (_cache_dir() / f"data-{cfg.hub_revision}" / "SOURCE")
    out = {"_source": str(Path(cfg.data_dir).expanduser()) if cfg.get("data_dir")
           else (source.read_text().strip() if source.exists() else f"{cfg.hub_repo}@{cfg.hub_revision}")}
    for dataset in cfg.datasets:
        path = data_file(cfg, dataset)
        out[path.name] = digest = results.file_sha256(path)
        expected = KNOWN_SHA256.get(path.name)
        if expected and digest != expected:
            raise ConfigError(f"{path}: sha256 {digest} differs from the official file's {expected}; "
                             "re-download data.zip")
    return out


def middle_truncate(tokenizer, prompt: str, max_input_tokens: int | None) -> tuple[str, bool]:
    """LongBench's middle truncation (pred.py): first and last ``int(max / 2)`` tokens, each half
    decoded with special tokens skipped, joined with no separator."""
    if not max_input_tokens:
        return prompt, False
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= max_input_tokens:
        return prompt, False
    half = int(max_input_tokens / 2)
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True)), True


def after_context(template: str, row: dict) -> str:
    """The text of a LongBench prompt after its ``{context}`` (instructions, question, ``Answer:``): what
    ``compression_scope=context`` appends uncompressed; the split point is where it begins. Empty when the
    template ends with the context."""
    return template[template.index("{context}") + len("{context}"):].format(**row)


def build_samples(cfg, tokenizer, count_tokens=None, max_input_tokens: int | None = None,
                  truncation: str = "middle", **_) -> list[Sample]:
    if truncation not in ("middle", "none"):
        raise ConfigError(f"protocol.truncation={truncation!r} is not one of ('middle', 'none')")
    tables = config_tables(cfg)
    prompts, lengths = tables["dataset2prompt"], tables["dataset2maxlen"]
    known = metrics.known_datasets()
    samples = []
    for dataset in cfg.datasets:
        base = dataset.removesuffix("_e")
        if base not in prompts or dataset not in known:
            raise ConfigError(f"task.datasets: unknown dataset {dataset!r}; choose from {known}")
        rows = read_rows(data_file(cfg, dataset), dataset, template_fields(prompts[base]))
        if cfg.get("limit"):
            rows = rows[: int(cfg.limit)]
        for row in rows:
            prompt = prompts[base].format(**row)
            truncated = False
            if truncation == "middle":
                prompt, truncated = middle_truncate(tokenizer, prompt, max_input_tokens)
            after = after_context(prompts[base], row)
            samples.append(Sample(question_start=len(prompt) - len(after) if prompt.endswith(after) else None,
                id=row["_id"], prompt=prompt, answers=list(row["answers"]),
                max_new_tokens=int(cfg.get("max_new_tokens") or lengths[base]), group=dataset, dataset=base,
                meta={"dataset": dataset, "all_classes": row.get("all_classes"), "length": row.get("length"),
                      "truncated": truncated}))
    return samples


def environment() -> dict:
    """For the manifest: the scorer's library versions and fuzzywuzzy backend."""
    return metrics.scorer_environment()


def scores(prediction: str, sample: Sample) -> dict:
    return {"score": metrics.sample_score(sample.group, prediction, sample.answers, sample.meta.get("all_classes"))}


def finalize(folder: Path) -> dict:
    """Score the run folder with the official semantics (writes result.json like LongBench's eval.py);
    returns what its ``scores.json`` holds: the datasets' scores, the paper and official averages and
    the partial datasets (``harness.longbench.score.summary_fields``)."""
    from harness.longbench import score
    result = score.score_dir(folder)
    results.write_json(Path(folder) / score.RESULT, result, indent=1)
    return score.summary_fields(result, score.sample_counts(folder))


TASK = Task(name="longbench", validate=validate, data_identity=data_identity, build_samples=build_samples,
            scores=scores, answer_prefix=ANSWER_PREFIX, checksums=checksums, environment=environment,
            finalize=finalize)
