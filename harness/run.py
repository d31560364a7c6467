"""One run: a (model, task, protocol) combination over the task's samples, for one method or for
several at once (``methods=[...]``: one shared prefill per sample, see ``harness.shared``).
Every method gets its own results folder; a re-run skips the samples a folder already has."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from harness import distributed, generation_rules, results
from harness.generate import check_decode, generate
from harness.models import check_model_config, load_model
from harness.prompting import check_protocol, encode, special_text, use_chat_template
from harness.shared import generate_many
from harness.tasks import Sample, get_task

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[1] / "conf"


@functools.lru_cache(maxsize=1)
def _cached_model(model_yaml: str):
    """One model per process: a multirun over methods loads it once."""
    return load_model(OmegaConf.create(model_yaml))


def method_configs(cfg: DictConfig) -> list[dict]:
    """The methods of this run as knob dicts: ``cfg.method``, or every name in ``cfg.methods`` (each
    from ``conf/method/<name>.yaml`` under this protocol) at every budget in ``cfg.budgets``, with
    ``cfg.method_overrides`` applied to all."""
    names = cfg.get("methods")
    if not names:
        return [OmegaConf.to_container(cfg.method, resolve=True)]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    choices = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    out = []
    for name in names:
        if name not in choices:
            raise methods.ConfigError(f"methods: unknown method {name!r}; choose from {choices}")
        node = OmegaConf.create({"protocol": cfg.protocol, "method": OmegaConf.load(CONF / "method" / f"{name}.yaml")})
        knobs = OmegaConf.to_container(node.method, resolve=True)
        if cfg.get("method_overrides"):
            knobs.update(OmegaConf.to_container(cfg.method_overrides, resolve=True))
        budgets = [knobs["budget"]] if name == "fullkv" or not cfg.get("budgets") else list(cfg.budgets)
        out += [{**knobs, "budget": int(b)} for b in budgets]
    return out


def build_compressors(cfg: DictConfig) -> list[methods.KVCompressor]:
    compressors = []
    for knobs in method_configs(cfg):
        knobs = dict(knobs)
        compressors.append(methods.build(knobs.pop("name"), **knobs))
    return compressors


def run_folder(cfg: DictConfig, compressor: methods.KVCompressor) -> Path:
    name = results.run_name({"name": compressor.name, **compressor.knobs()})
    return Path(cfg.results_dir) / cfg.task.name / cfg.model.name / cfg.protocol.name / name


def task_samples(task, task_cfg, lm, chat: bool, truncation: str = "middle",
                 special_tokens: str = "text") -> list[Sample]:
    """The task's samples, with lengths measured on the model input the runner will build."""
    return task.build_samples(task_cfg, lm.tokenizer, _counter(task, lm, chat, special_tokens),
                              max_input_tokens=lm.max_input_tokens, truncation=truncation)


def _row(task, sample: Sample, out, seconds: float, compressor: methods.KVCompressor) -> dict:
    scores = task.scores(out.text, sample) if hasattr(task, "scores") else {"score": task.score(out.text, sample.answers)}
    row = {"id": sample.id, "pred": out.text, "answers": sample.answers, **scores,
           "prompt_tokens": out.prompt_length, "new_tokens": len(out.token_ids), "stopped_by": out.stopped_by,
           "seconds": round(seconds, 3), **sample.meta}
    if out.report is None and not compressor.is_noop:   # generate verifies this; a row must never claim otherwise
        raise RuntimeError(f"{compressor.name}: sample {sample.id} has no compression report")
    if out.report is not None:
        row["kept"] = [layer["kept"] for layer in out.report["layers"]]
        row["kept_distinct_per_head"] = [layer.get("distinct_per_head") for layer in out.report["layers"]]
        row["kept_layers"] = [layer.get("model_layer", layer["layer"]) for layer in out.report["layers"]]
        if out.report["notes"]:
            row["notes"] = out.report["notes"]
    return row


