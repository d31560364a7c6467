"""One run: a (model, task, method, protocol) combination over the task's samples, resumable."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from harness import results
from harness.generate import generate
from harness.models import load_model
from harness.prompting import encode, use_chat_template
from harness.tasks import Sample, get_task

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _cached_model(model_yaml: str):
    """One model per process: a multirun over methods loads it once."""
    return load_model(OmegaConf.create(model_yaml))


def method_knobs(cfg: DictConfig) -> dict:
    knobs = OmegaConf.to_container(cfg.method, resolve=True)
    knobs.pop("name")
    return knobs


def build_compressor(cfg: DictConfig) -> methods.KVCompressor:
    return methods.build(cfg.method.name, **method_knobs(cfg))


def run_folder(cfg: DictConfig, compressor: methods.KVCompressor) -> Path:
    name = results.run_name({"name": compressor.name, **compressor.knobs()})
    return Path(cfg.results_dir) / cfg.task.name / cfg.model.name / cfg.protocol.name / name


def task_samples(task, task_cfg, lm, chat: bool) -> list[Sample]:
    """The task's samples, with lengths measured on the model input the runner will build."""
    def count_tokens(prompt_text: str) -> int:
        probe = Sample(id="", prompt=prompt_text, answers=[], max_new_tokens=1, answer_prefix=task.ANSWER_PREFIX)
        return encode(probe, lm.tokenizer, chat, "cpu").shape[1]

    return task.build_samples(task_cfg, lm.tokenizer, count_tokens)


def run(cfg: DictConfig) -> dict:
    """Run (or resume) the configured job; returns the summary that is also written to scores.json."""
    compressor = build_compressor(cfg)          # bad knobs fail here, before any model loads
    task = get_task(cfg.task.name)
    folder = run_folder(cfg, compressor)
    torch.set_num_threads(int(cfg.threads)) if cfg.get("threads") else None
    lm = _cached_model(OmegaConf.to_yaml(cfg.model, resolve=True))
    chat = use_chat_template(cfg.protocol.chat_template, lm.chat_template, lm.tokenizer)

    samples = task_samples(task, cfg.task, lm, chat)
    if cfg.get("limit"):
        samples = samples[: int(cfg.limit)]
    done = {row["id"] for row in results.read_predictions(folder)}
    writer = results.PredictionWriter(folder)
    results.write_json(folder / results.MANIFEST, {
        "config": OmegaConf.to_container(cfg, resolve=True), "method": {"name": compressor.name, **compressor.knobs()},
        "model": lm.info, "chat_template": chat, "stop_token_ids": lm.stop_token_ids,
        "environment": results.environment(), "samples": len(samples)})
    todo = [s for s in samples if s.id not in done]
    log.info("%s: %d samples, %d already done, %d to run -> %s", compressor.name, len(samples),
             len(samples) - len(todo), len(todo), folder)
    device = next(lm.model.parameters()).device
    for sample in todo:
        input_ids = encode(sample, lm.tokenizer, chat, device)
        start = time.perf_counter()
        out = generate(lm.model, lm.tokenizer, input_ids, compressor, sample.max_new_tokens,
                       lm.stop_token_ids, min_new_tokens=0)
        seconds = time.perf_counter() - start
        row = {"id": sample.id, "pred": out.text, "answers": sample.answers, "score": task.score(out.text, sample.answers),
               "prompt_tokens": out.prompt_length, "new_tokens": len(out.token_ids), "stopped_by": out.stopped_by,
               "seconds": round(seconds, 3), **sample.meta}
        if out.report is not None:
            row["kept"] = [layer.get("kept") for layer in out.report["layers"]]
        writer.append(row)
        log.info("%s %s score=%s %.1fs %r", compressor.name, sample.id, row["score"], seconds, out.text[:60])
    return summarize(folder, compressor.name, [s.id for s in samples])


def summarize(folder: Path, method: str, sample_ids: list[str]) -> dict:
    rows = {r["id"]: r for r in results.read_predictions(folder)}
    rows = [rows[i] for i in sample_ids if i in rows]
    mean = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
    summary = {"method": method, "folder": str(folder), "samples": len(rows), "score": round(100 * mean, 2)}
    results.write_json(Path(folder) / results.SCORES, summary)
    return summary
