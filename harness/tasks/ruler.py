"""RULER (Hsieh et al., arXiv 2404.06654; github:NVIDIA/RULER) as a task: its 13 synthetic tasks
generated offline at each context length with the evaluated model's tokenizer, and scored as RULER
scores them (``harness.ruler``; reference-ruler.md).

* **Generation** (``harness.ruler.generate``): ``generator_version`` ``ruler_head`` (RULER at c3f5e3b,
  binary-search fitting; the default) or ``ruler_2024`` (e40fae1, the code of the paper and of kvpress's
  and KVCache-Factory's data). Each sample's model input (chat template, BOS and answer prefix as the
  runner builds it) plus the task's ``max_new_tokens`` fits the length. ``samples_per_task`` samples per
  (task, length) from one seeded stream (``seed``, 42 as RULER), cached per (task, length, tokenizer,
  version, seed, count, data) under ``<cache>/ruler/`` and recorded in the manifest with their sha256.
* **Data**: wonderwords 2.2.0 (pinned: another version changes every sample), the essays from
  ``haystack_dir`` (RULER's corpus starts with the 49 essays of the needle test; its 169 html essays are
  not used, recorded), SQuAD v2 dev (``squad_path``) and HotpotQA dev (``hotpotqa_path``) from local files.
  Without the two QA files, qa_1 and qa_2 are skipped with a warning and the result is RULER-11.
* **Prompt**: RULER's task text is the user turn, its answer prefix opens the assistant turn (the
  runner's chat rule); ``protocol.compression_scope`` decides what is compressed (RULER's own runs and
  KVCache-Factory: the whole prompt; kvpress: the context, the question appended uncompressed). The
  question starts at the last match of kvpress's per-family pattern.
* **Scoring** (``harness.ruler.score``): string_match_all / string_match_part per task and length,
  the unweighted task mean per length, Avg, wAvg and the effective length.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from harness.ruler import essays, fitting, metrics
from harness.ruler.tasks import ESSAY_TASKS
from harness.run import results
from harness.tasks import checks
from harness.tasks.base import Sample, Task
from methods import ConfigError

log = logging.getLogger(__name__)

VERSIONS = fitting.VERSIONS        # ruler_head, ruler_2024
SPLITTERS = essays.SPLITTERS        # auto, punkt, regex
#: bumped whenever generated text changes, so cached samples of an older generator are not reused
GENERATOR_REVISION = 1


def _cache_dir() -> Path:
    return results.cache_root() / "ruler"


def selected_tasks(task_cfg) -> tuple[list[str], list[str]]:
    """``(tasks to run, QA tasks skipped for want of their data)`` in RULER's order."""
    wanted = list(task_cfg.tasks)
    skipped = [t for t in wanted if (t == "qa_1" and not task_cfg.get("squad_path"))
               or (t == "qa_2" and not task_cfg.get("hotpotqa_path"))]
    return [t for t in metrics.TASKS if t in wanted and t not in skipped], skipped


def _file(what: str, value) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"task.{what}={str(value)!r} is not a file; fix: the path of the file (see the README's "
                          f"RULER section), or task.{what}=null to skip its task (the result is then RULER-11)")
    return path