def save_positions(folder: Path, sample_id: str, report: dict) -> None:
    """``kept/<sample id>.pt``: {model layer: [B, H, k] int32 original positions, None = whole prompt}."""
    (folder / "kept").mkdir(exist_ok=True)
    positions = {layer.get("model_layer", layer["layer"]):
                 None if layer["positions"] is None else layer["positions"].to(torch.int32)
                 for layer in report["layers"]}
    torch.save(positions, folder / "kept" / f"{sample_id}.pt")


def run(cfg: DictConfig) -> list[dict]:
    """Run (or resume) the configured job; returns one summary per method (also in scores.json)."""
    compressors = build_compressors(cfg)        # bad knobs fail here, before any model loads
    check_decode(cfg.get("decode", "batched"), cfg.get("decode_batch", 16))
    check_model_config(cfg.model)
    generation_rules.check(cfg.protocol)
    check_protocol(cfg.protocol, cfg.model)
    task = get_task(cfg.task.name)
    distributed.init()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    lm = _cached_model(OmegaConf.to_yaml(cfg.model, resolve=True))
    chat = use_chat_template(cfg.protocol.chat_template, lm.chat_template, lm.tokenizer)
    skip = set(cfg.protocol.get("chat_template_skip") or [])
    special_tokens = cfg.protocol.get("prompt_special_tokens", "text")
    samples = task_samples(task, cfg.task, lm, chat, cfg.protocol.get("truncation", "middle"), special_tokens)
    if cfg.get("limit"):
        samples = samples[: int(cfg.limit)]
    rank, world = distributed.world()
    folders = {id(c): run_folder(cfg, c) for c in compressors}
    done = {id(c): {row["id"] for row in results.read_predictions(folders[id(c)]) + distributed.read_parts(folders[id(c)])}
            for c in compressors}
    all_samples, samples = samples, samples[rank::world]
    writers: dict[tuple, results.PredictionWriter] = {}
    manifest = {"config": OmegaConf.to_container(cfg, resolve=True), "model": lm.info, "chat_template": chat,
                "stop_token_ids": lm.stop_token_ids, "environment": results.environment(),
                "samples": len(all_samples), "shared_prefill": len(compressors) > 1,
                "generation": {dataset or "default": {
                    "stop_token_ids": generation_rules.stop_ids(cfg.protocol, dataset, lm),
                    "min_new_tokens": generation_rules.min_new_tokens(cfg.protocol, dataset),
                    "chat_template": chat and dataset not in skip} for dataset in {s.dataset for s in all_samples}}}
    if hasattr(task, "checksums"):
        manifest["data_sha256"] = task.checksums(cfg.task)
    if hasattr(task, "environment"):
        manifest["scorer"] = task.environment()
    for c in compressors:
        folders[id(c)].mkdir(parents=True, exist_ok=True)
        if rank == 0:
            results.write_json(folders[id(c)] / results.MANIFEST,
                               {**manifest, "world_size": world, "method": {"name": c.name, **c.knobs()}})
        finished = sum(s.id in done[id(c)] for s in samples)
        log.info("%s: %d of %d samples already done -> %s", c.name, finished, len(samples), folders[id(c)])
    device = next(lm.model.parameters()).device
    fast = {"decode": cfg.get("decode", "batched"), "cuda_graphs": bool(cfg.get("cuda_graphs", True)),
            "compile": bool(cfg.get("decode_compile", False))}
    stop_strings = list(cfg.task.get("stop_strings") or [])
    warned_specials = False
    for sample in samples:
        todo = [c for c in compressors if sample.id not in done[id(c)]]
        if not todo:
            continue
        sample_chat = chat and sample.dataset not in skip
        input_ids = encode(sample, lm.tokenizer, sample_chat, device, special_tokens)
        written_specials = special_text(sample.prompt, lm.tokenizer)
        if written_specials:
            sample.meta["special_text_in_prompt"] = written_specials
            if special_tokens == "parse" and not warned_specials:
                warned_specials = True
                log.warning("sample %s: the prompt contains special-token text %s, which "
                            "protocol.prompt_special_tokens=parse turns into control tokens, as the reference "
                            "scripts do (recorded per sample as special_text_in_prompt)", sample.id, written_specials)
        stops = generation_rules.stop_ids(cfg.protocol, sample.dataset, lm)
        min_new = generation_rules.min_new_tokens(cfg.protocol, sample.dataset)
        start = time.perf_counter()
        if len(todo) == 1:
            outs = [generate(lm.model, lm.tokenizer, input_ids, todo[0], sample.max_new_tokens, stops,
                             stop_strings, min_new, **fast)]
        else:
            outs = generate_many(lm.model, lm.tokenizer, input_ids, todo, sample.max_new_tokens, stops,
                                 stop_strings, min_new, max_batch=int(cfg.get("decode_batch", 16)),
                                 **fast)
        seconds = (time.perf_counter() - start) / len(todo)
        for c, out in zip(todo, outs):
            row = _row(task, sample, out, seconds, c)
            if cfg.get("save_kept_positions") and out.report is not None:
                save_positions(folders[id(c)], sample.id, out.report)
            key = (id(c), sample.group)
            if key not in writers:
                suffix = distributed.PART.format(rank=rank) if world > 1 else ""
                writers[key] = results.PredictionWriter(folders[id(c)], sample.group, suffix)
            writers[key].append(row)
            log.info("%-12s %s score=%.2f %r", c.name, sample.id, row["score"], out.text[:50])
    sample_ids = [s.id for s in all_samples]
    distributed.barrier()
    if rank != 0:
        return []
    summaries = []
    for c in compressors:
        distributed.merge(folders[id(c)], {i: k for k, i in enumerate(sample_ids)})
        summary = summarize(folders[id(c)], c.name, sample_ids)
        if hasattr(task, "finalize") and summary["samples"]:
            summary["datasets"] = task.finalize(folders[id(c)])
            results.write_json(folders[id(c)] / results.SCORES, summary)
        log_to_wandb(cfg, folders[id(c)], c, summary)
        summaries.append(summary)
    return summaries


