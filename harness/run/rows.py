"""What a run writes per (sample, method), shared by the per-sample path (``harness.run.runner.generate_sample``)
and ``decode=continuous`` (``harness.run.windows``): a sample's model input and stop rules (``prompt_input``), its
results row (``result_row``, ``compression_fields``, ``transform_fields``), the K/V transform groups and their
attachment, and appending the row to its method's predictions file."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

import methods
from harness.protocol import generation_rules
from harness.protocol.prompting import encode_parts, special_text
from harness.run import distributed, identity, results
from harness.tasks import Sample

log = logging.getLogger(__name__)


def result_row(task, sample: Sample, out, seconds: float, compressor: methods.KVCompressor) -> dict:
    """A results row of ``out`` (a ``Generation``) for ``sample`` under ``compressor``: the prediction, the
    task's scores, lengths, why it stopped, ``seconds``, the sample's meta and what the compressor kept
    (RuntimeError for a compressing method without a report)."""
    scores = task.scores(out.text, sample)
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


def compression_fields(compressor: methods.KVCompressor, compressed: int, scope: str) -> dict:
    """What a row records of its compression: the tokens prefilled and compressed (``compressed_tokens``;
    the rest of the prompt was appended uncompressed under ``compression_scope``), and, for a method
    that compresses, the token budget it ran with (``budget``: resolved from ``compression_ratio`` for
    this prompt where a ratio is set, so tables can group by either)."""
    fields = {"compressed_tokens": compressed, "compression_scope": scope}
    if not compressor.is_noop:
        fields["budget"] = compressor.budget_for(compressed)
        if compressor.compression_ratio is not None:
            fields["compression_ratio"] = compressor.compression_ratio
    return fields


def kept_file(folder: Path, sample_id: str) -> Path:
    """``kept/<sample id>.pt``; an id that cannot be a file name is written with its unsafe characters
    replaced and a digest of the id appended (``ab_c-1f2e3d4c.pt``), never outside ``kept/``."""
    name = sample_id
    if not identity.SAFE_NAME.fullmatch(name) or ".." in name:
        name = re.sub(r"[^A-Za-z0-9_+=-]", "_", name)[:80] + "-" + hashlib.sha256(sample_id.encode()).hexdigest()[:8]
    return identity.inside(Path(folder) / "kept" / f"{name}.pt", folder)


def save_positions(folder: Path, sample_id: str, report: dict) -> None:
    """``kept/<sample id>.pt``: {model layer: [B, H, k] int32 original positions, None = whole prompt}."""
    (folder / "kept").mkdir(exist_ok=True)
    positions = {layer.get("model_layer", layer["layer"]):
                 None if layer["positions"] is None else layer["positions"].to(torch.int32)
                 for layer in report["layers"]}
    path = kept_file(folder, sample_id)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(positions, tmp)
    tmp.replace(path)


def transform_key(compressor: methods.KVCompressor) -> tuple | None:
    """What identifies a compressor's K/V transform (None without one): methods with the same key share it
    (and, in one sample, a prefill)."""
    from methods.base import TRANSFORM_FIELDS
    if compressor.transform is None:
        return None
    return tuple(getattr(compressor, f) for f in TRANSFORM_FIELDS)


@dataclass
class Prompt:
    """One sample's model input and generation rules: ``input_ids [1, n]`` on the model's device, the first
    ``compressed`` tokens prefilled and compressed (``protocol.compression_scope``), stop ids, ``min_new_tokens``
    and the task's stop strings."""
    input_ids: torch.Tensor
    compressed: int
    stops: list
    min_new_tokens: int
    stop_strings: list

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def prompt_input(cfg: DictConfig, lm, chat: bool, sample: Sample, warned: list) -> Prompt:
    """``sample`` encoded as the protocol says (``encode_parts``), its stop rules, and the special-token text the
    prompt holds recorded in ``sample.meta`` (warned about once per run: ``warned``). ConfigError for a task
    without the context/question split the scope needs."""
    special_tokens = cfg.protocol.prompt_special_tokens
    device = next(lm.model.parameters()).device
    stop_strings = list(cfg.task.get("stop_strings") or [])   # a task setting (needle) only some tasks have
    sample_chat = chat and sample.dataset not in set(cfg.protocol.chat_template_skip or [])
    try:
        input_ids, compressed = encode_parts(sample, lm.tokenizer, sample_chat, device, special_tokens,
                                             cfg.protocol.compression_scope)
    except ValueError as error:   # a task without a context/question split, a template that rewrites it
        raise methods.ConfigError(str(error)) from None
    written_specials = special_text(sample.prompt, lm.tokenizer)
    if written_specials:
        sample.meta["special_text_in_prompt"] = written_specials
        if special_tokens == "parse" and not warned[0]:
            warned[0] = True
            log.warning("sample %s: the prompt contains special-token text %s, which "
                        "protocol.prompt_special_tokens=parse turns into control tokens, as the reference "
                        "scripts do (recorded per sample as special_text_in_prompt)", sample.id, written_specials)
    return Prompt(input_ids, compressed, generation_rules.stop_ids(cfg.protocol, sample.dataset, lm),
                  generation_rules.min_new_tokens(cfg.protocol, sample.dataset), stop_strings)