def validate(cfg) -> None:
    """Before the model loads: every RULER setting (``cfg`` is the whole run config)."""
    task = cfg.task
    tasks = list(task.get("tasks") or [])
    unknown = [t for t in tasks if t not in metrics.TASKS]
    if not tasks or unknown:
        raise ConfigError(f"task.tasks={tasks!r}: {'unknown ' + str(unknown) if unknown else 'empty'}; choose from "
                          f"{list(metrics.TASKS)}; fix: e.g. task.tasks=[niah_single_1,vt]")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"task.tasks={tasks} repeats a task; fix: each task once")
    limit, why = checks.model_limit(cfg)
    if limit and cfg.model.max_input_tokens:   # a prompt cap made for LongBench's truncation, which RULER never does
        why += (", a cap on prompts; a RULER length counts prompt + new tokens, so model.max_input_tokens=<the model's "
                "context window> (8192 for SmolLM2, 32768 for Gemma 3) admits lengths up to that window")
    checks.int_list("task.context_lengths", task.get("context_lengths"), minimum=256, maximum=limit, maximum_why=why)
    checks.positive_int("task.samples_per_task", task.get("samples_per_task"))
    checks.positive_int("task.max_new_tokens", task.get("max_new_tokens"), allow_none=True)
    if not checks._is_int(task.get("seed")):
        raise ConfigError(f"task.seed={task.get('seed')!r} must be an integer; fix: task.seed=42 (RULER's)")
    if task.generator_version not in VERSIONS:
        raise ConfigError(f"task.generator_version={task.generator_version!r} is not one of {VERSIONS}: ruler_head "
                          "(RULER at c3f5e3b) or ruler_2024 (the code of kvpress's and KVCache-Factory's data)")
    if task.sentence_splitter not in SPLITTERS:
        raise ConfigError(f"task.sentence_splitter={task.sentence_splitter!r} is not one of {SPLITTERS}")
    running, skipped = selected_tasks(task)
    if not running:
        raise ConfigError(f"task.tasks={tasks}: nothing to run, {skipped} need their data files; fix: "
                          "task.squad_path=<dev-v2.0.json> / task.hotpotqa_path=<hotpot_dev_distractor_v1.json>, or "
                          "other tasks")
    if any(t in ESSAY_TASKS for t in running):
        from harness.tasks.haystack import haystack_files
        if not task.get("haystack_dir"):
            raise ConfigError("task=ruler needs the essays for " + ", ".join(t for t in running if t in ESSAY_TASKS)
                              + "; fix: task.haystack_dir=<the Paul Graham essays folder> (or the environment variable "
                              "KV_HARNESS_HAYSTACK_DIR), or task.tasks=[...] without those tasks")
        haystack_files("essays", task.haystack_dir)
    for key in ("squad_path", "hotpotqa_path"):
        if task.get(key):
            _file(key, task[key])
    if skipped:
        log.warning("task=ruler: %s skipped (no %s): the result is %s, not RULER-13", ", ".join(skipped),
                    " and ".join(k for k, t in (("task.squad_path", "qa_1"), ("task.hotpotqa_path", "qa_2"))
                                 if t in skipped), "RULER-11" if len(skipped) == 2 and len(running) == 11 else
                    "a subset")


def data_identity(cfg) -> dict:
    """The generator version and the content of every data file the samples are drawn from."""
    task = cfg.task
    running, _ = selected_tasks(task)
    out = {"generator_version": task.generator_version, "generator_revision": GENERATOR_REVISION,
           "wonderwords": results.package_version("wonderwords")}
    if any(t in ESSAY_TASKS for t in running):
        from harness.tasks.haystack import haystack_identity
        out["essays_sha256"] = haystack_identity("essays", task.haystack_dir)["haystack_sha256"]
    for key, name in (("squad_path", "qa_1"), ("hotpotqa_path", "qa_2")):
        if name in running:
            out[f"{name}_sha256"] = results.file_sha256(_file(key, task[key]))
    return out


def tokenizer_fingerprint(tokenizer, count_tokens) -> str:
    """sha256 (16 hex digits) of what decides the generated samples besides the settings: the tokenizer's
    vocabulary and rules, its chat template, and how the runner measures a prompt (template, BOS,
    answer prefix), probed on a fixed text."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    probe = "RULER probe: The special magic number for x is 1234567.\nWhat is it?"
    digest.update(f"{count_tokens(probe, ' Answer:')},{count_tokens(probe, '')}".encode())
    return digest.hexdigest()[:16]


def _generated(task_cfg, task: str, length: int, count_tokens, fingerprint: str) -> tuple[list[dict], dict]:
    """The samples of one (task, length): from the cache when present, else generated and cached."""
    from filelock import FileLock

    from harness.ruler.generate import generate
    settings = {"task": task, "length": length, "samples": int(task_cfg.samples_per_task), "seed": int(task_cfg.seed),
                "version": task_cfg.generator_version, "revision": GENERATOR_REVISION, "tokenizer": fingerprint,
                "splitter": essays.sentence_splitter(task_cfg.sentence_splitter)[1] if task in ESSAY_TASKS else None,
                "data": data_identity_of(task_cfg, task)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"{task}_{length}_{task_cfg.generator_version}_s{task_cfg.seed}_{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            samples, record = generate(task, length, count_tokens, int(task_cfg.samples_per_task),
                                       seed=int(task_cfg.seed), version=task_cfg.generator_version,
                                       essays_dir=task_cfg.get("haystack_dir"), squad_path=task_cfg.get("squad_path"),
                                       hotpotqa_path=task_cfg.get("hotpotqa_path"),
                                       splitter=task_cfg.sentence_splitter)
            payload = {"settings": settings, "record": record, "samples": [vars(s) for s in samples]}
            results.write_json(path, payload)
            log.info("RULER %s at %d tokens: %d samples generated -> %s", task, length, len(samples), path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    record = dict(payload["record"], file=path.name, sha256=results.file_sha256(path))
    return payload["samples"], record


def data_identity_of(task_cfg, task: str) -> dict:
    """The data a single task's samples depend on (essays or a QA file), for its cache key."""
    from harness.tasks.haystack import haystack_identity
    if task in ESSAY_TASKS:
        return haystack_identity("essays", task_cfg.haystack_dir)
    if task == "qa_1":
        return {"squad": results.file_sha256(_file("squad_path", task_cfg.squad_path))}
    if task == "qa_2":
        return {"hotpotqa": results.file_sha256(_file("hotpotqa_path", task_cfg.hotpotqa_path))}
    return {}


