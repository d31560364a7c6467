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

import hashlib
import json
import logging
import urllib.request
import zipfile
from pathlib import Path

from harness.longbench import metrics
from harness.tasks import Sample

log = logging.getLogger(__name__)

ANSWER_PREFIX = ""
CONFIG_URL = "https://raw.githubusercontent.com/THUDM/LongBench/{commit}/LongBench/config/{name}"
CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")
#: sha256 of official data files we have seen (THUDM/LongBench data.zip), checked when present.
KNOWN_SHA256 = {
    "multi_news.jsonl": "f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b",
    "multifieldqa_zh.jsonl": "e5b4fd1a437c53c1c9e4e31eda7a259110b06d14be79c3ec455008c11fb9fab5",
    "passage_retrieval_zh.jsonl": "d71c1f71f9fee4c2108f822e9c58ac3cef94db47902c40ddfe168ecb5aab3cc0",
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_dir() -> Path:
    from harness.models import cache_root
    return cache_root() / "longbench"


def config_tables(cfg) -> dict[str, dict]:
    """The official prompt and length tables, from ``config_dir`` or the pinned official commit."""
    folder = Path(cfg.config_dir).expanduser() if cfg.get("config_dir") else _cache_dir() / f"config-{cfg.config_commit}"
    tables = {}
    for name in CONFIG_FILES:
        path = folder / name
        if not path.exists():
            if cfg.get("config_dir"):
                raise FileNotFoundError(f"task.config_dir={str(folder)!r} has no {name}; give the folder holding "
                                        f"the official LongBench config files, or set task.config_dir=null to "
                                        f"download them from {CONFIG_URL.format(commit=cfg.config_commit, name='')}")
            folder.mkdir(parents=True, exist_ok=True)
            url = CONFIG_URL.format(commit=cfg.config_commit, name=name)
            log.info("downloading %s", url)
            urllib.request.urlretrieve(url, path)
        tables[name.removesuffix(".json")] = json.loads(path.read_text(encoding="utf-8"))
    return tables


def data_file(cfg, dataset: str) -> Path:
    """The official jsonl of ``dataset``, from ``data_dir`` or the hub's data.zip (cached)."""
    name = f"{dataset}.jsonl"
    if cfg.get("data_dir"):
        path = Path(cfg.data_dir).expanduser() / name
        if not path.exists():
            raise FileNotFoundError(f"task.data_dir={str(path.parent)!r} has no {name}; it needs the official "
                                    f"LongBench files (data.zip of the hub dataset {cfg.hub_repo}), or set "
                                    "task.data_dir=null to download them, or choose task.datasets among the files there")
        return path
    folder = _cache_dir() / f"data-{cfg.hub_revision}"
    path = folder / name
    if not path.exists():
        from huggingface_hub import hf_hub_download
        archive = hf_hub_download(cfg.hub_repo, "data.zip", repo_type="dataset", revision=cfg.hub_revision)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "SOURCE").write_text(f"{cfg.hub_repo} data.zip, snapshot {Path(archive).parent.name}, "
                                       f"sha256 {sha256(Path(archive))}\n")
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.endswith(".jsonl"):
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / Path(member).name).write_bytes(z.read(member))
        if not path.exists():
            raise FileNotFoundError(f"{name} is not in {cfg.hub_repo} data.zip at {cfg.hub_revision}")
    return path


def checksums(cfg) -> dict[str, str]:
    """sha256 of every data file this task reads (for the manifest); known files are verified."""
    source = (_cache_dir() / f"data-{cfg.hub_revision}" / "SOURCE")
    out = {"_source": str(Path(cfg.data_dir).expanduser()) if cfg.get("data_dir")
           else (source.read_text().strip() if source.exists() else f"{cfg.hub_repo}@{cfg.hub_revision}")}
    for dataset in cfg.datasets:
        path = data_file(cfg, dataset)
        out[path.name] = digest = sha256(path)
        expected = KNOWN_SHA256.get(path.name)
        if expected and digest != expected:
            raise ValueError(f"{path}: sha256 {digest} differs from the official file's {expected}; "
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


def build_samples(cfg, tokenizer, count_tokens=None, max_input_tokens: int | None = None,
                  truncation: str = "middle", **_) -> list[Sample]:
    if truncation not in ("middle", "none"):
        raise ValueError(f"protocol.truncation={truncation!r} is not one of ('middle', 'none')")
    tables = config_tables(cfg)
    prompts, lengths = tables["dataset2prompt"], tables["dataset2maxlen"]
    known = metrics.known_datasets()
    samples = []
    for dataset in cfg.datasets:
        base = dataset.removesuffix("_e")
        if base not in prompts or base not in known:
            raise ValueError(f"task.datasets: unknown dataset {dataset!r}; choose from {sorted(prompts)} "
                             "(add _e for LongBench-E)")
        rows = [json.loads(line) for line in data_file(cfg, dataset).read_text(encoding="utf-8").splitlines() if line.strip()]
        if cfg.get("limit"):
            rows = rows[: int(cfg.limit)]
        for row in rows:
            prompt = prompts[base].format(**row)
            truncated = False
            if truncation == "middle":
                prompt, truncated = middle_truncate(tokenizer, prompt, max_input_tokens)
            samples.append(Sample(
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
    """Score the run folder with the official semantics; writes result.json like LongBench's eval.py."""
    from harness import score
    result = score.score_dir(folder)
    (Path(folder) / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return result
