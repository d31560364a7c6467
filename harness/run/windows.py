"""``decode=continuous``: the (sample, method) rows of many samples decoded together
(``harness.engine.continuous.decode_rows``), written as they finish.

* **Windows.** The samples with work left (a resumed run queues only the (sample, method) pairs not done) are
  taken ``decode_prompts`` at a time, in task order. A window's prefilled caches are held until its last row
  finishes (FullKV's rows hold the whole prompt), so on a GPU a window also closes early, after the prompt whose
  caches bring the allocated memory past ``decode_window_memory`` of what was available when the window started
  (``memory_limit``; the rest is left to the slot buffers): its samples not yet prefilled open the next window
  (checked in every transform group: a sample cut in a later group keeps that group's methods and the later ones).
  Measured on an H200 (Llama-3-8B shape, ~6K-token prompts, six methods, query-head caches): 64 prompts hold
  ~150 GB and ran out of memory, which this bound prevents.
* **Order.** Within a window the prompts are prefilled, and their rows queued, longest work first: most new
  tokens allowed (``max_new_tokens``), then longest prompt, then task order. ``decode_rows`` admits waiting
  rows in that order, so the long rows start first and the short ones fill the slots that free up near the
  end (longest-processing-time-first: the batch stays full until the window's last steps).
* **K/V transforms.** Rows decoded together share the attached transforms, so a window runs once per
  transform group (``harness.run.rows.transform_groups``: methods without one, then each transform), with that
  group's transform attached to its prefills and to its decode, as ``harness.run.runner.generate_sample`` does
  per sample. Each prefill gets a log of its own (the prompt's kept ranks), the decode one for all rows (each
  row's generated tokens' ranks under its index). Under a split ``compression_scope`` a transform group's
  methods are prefilled one at a time, as there (each method's appended question is in its own log).
* **Rows.** Each row is written the moment it finishes (``on_done``), with the fields ``generate_sample``
  writes (``harness.run.rows``); an interrupted run keeps every finished row. Rows are therefore appended in
  the order they finish; the run puts each file back in sample order at its end (``results.in_sample_order``,
  called by ``harness.run.runner.finish``). Readers do not depend on the order (``results.finished`` is keyed
  by sample, summaries and scorers aggregate), but sums then add up in the same order as the other paths.
* **seconds.** Under continuous decoding a row has no wall time of its own (its prefill and steps are shared
  with the window's other rows): a row's ``seconds`` is the wall time since the previous row of its window
  (and transform group) finished, the first row's since the window started (its prefills included). A
  window's rows' ``seconds`` add up to its wall time, and their mean is the wall time per row.
* **Not here.** A model spread over several devices (``usable``) runs today's path (``generate_sample`` per
  sample, batched, which decodes it plain), as do tasks scored without generating (``Task.evaluate``).
  ``decode_batch`` and ``decode_compile`` apply to ``decode=batched`` only; the slots follow the free memory
  (``harness.engine.continuous``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from harness.engine.continuous import ContinuousStats, decode_rows, prompt_rows
from harness.engine.generate import Generation
from harness.run.rows import (
    append_row,
    compression_fields,
    prompt_input,
    result_row,
    save_positions,
    transform_fields,
    transform_groups,
    transform_key,
    transformed_for,
)

log = logging.getLogger(__name__)


def usable(lm) -> bool:
    """Whether continuous decoding can decode this model: its weights on one device (the slot buffers and
    graphs assume one; a ``device_map`` model runs the per-sample path, logged once)."""
    devices = {p.device for p in lm.model.parameters()}
    if len(devices) > 1:
        log.warning("decode=continuous: the model lies on %d devices (%s); its samples run one at a time on the "
                    "plain path instead (the same tokens)", len(devices), ", ".join(sorted(map(str, devices))))
        return False
    return True


@dataclass
class _Pending:
    """One queued row: its sample (position in the window), method, compression report and prefill log."""
    k: int
    compressor: object
    report: dict | None
    prefill_log: object


def memory_limit(device, fraction: float) -> int | None:
    """The allocated bytes a window's prefilled caches may bring ``device`` to: what is allocated now plus
    ``fraction`` of what is available (free, plus reserved by PyTorch's allocator but unused). None on a CPU
    (no limit: the host's memory is not measured)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    return int(allocated + fraction * (free + torch.cuda.memory_reserved(device) - allocated))


def allocated_bytes(device) -> int:
    """Bytes allocated on ``device`` by PyTorch (0 on a CPU)."""
    return torch.cuda.memory_allocated(device) if getattr(device, "type", "cpu") == "cuda" else 0


def generate_windows(cfg, job, lm, chat: bool, samples: list, digests: dict, done: dict, writers: dict,
                     warned: list, bar) -> None:
    """Every (sample, method) of ``samples`` not in ``done``, at most ``decode_prompts`` samples at a time and,
    on a GPU, as many as ``decode_window_memory`` lets a window hold (the module docstring); rows appended
    through ``harness.run.rows.append_row`` as they finish, ``bar`` advanced per row."""
    if cfg.decode_compile:
        log.warning("decode_compile=true applies to decode=batched; decode=continuous decodes without it")
    pending = deque()
    for sample in samples:
        todo = [c for c in job.compressors if (sample.group, sample.id) not in done[id(c)]]
        if todo:
            pending.append((sample, todo))
    size, count = int(cfg.decode_prompts), 0
    while pending:
        window = [pending.popleft() for _ in range(min(size, len(pending)))]
        count += 1
        bar.set_postfix_str(f"window {count} ({len(pending)} samples wait)")
        left = decode_window(cfg, job, lm, chat, window, digests, writers, warned, bar)
        pending.extendleft(reversed(left))        # the next window starts with them, in task order


def decode_window(cfg, job, lm, chat: bool, window: list, digests: dict, writers: dict, warned: list, bar) -> list:
    """One window: ``[(sample, methods to do)]``, once per transform group. Returns the work left for the next
    window, ``[(sample, methods still to do)]`` in the order given: in each group, once the caches prefilled so far
    reach the memory limit (``memory_limit``; checked before every prompt but the group's first, so every window
    makes progress), the samples not yet prefilled stop there; they keep that group's and the later groups'
    methods, and the later groups of this window run on the samples that were prefilled."""
    prompts = [prompt_input(cfg, lm, chat, sample, warned) for sample, _ in window]
    order = sorted(range(len(window)), key=lambda k: (-window[k][0].max_new_tokens, -prompts[k].length, k))
    keys = [key for key, _ in transform_groups([c for _, todo in window for c in todo])]
    device = next(lm.model.parameters()).device
    limit = memory_limit(device, float(cfg.decode_window_memory))
    left: dict[int, tuple] = {}
    for g, key in enumerate(keys):
        start = time.perf_counter()
        rows, queued = [], []
        for position, k in enumerate(order):
            if limit is not None and position > 0 and allocated_bytes(device) > limit:
                later = set(keys[g:])       # the groups these samples still need (earlier ones are done)
                for j in order[position:]:
                    sample, todo = window[j]
                    still = [c for c in todo if transform_key(c) in later]
                    if still:
                        left[j] = (sample, still)
                log.info("window: %d of %d samples prefilled%s, their caches at the memory limit (%.1f GiB allocated: "
                         "decode_window_memory=%s of what was available); the other %d go to the next window",
                         position, len(order), "" if key is None else " (K/V transform group)", limit / 2**30,
                         cfg.decode_window_memory, len(order) - position)
                order = order[:position]
                break
            sample, todo = window[k]
            group = [c for c in todo if transform_key(c) == key]
            prompt = prompts[k]
            # under a split scope each method's appended question is transformed on its own cache (generate_sample)
            one_by_one = key is not None and prompt.compressed < prompt.length
            for batch in ([[c] for c in group] if one_by_one else [group] if group else []):
                with transformed_for(job, lm, key) as prefill_log:
                    built, reports = prompt_rows(lm.model, lm.tokenizer, prompt.input_ids, batch,
                                                 sample.max_new_tokens, prompt.stops, prompt.stop_strings,
                                                 prompt.min_new_tokens, compressed_tokens=prompt.compressed)
                rows += built
                queued += [_Pending(k, c, report, prefill_log) for c, report in zip(batch, reports)]
        prefilled = time.perf_counter()
        writer = _RowWriter(cfg, job, lm, window, prompts, queued, digests, writers, bar, key, start)
        stats = ContinuousStats()
        with transformed_for(job, lm, key) as decode_log:
            writer.decode_log = decode_log
            decode_rows(lm.model, rows, cuda_graphs=bool(cfg.cuda_graphs), stats=stats, on_done=writer)
        log.info("window of %d samples%s: %d rows in %.1f s (prefill %.1f s; %d steps, occupancy %.0f %%, "
                 "%d allocation(s), mean score %s)", len({p.k for p in queued}), "" if key is None else " (K/V transform)",
                 len(rows), time.perf_counter() - start, prefilled - start, stats.steps, 100 * stats.occupancy,
                 stats.allocations, writer.mean_score())
    return [left[k] for k in sorted(left)]


class _RowWriter:
    """``on_done`` of ``decode_rows``: row ``i`` finished -> its results row, appended at once."""

    def __init__(self, cfg, job, lm, window, prompts, queued, digests, writers, bar, key, start: float):
        self.cfg, self.job, self.lm, self.window, self.prompts, self.queued = cfg, job, lm, window, prompts, queued
        self.digests, self.writers, self.bar, self.key = digests, writers, bar, key
        self.last = start
        self.decode_log = None
        self.scores: list[float] = []

    def __call__(self, i: int, tokens: list[int], stopped_by: str) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        entry = self.queued[i]
        sample, _ = self.window[entry.k]
        prompt = self.prompts[entry.k]
        c = entry.compressor
        out = Generation(tokens, self.lm.tokenizer.decode(tokens, skip_special_tokens=True), prompt.length,
                         stopped_by, entry.report)
        extra = {}
        if self.decode_log is not None:
            extra = transform_fields(self.lm, self.row_log(i, entry.prefill_log), out.report, prompt.compressed,
                                            prompt.length, i, len(tokens) - 1, self.job.transforms[self.key],
                                            c.transform)
        scope = self.cfg.protocol.compression_scope
        row = result_row(self.job.task, sample, out, seconds, c) | {
            "sample_sha256": self.digests[(sample.group, sample.id)],
            **compression_fields(c, prompt.compressed, scope), **extra}
        if self.cfg.save_kept_positions and out.report is not None:
            save_positions(self.job.folders[id(c)], sample.id, out.report)
        append_row(self.job, c, sample, row, self.writers)
        self.scores.append(row["score"])
        self.bar.update(1)
        log.debug("%s %s: %r", self.job.folders[id(c)].name, sample.id, out.text[:80])

    def row_log(self, i: int, prefill_log):
        """A log of row ``i`` alone: its prompt's prefill calls and, as row ``i``, its generated tokens' ranks."""
        from harness.engine.transform import TransformLog
        merged = TransformLog(calls=prefill_log.calls, dims={**prefill_log.dims, **self.decode_log.dims})
        merged.set_generated(i, self.decode_log.generated_row(i))
        return merged

    def mean_score(self) -> str:
        return f"{100 * sum(self.scores) / len(self.scores):.1f}" if self.scores else "-"