def build_samples(cfg, tokenizer, count_tokens=None, **_) -> list[Sample]:
    """Every (task, length, index) sample, ids ``<task>_len<L>_<index>``. ``count_tokens(text, answer_prefix)``
    measures the model input the runner builds (default: raw text + answer prefix with BOS)."""
    if count_tokens is None:
        def count_tokens(text, answer_prefix=""):
            return len(tokenizer(text + answer_prefix).input_ids)
    running, _ = selected_tasks(cfg)
    fingerprint = tokenizer_fingerprint(tokenizer, count_tokens)
    samples = []
    for length in [int(x) for x in cfg.context_lengths]:
        for task in running:
            generated, record = _generated(cfg, task, length, count_tokens, fingerprint)
            for item in generated:
                samples.append(Sample(
                    id=f"{task}_len{length}_{item['index']}", prompt=item["input"], answers=list(item["outputs"]),
                    max_new_tokens=int(cfg.get("max_new_tokens") or item["max_new_tokens"]),
                    answer_prefix=item["answer_prefix"], question_start=item["question_start"],
                    meta={"task": task, "context_length": length, "index": item["index"],
                          "ruler_length": item["length"], "size": item["size"], "generated": record["file"]}))
    return samples


def records(samples: list[Sample]) -> dict:
    """For the manifest: per ``<task>/<length>`` of ``samples``, how its samples were generated (version,
    fitted size, token lengths, word-list version, splitter, data files) and the cached file's name and
    sha256 (read back from the cache that ``build_samples`` wrote)."""
    out = {}
    for sample in samples:
        key = f"{sample.meta['task']}/{sample.meta['context_length']}"
        if key not in out:
            path = _cache_dir() / sample.meta["generated"]
            out[key] = dict(json.loads(path.read_text(encoding="utf-8"))["record"], file=path.name,
                            sha256=results.file_sha256(path))
    return out


def scores(prediction: str, sample: Sample) -> dict:
    """RULER's per-sample value (0-1): the share of gold strings found (``all``), or whether any is
    (``part``, qa_1/qa_2), in the post-processed prediction."""
    task = sample.meta["task"]
    value = metrics.task_score(task, [prediction], [sample.answers])["score"] / 100
    return {"score": value, "metric": metrics.METRICS[task]}


def finalize(folder: Path) -> dict:
    """``scores.json``'s fields: per task and length, per length, Avg/wAvg, effective length
    (``harness.ruler.score.summary``)."""
    from omegaconf import OmegaConf

    from harness.ruler import score
    task_cfg = OmegaConf.create(results.read_json(Path(folder) / results.MANIFEST)["config"]["task"])
    running, _ = selected_tasks(task_cfg)
    return score.summary(list(results.finished(folder).values()), expected_tasks=running,
                         samples_per_task=int(task_cfg.samples_per_task))


def environment() -> dict:
    return {"wonderwords": results.package_version("wonderwords"), "nltk": results.package_version("nltk"),
            "scorer": "harness.ruler.metrics (RULER eval/evaluate.py semantics)"}


TASK = Task(name="ruler", validate=validate, data_identity=data_identity, build_samples=build_samples,
            scores=scores, answer_prefix="", environment=environment, finalize=finalize, records=records)