def transform_groups(todo: list) -> list[tuple]:
    """``todo`` split by K/V transform (``transform_key``), in first-seen order: ``[(key, [compressors])]``.
    Methods without a transform share one prefill, and so do methods with the same transform."""
    groups: dict = {}
    for c in todo:
        groups.setdefault(transform_key(c), []).append(c)
    return list(groups.items())


@contextlib.contextmanager
def transformed_for(job, lm, key):
    """The K/V transform ``key`` attached for the block (``harness.engine.transform.transformed``), yielding its
    log; nothing attached and None for ``key`` None. ``job``: the run's ``harness.run.runner.Plan``."""
    if key is None:
        yield None
        return
    from harness.engine.transform import transformed
    with transformed(lm.model, job.transforms[key]) as tlog:
        yield tlog


def transform_fields(lm, tlog, report, compressed: int, prompt_length: int, row: int, generated_tokens: int,
                     transforms: dict, transform: str) -> dict:
    """The record of row ``row`` of the decode (``harness.dynakv.accounting.row_fields``; ``generated_tokens`` fed
    back to the model) at the size of an element of the cache (the K projection's output dtype). RuntimeError
    when a layer of ``transforms`` saw no token, or not every generated token."""
    from harness.dynakv.accounting import row_fields, sliding_windows
    check_transformed(tlog, transforms)
    element = torch.empty((), dtype=lm.model.get_input_embeddings().weight.dtype).element_size()
    return row_fields(tlog, report, compressed, prompt_length, element, row, generated_tokens,
                      sliding_windows(lm.model), per_token_ranks=transform not in ("pca_uniform", "svd_weights"))


def check_transformed(tlog, transforms: dict) -> None:
    """Every (layer, K/V) of ``transforms`` went through its hook (RuntimeError naming the missing ones): a
    transform attached but not applied must never pass for one that was."""
    expected = {(layer, kind) for layer, pair in transforms.items() for kind, t in pair.items() if t is not None}
    missing = sorted(expected - {key for key, calls in tlog.calls.items() if calls})
    if missing:
        raise RuntimeError(f"the K/V transform was attached but layers {missing[:6]} saw no token; the model does "
                           "not route its keys/values through the hooked modules")


def append_row(job, compressor, sample: Sample, row: dict, writers: dict) -> None:
    """Append ``row`` to the compressor's predictions file for the sample's group (this rank's part file in
    a data-parallel run), opening it once per (method, group) in ``writers``. ``job``: the run's
    ``harness.run.runner.Plan``."""
    rank, world = distributed.world()
    key = (id(compressor), sample.group)
    if key not in writers:
        suffix = distributed.PART.format(rank=rank) if world > 1 else ""
        writers[key] = results.PredictionWriter(job.folders[id(compressor)], sample.group, suffix)
    writers[key].append(row)