def _counter(task, lm, chat: bool, special_tokens: str = "text"):
    def count_tokens(prompt_text: str) -> int:
        probe = Sample(id="", prompt=prompt_text, answers=[], max_new_tokens=1, answer_prefix=task.ANSWER_PREFIX)
        return encode(probe, lm.tokenizer, chat, "cpu", special_tokens).shape[1]
    return count_tokens


def log_to_wandb(cfg: DictConfig, folder: Path, compressor, summary: dict) -> None:
    """W&B: config, scores, predictions; offline without an API key; ``wandb=false`` turns it off."""
    if not cfg.get("wandb", False):
        return
    from harness import wandb_log
    scores = summary.get("datasets") or {cfg.task.name: summary["score"]}
    rows = [{k: r.get(k) for k in ("id", "dataset", "pred", "answers", "score", "context_length", "depth")}
            for r in results.read_predictions(folder)]
    wandb_log.log_run(folder, {**OmegaConf.to_container(cfg, resolve=True),
                               "method": {"name": compressor.name, **compressor.knobs()}},
                      scores, [summary | {"folder": str(folder)}], rows, project=cfg.get("wandb_project", "kv-harness"))


def summarize(folder: Path, method: str, sample_ids: list[str]) -> dict:
    rows = {r["id"]: r for r in results.read_predictions(folder)}
    rows = [rows[i] for i in sample_ids if i in rows]
    mean = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
    summary = {"method": method, "folder": str(folder), "samples": len(rows), "score": round(100 * mean, 2)}
    results.write_json(Path(folder) / results.SCORES, summary)
    return summary
