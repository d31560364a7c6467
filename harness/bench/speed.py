"""What each method costs and saves: ``kvh bench`` (``make bench``).

For a model config (default: Llama-3-8B's shape with random weights; speed does not depend on the
weight values, and every measured decode runs a fixed number of tokens) it measures, in sections
(``--sections``, all by default):

``methods``     per context length and method: prefill + compression time (CUDA events after a
                warm-up, median of ``--repeats``), the overhead over FullKV's prefill, peak GPU
                memory of the prefill, the KV bytes kept, and decode ms/token at batch 1 on the
                plain path (a model call per token on the growing cache, as the reference scripts
                decode) and on the fast path (fixed-shape slots, one CUDA graph per step), with the
                achieved memory bandwidth of the fast step;
``batches``     fast-path decode throughput with the kept cache repeated to each of ``--batches``
                rows, up to the largest batch that fits (stops at the first out-of-memory);
``sweep``       the six-method LongBench-16 sweep at ``--budget`` through the code path of ``make longbench``
                (``harness.run.runner.run``, task=longbench, on the model already loaded) on synthetic
                data: ``--sweep-samples`` samples (random text of LongBench's prompt lengths, its max new
                tokens, truncated to ``--sweep-max-input``) apportioned over the 16 datasets as LongBench's
                3,750 are, written to ``<out>/sweep``; per ``--sweep-decode`` path a 2-sample warm-up run,
                then the timed run into ``<out>/sweep/run_<decode>``, its rows checked, and the projected
                time of the full sweep (measured x 3750 / samples) against the 30-minute target;
                ``--sweep-plain`` also projects the reference scripts' way (one sample and one method at a
                time, plain decode) from timed runs of K and 2K new tokens per dataset (``plain_projection``);
``kvpress``     kvpress (the closest peer) on the same model, contexts and SnapKV setting, in a
                subprocess with its own transformers (``--kvpress-site``; see
                ``harness/bench/kvpress.py``): prefill + compression, peak memory and end-to-end
                time per sample against ours;
``divergence``  the fast path against the plain path on the same prompts: rows whose greedy tokens
                differ (bf16 reductions in another order can flip near-ties; on the CPU the paths
                are token-identical, tests/test_batched.py).

The weight-read floor of a decode step is the model's weight bytes over the GPU's measured
device-to-device copy bandwidth. Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``.
On a CPU the same code runs (wall-clock timers, no GPU memory, no graphs) for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import methods
from harness import config
from harness.engine import batched
from harness.engine.cache import make_cache
from harness.engine.generate import decode_one, generate, prefill
from harness.engine.hook import attach
from harness.engine.models import load_model
from harness.engine.shared import generate_many
from harness.run import results

KVPRESS_SCRIPT = Path(__file__).resolve().with_name("kvpress.py")   # run alone, with kvpress's own transformers
SECTIONS = ("methods", "batches", "sweep", "kvpress", "divergence")
SIX = ["fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv"]

# LongBench (THUDM/LongBench at 2e00731): English and code datasets -> (max new tokens from pred.py's
# dataset2maxlen, average length in words from task.md; reference-eval.md lists both).
LONGBENCH_SHAPE = {
    "narrativeqa": (128, 18409), "qasper": (128, 3619), "multifieldqa_en": (64, 4559), "hotpotqa": (32, 9151),
    "2wikimqa": (32, 4887), "musique": (32, 11214), "gov_report": (512, 8734), "qmsum": (512, 10614),
    "multi_news": (512, 2113), "trec": (64, 5177), "triviaqa": (32, 8209), "samsum": (128, 6258),
    "passage_count": (32, 11141), "passage_retrieval_en": (32, 9289), "lcc": (64, 1235), "repobench-p": (64, 4206),
}
TOKENS_PER_WORD = 1.3   # an approximation for English with Llama-3's tokenizer (whitespace words -> tokens)
# LongBench-16's test samples per dataset (THUDM/LongBench task.md, the line counts of data.zip's jsonl files;
# harness.longbench.metrics.DATASET_SIZES agrees): 3,750 in all, what a full sweep runs per method.
LONGBENCH16_SIZES = {name: 200 for name in LONGBENCH_SHAPE} | {"multifieldqa_en": 150, "lcc": 500, "repobench-p": 500}
LONGBENCH16_TOTAL = sum(LONGBENCH16_SIZES.values())
SWEEP_TEMPLATE = "{context}\n\nQuestion: {input}\nAnswer:"   # ours, for the synthetic data (not LongBench's prompts)
SWEEP_PROTOCOL = "dynamickv_paper"   # make longbench's default PROTOCOL
SWEEP_DECODES = ("continuous", "batched", "plain")
TARGET_MINUTES = 30                  # the goal for a full six-method LongBench-16 sweep


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.stop.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.stop)
        else:
            self.ms = 1000 * (time.perf_counter() - self.t0)


def wall_ms(device: torch.device, fn) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start), out


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.numel())


def build(name: str, budget: int, window: int, **extra) -> methods.KVCompressor:
    if name == "fullkv":
        return methods.build("fullkv")
    knobs = {"budget": budget, "window_size": window, **extra}
    if name == "streamingllm":
        knobs["sink_tokens"] = 4
    return methods.build(name, **knobs)


# ---- methods: prefill, compression, memory, decode at batch 1 ------------------------------------

def prefill_cost(model, compressor, input_ids, repeats: int) -> tuple[dict, object, torch.Tensor]:
    device = input_ids.device
    times, peak = [], None
    for _ in range(repeats + 1):  # the first is a warm-up
        cache = make_cache(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with attach(model, compressor), Timer(device) as t:
            token = prefill(model, input_ids, cache)
        times.append(t.ms)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
    return {"prefill_ms": statistics.median(times[1:]), "peak_gib": peak, "kv_gib": kv_bytes(cache) / 2**30}, cache, token


def plain_decode_ms(model, compressor, cache, token, position: int, tokens: int) -> float:
    device = token.device
    times = []
    with attach(model, compressor):
        for _ in range(tokens):
            with Timer(device) as t:
                token = decode_one(model, token, cache, position)
            times.append(t.ms)
            position += 1
    return statistics.median(times[2:] or times)


def fast_decode(model, cache, token, position: int, tokens: int, rows: int = 1, repeats: int = 3,
                compiled: bool = False) -> dict:
    """The fast decode step (``harness.engine.batched``) with ``cache`` repeated to ``rows`` rows: ms per
    step (median over ``repeats`` runs of ``tokens`` steps), the bytes it reads, and the capture time."""
    device = token.device
    row = batched.row_layers(cache)
    shape = batched.layout([row] * rows, [list(range(rows))], tokens * repeats + 4, 64)
    slot = batched.allocate(shape, row[0].keys.dtype, device)
    batched.load(slot, [row] * rows, position)
    decoder = batched.Decoder(slot, rows, batched.vocab_size(model), compiled=compiled)
    decoder.reset(token.reshape(-1)[:1].repeat(rows), torch.full((rows,), position, device=device))
    out = {"rows": rows, "graph": False}
    with torch.no_grad(), batched.slot_routing(model, slot):
        if compiled:   # the first call compiles (or finds the compiled graph): not part of the step time
            with Timer(device) as t:
                decoder.step(model, False)
            out["compile_ms"] = t.ms
        if device.type == "cuda":
            with Timer(device) as t:
                out["graph"] = decoder.capture(model)
            out["capture_ms"] = t.ms
            if not out["graph"]:
                out["graph_error"] = decoder.graph_error
        runs = []
        for _ in range(repeats):
            with Timer(device) as t:
                for _ in range(tokens):
                    decoder.step(model, True)
            runs.append(t.ms / tokens)
    out["ms_per_step"] = statistics.median(runs)
    out["tokens_per_s"] = rows / out["ms_per_step"] * 1000
    out["kv_read_bytes"] = slot.nbytes
    del decoder, slot
    return out


def method_rows(lm, contexts, budget, window, names, repeats, decode_tokens, weights: int, bandwidth,
                compiled: bool = False, h2o_scorers=("reference",)) -> list[dict]:
    """Per context and method: prefill + compression time, its overhead over FullKV's prefill, peak memory and
    decode at batch 1 (plain, graphs, and compiled with ``compiled``). ``h2o_scorers``: H2O once per scorer
    (``methods/h2o.py``; a row's method is ``h2o`` for the reference scorer, ``h2o:<scorer>`` for another); a
    scorer after the first gets a prefill row only (its cache decodes like the first's)."""
    model = lm.model
    device = next(model.parameters()).device
    rows = []
    for n in contexts:
        ids = torch.randint(2, min(model.config.vocab_size, 30000), (1, n), device=device,
                            generator=torch.Generator(device).manual_seed(n))
        base = None
        runs = [(name, {}, False) for name in names if name != "h2o"]
        if "h2o" in names:      # one run per scorer; the first decodes, the others are prefill rows only
            at = names.index("h2o")
            runs[at:at] = [("h2o", {} if s == "reference" else {"scorer": s}, i > 0) for i, s in enumerate(h2o_scorers)]
        for name, extra, prefill_only in runs:
            compressor = build(name, budget, window, **extra)
            result, cache, token = prefill_cost(model, compressor, ids, repeats)
            if name == "fullkv":
                base = result["prefill_ms"]
            label = f"{name}:{extra['scorer']}" if extra else name
            if not prefill_only:
                result["decode_plain_ms"] = plain_decode_ms(model, compressor, cache, token, n, decode_tokens)
                # the same cache, now decode_tokens longer (the fast step's timing does not depend on it)
                fast = fast_decode(model, cache, token, n + decode_tokens, decode_tokens)
                result["decode_fast_ms"] = fast["ms_per_step"]
                result["graph"] = fast["graph"]
                result["capture_ms"] = fast.get("capture_ms")
                if bandwidth:
                    result["achieved_gbs"] = (weights + fast["kv_read_bytes"]) / (fast["ms_per_step"] / 1000) / 1e9
                if compiled:
                    fused = fast_decode(model, cache, token, n + decode_tokens, decode_tokens, compiled=True)
                    result["decode_compiled_ms"] = fused["ms_per_step"]
                    result["compile_ms"] = fused["compile_ms"]
            del cache
            rows.append({"context": n, "method": label, "budget": None if name == "fullkv" else budget, **result,
                         "overhead_pct": None if base is None else 100 * (result["prefill_ms"] / base - 1)})
            print(json.dumps(rows[-1]), flush=True)
            _free(device)
    return rows


def _fresh(model, compressor, ids):
    cache = make_cache(model)
    with torch.no_grad(), attach(model, compressor):
        token = prefill(model, ids, cache)
    return cache, token


def _free(device) -> None:
    batched.clear_pools()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def batch_rows(lm, context: int, budget: int, window: int, names, batches, tokens: int) -> list[dict]:
    """Fast-path throughput with the kept cache of one prompt repeated to each batch size."""
    model = lm.model
    device = next(model.parameters()).device
    ids = torch.randint(2, min(model.config.vocab_size, 30000), (1, context), device=device)
    out = []
    for name in names:
        compressor = build(name, budget, window)
        cache, token = _fresh(model, compressor, ids)
        for rows in batches:
            try:
                result = fast_decode(model, cache, token, context, tokens, rows=rows, repeats=2)
                out.append({"context": context, "method": name, "batch": rows, **result})
            except torch.cuda.OutOfMemoryError:
                out.append({"context": context, "method": name, "batch": rows, "oom": True})
                break
            finally:
                _free(device)
            print(json.dumps(out[-1]), flush=True)
        del cache
        _free(device)
    return out


# ---- sweep: a six-method LongBench-16 sweep through the runner, projected to the full 3,750 samples ----

def draw_length(name: str, rng: random.Random) -> int:
    """A prompt length in tokens for LongBench dataset ``name``: its average (words x ``TOKENS_PER_WORD``)
    times uniform(0.6, 1.4)."""
    return int(LONGBENCH_SHAPE[name][1] * TOKENS_PER_WORD * rng.uniform(0.6, 1.4))


def stratified_counts(samples: int, sizes: dict[str, int] = LONGBENCH16_SIZES) -> dict[str, int]:
    """``samples`` apportioned over the datasets of ``sizes`` in proportion to their sizes: the largest
    remainder method (exact integer arithmetic; ties in table order), then every dataset given at least
    one sample, taken from the dataset most over its quota. ``samples = sum(sizes)`` gives ``sizes``
    itself. ValueError when ``samples`` is not an integer of at least ``len(sizes)``."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < len(sizes):
        raise ValueError(f"sweep samples={samples!r}: must be an integer of at least {len(sizes)} (one sample "
                         f"per dataset of {len(sizes)}); LongBench-16 has {sum(sizes.values())}")
    total = sum(sizes.values())
    counts = {d: samples * n // total for d, n in sizes.items()}
    remainder = {d: samples * n % total for d, n in sizes.items()}
    names = list(sizes)
    for d in sorted(names, key=lambda d: -remainder[d])[: samples - sum(counts.values())]:   # stable: table order
        counts[d] += 1
    for d in names:
        if counts[d] == 0:   # most over its quota (count x total - samples x size), among those with two or more
            donor = max((e for e in names if counts[e] > 1), key=lambda e: counts[e] * total - samples * sizes[e])
            counts[donor] -= 1
            counts[d] = 1
    return counts


def sized_text(rng: random.Random, tokens: int, tokenizer) -> str:
    """Random text of about ``tokens`` of ``tokenizer``'s tokens: random lowercase words, tokenized, cut to
    ``tokens`` and decoded (exact for the random models' byte tokenizer; with a subword tokenizer re-encoding may
    differ by a few tokens where the cut splits a word)."""
    words = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(tokens))
    ids = tokenizer(words, add_special_tokens=False).input_ids[:tokens]
    return tokenizer.decode(ids)


def sweep_data(folder: Path, counts: dict[str, int], tokenizer, seed: int = 0) -> list[dict]:
    """Synthetic LongBench-16 data for ``task=longbench``: ``<folder>/data/<dataset>.jsonl`` with
    ``counts[dataset]`` rows each (``_id``, ``context``, ``input``, ``answers`` in the form the dataset's
    scorer parses, ``all_classes``) and ``<folder>/config/dataset2prompt.json`` (``SWEEP_TEMPLATE`` for
    every dataset: our own, not the official prompts) and ``dataset2maxlen.json`` (LongBench's max new
    tokens, ``LONGBENCH_SHAPE``).
    Contexts are ``draw_length`` of ``tokenizer``'s tokens of random words (``sized_text``; lowercase, so no
    special-token text); the task truncates the prompt to ``model.max_input_tokens``. Returns one record per sample:
    ``{"dataset", "id", "prompt"}`` (the formatted, untruncated prompt)."""
    rng = random.Random(seed)
    answers = {"passage_retrieval_en": "Paragraph 1", "passage_count": "1"}   # the forms their scorers parse
    data, tables = folder / "data", folder / "config"
    data.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    (tables / "dataset2prompt.json").write_text(json.dumps({d: SWEEP_TEMPLATE for d in counts}, indent=1))
    (tables / "dataset2maxlen.json").write_text(json.dumps({d: LONGBENCH_SHAPE[d][0] for d in counts}, indent=1))
    out = []
    for dataset, count in counts.items():
        lines = []
        for i in range(count):
            row = {"_id": f"{dataset}-{i}", "context": sized_text(rng, draw_length(dataset, rng), tokenizer),
                   "input": sized_text(rng, 12, tokenizer), "answers": [answers.get(dataset, "a")],
                   "all_classes": ["a", "b"]}
            lines.append(json.dumps(row))
            out.append({"dataset": dataset, "id": row["_id"], "prompt": SWEEP_TEMPLATE.format(**row)})
        (data / f"{dataset}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def sweep_overrides(model: str, folder: Path, results_dir: Path, decode: str, max_input: int, dtype: str,
                    budget: int, window: int, sets=(), run_sets=(), limit: int | None = None) -> list[str]:
    """The run's overrides (``harness.config.compose``): ``make longbench``'s run (task=longbench, protocol
    ``SWEEP_PROTOCOL``, the six methods at ``budget``) on the synthetic data in ``folder``, with every
    method's window ``window``, the model in ``dtype`` truncated to ``max_input``, stop tokens off (every row
    decodes its dataset's full max new tokens), no W&B, no progress bar. ``sets``: the bench's model
    overrides (``--set``); ``run_sets``: more overrides of the run, last (``--sweep-set``, e.g. decode_prompts=32)."""
    return ["task=longbench", f"task.data_dir='{folder / 'data'}'", f"task.config_dir='{folder / 'config'}'",
            f"model={model}", f"model.max_input_tokens={max_input}", f"model.dtype={dtype}",
            *[f"model.{kv}" for kv in sets], f"protocol={SWEEP_PROTOCOL}", f"protocol.dtype={dtype}",
            *[f"protocol.window_size.{name}={window}" for name in SIX if name != "fullkv"],
            "protocol.stop_tokens={default: [], samsum: []}", f"methods=[{','.join(SIX)}]", f"budgets=[{budget}]",
            f"decode={decode}", "wandb=false", "progress=never", f"results_dir='{results_dir}'",
            *run_sets, *([f"limit={limit}"] if limit else [])]


SWEEP_OWNED = ("decode", "methods", "budgets", "results_dir", "limit", "wandb", "task", "model", "protocol.window_size",
               "protocol.stop_tokens", "protocol.dtype", "protocol")
SWEEP_OWNED_EXACT = ("protocol",)     # the protocol's choice is the sweep's; its other keys (protocol.h2o_scorer) are not


def check_sweep_sets(parser, args) -> None:
    """``--sweep-set`` before the model loads: a key the sweep sets itself (``SWEEP_OWNED``: its label and its
    projection would then describe another run) is refused, and the run's settings are checked as ``kvh run``
    checks them before loading (``runner.checked_config``, the methods' knobs through ``runner.build_compressors``,
    and the fused H2O scorer against ``--dtype``). Exits through ``parser.error`` with the value and the fix."""
    from harness.run import runner
    for item in args.sweep_set:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" not in item or any(key == owned or (key.startswith(owned + ".") and owned not in SWEEP_OWNED_EXACT)
                                  for owned in SWEEP_OWNED):
            parser.error(f"--sweep-set {item}: the sweep sets {key!r} itself (or this is not KEY=VALUE); use the bench's "
                         "own options (--sweep-decode, --budget, --window, --model, --set, --sweep-samples) for those, "
                         "and --sweep-set for the run's other settings, e.g. decode_prompts=32 or "
                         "protocol.h2o_scorer=fused")
    if not args.sweep_set:
        return
    try:
        cfg = config.compose(sweep_overrides(args.model, Path(args.out) / "sweep", Path(args.out) / "sweep" / "check",
                                             args.sweep_decode[0], args.sweep_max_input, "bfloat16", args.budget,
                                             args.window, run_sets=args.sweep_set))
        cfg = runner.checked_config(cfg)
        compressors = runner.build_compressors(cfg)           # the methods' knobs, as the run builds them
        if args.dtype not in ("auto", None):
            runner.check_model_dtype(compressors, args.dtype)
    except Exception as error:  # noqa: BLE001 - any config error, named
        message = str(error) if isinstance(error, methods.ConfigError) else config.describe(error)
        parser.error(f"--sweep-set {' '.join(args.sweep_set)}: {message}".splitlines()[0])


def check_rows(summaries: list[dict], records: list[dict]) -> dict:
    """Every (sample, method) row of a sweep run, read back from its folders: one per sample of ``records``
    in each of the six folders, each with its dataset's max new tokens (``new_tokens``). RuntimeError naming
    what is missing or short. Returns ``{"rows", "prompt_tokens": [min, mean, max], "new_tokens"}``."""
    from harness.run import results as run_results
    if len(summaries) != len(SIX):
        raise RuntimeError(f"sweep: the run returned {len(summaries)} method summaries, not {len(SIX)}")
    want = {(r["dataset"], r["id"]) for r in records}
    prompts, new, count = [], 0, 0
    for summary in summaries:
        rows = run_results.finished(Path(summary["folder"]))
        if set(rows) != want:
            missing = sorted(want - set(rows))
            raise RuntimeError(f"sweep: {summary['folder']} has {len(rows)} rows, not the {len(want)} samples' "
                               f"(missing {missing[:5]}{' ...' if len(missing) > 5 else ''})")
        for (dataset, sample), row in rows.items():
            if row.get("new_tokens") != LONGBENCH_SHAPE[dataset][0]:
                raise RuntimeError(f"sweep: {summary['folder']}: {sample} generated {row['new_tokens']} tokens, not "
                                   f"{dataset}'s {LONGBENCH_SHAPE[dataset][0]} (stopped by {row.get('stopped_by')})")
            prompts.append(row["prompt_tokens"])
            new += row["new_tokens"]
            count += 1
    return {"rows": count, "prompt_tokens": [min(prompts), statistics.mean(prompts), max(prompts)], "new_tokens": new}


def timed_run(lm, overrides: list[str], results_dir: Path) -> tuple[float, list[dict]]:
    """``harness.run.runner.run`` on ``lm`` into a fresh ``results_dir`` (a previous one deleted): seconds
    (wall clock, synchronised on CUDA) and the method summaries. The synthetic files carry the official
    names, so the task's check of the official files' known sha256 (``longbench.KNOWN_SHA256``) is off
    during the run."""
    from unittest import mock

    from harness.run import runner
    from harness.tasks import longbench
    shutil.rmtree(results_dir, ignore_errors=True)
    cfg = config.compose(overrides)
    with mock.patch.dict(longbench.KNOWN_SHA256, clear=True):
        ms, summaries = wall_ms(next(lm.model.parameters()).device, lambda: runner.run(cfg, lm=lm))
    return ms / 1000, summaries


def plain_projection(lm, records: list[dict], compressors: list, max_input: int, tokens: int,
                     per_dataset: int, repeats: int = 3) -> dict:
    """The reference scripts' way, one sample and one method at a time on the plain path (a model call per
    token on a growing cache), projected to LongBench-16 from short runs: for the first ``per_dataset``
    samples of each dataset (prompt ids drawn at random, of the sample's prompt length in tokens, truncated
    to ``max_input``) and each method, ``generate(..., decode="plain")`` of K = ``tokens`` and of 2K new tokens
    is timed (seconds, wall clock, the median of ``repeats`` runs; after an untimed 2K-token run of each method on
    the first sample): per token = (t_2K - t_K) / K, fixed (prefill, compression) = t_K - K x per token, a sample's time = fixed +
    maxlen(dataset) x per token. The projection is the sum over datasets of LONGBENCH16_SIZES[dataset] x the
    mean over its measured samples of the six methods' times added up. Returns the measurements (seconds)
    and the projection (seconds and minutes)."""
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    maxlen = {d: v[0] for d, v in LONGBENCH_SHAPE.items()}
    chosen = [r for d in LONGBENCH16_SIZES for r in [x for x in records if x["dataset"] == d][:per_dataset]]
    high = min(model.config.vocab_size, 30000)
    measured, by_dataset = [], {}
    for k, record in enumerate(chosen):
        n = min(len(tok(record["prompt"]).input_ids), max_input)
        ids = torch.randint(2, high, (1, n), device=device, generator=torch.Generator(device).manual_seed(k))
        if k == 0:   # warm-up: kernels, allocator, each method's one-off setup for the cache lengths ahead
            for c in compressors:
                generate(model, tok, ids, c, 2 * tokens, [], decode="plain")
        sample_s = 0.0
        for c in compressors:
            times = []
            for count in (tokens, 2 * tokens):
                runs = []
                for _ in range(repeats):
                    ms, out = wall_ms(device, lambda: generate(model, tok, ids, c, count, [], decode="plain"))
                    if len(out.token_ids) != count:
                        raise RuntimeError(f"sweep plain: {c.method_name} generated {len(out.token_ids)} tokens, "
                                           f"not {count}")
                    runs.append(ms / 1000)
                times.append(statistics.median(runs))
            per_token = (times[1] - times[0]) / tokens
            fixed = times[0] - tokens * per_token
            projected = fixed + maxlen[record["dataset"]] * per_token
            measured.append({"dataset": record["dataset"], "id": record["id"], "prompt_tokens": n,
                             "method": c.method_name, "t_k_s": times[0], "t_2k_s": times[1],
                             "per_token_s": per_token, "fixed_s": fixed, "projected_s": projected})
            sample_s += projected
        by_dataset.setdefault(record["dataset"], []).append(sample_s)
        _free(device)
    per_sample = {d: statistics.mean(v) for d, v in by_dataset.items()}
    total = sum(LONGBENCH16_SIZES[d] * per_sample[d] for d in LONGBENCH16_SIZES)
    return {"tokens": tokens, "samples_per_dataset": per_dataset, "repeats": repeats, "measurements": measured,
            "negative_per_token": sum(m["per_token_s"] < 0 for m in measured),
            "measured_s": sum(m["t_k_s"] + m["t_2k_s"] for m in measured),
            "projected_sample_s": per_sample, "projected_longbench16_s": total,
            "projected_longbench16_min": total / 60}


def sweep(lm, model: str, out: Path, samples: int, budget: int, window: int, max_input: int,
          decodes=("continuous",), plain: bool = False, plain_samples: int = 1, plain_tokens: int = 16,
          sets=(), run_sets=(), plain_repeats: int = 3) -> dict:
    """The six-method sweep at ``budget`` as ``make longbench`` runs it (``harness.run.runner.run``, on the
    already loaded ``lm``), on ``samples`` synthetic LongBench-16 samples in LongBench's mix
    (``stratified_counts``, ``sweep_data`` into ``<out>/sweep``), once per decode path in ``decodes``, each
    after a 2-sample warm-up run (timed apart) and into a fresh ``<out>/sweep/run_<decode>``; the rows are
    read back and checked (``check_rows``). Projection: measured seconds x 3750 / ``samples``. ``plain``:
    also the one-at-a-time plain path's projection (``plain_projection``)."""
    from harness.run import runner
    folder = Path(out) / "sweep"
    device = next(lm.model.parameters()).device
    counts = stratified_counts(samples)
    records = sweep_data(folder, counts, lm.tokenizer)      # contexts measured in the model's own tokens
    dtype = lm.info["dtype"]
    common = {"model": model, "folder": folder, "max_input": max_input, "dtype": dtype, "budget": budget,
              "window": window, "sets": sets, "run_sets": run_sets}
    exact = {d: samples * n / LONGBENCH16_TOTAL for d, n in LONGBENCH16_SIZES.items()}
    result = {"mix_max_deviation": max(abs(counts[d] - exact[d]) for d in counts), "samples": samples, "counts": counts, "budget": budget, "window_size": window, "methods": SIX,
              "window_setting": "protocol.window_size.<method> (the method configs read their window there)",
              "protocol": SWEEP_PROTOCOL, "max_input_tokens": max_input, "dtype": dtype, "stop_tokens": "off",
              "run_overrides": list(run_sets),
              "longbench16_samples": LONGBENCH16_TOTAL, "target_minutes": TARGET_MINUTES, "runs": {}}
    for decode in decodes:
        warm_dir = folder / f"warmup_{decode}"
        warm_s, _ = timed_run(lm, sweep_overrides(results_dir=warm_dir, decode=decode, limit=2, **common), warm_dir)
        shutil.rmtree(warm_dir, ignore_errors=True)
        _free(device)
        results_dir = folder / f"run_{decode}"
        seconds, summaries = timed_run(lm, sweep_overrides(results_dir=results_dir, decode=decode, **common),
                                       results_dir)
        checked = check_rows(summaries, records)
        projected = seconds * LONGBENCH16_TOTAL / samples
        result["runs"][decode] = {"seconds": seconds, "warmup_seconds": warm_s, "samples": samples, **checked,
                                  "results_dir": str(results_dir), "projected_longbench16_s": projected,
                                  "projected_longbench16_min": projected / 60}
        print(f"sweep decode={decode}: {seconds:.1f} s for {samples} samples x 6 methods (warm-up {warm_s:.1f} s) -> "
              f"projected LongBench-16 sweep {projected / 60:.1f} min", flush=True)
        _free(device)
    if plain:
        cfg = runner.checked_config(config.compose(sweep_overrides(results_dir=folder / "plain", decode="plain",
                                                                   **common)))
        result["plain"] = plain_projection(lm, records, runner.build_compressors(cfg), max_input, plain_tokens,
                                           plain_samples, plain_repeats)
        minutes = result["plain"]["projected_longbench16_min"]
        print(f"sweep one at a time, plain: projected LongBench-16 sweep {minutes:.1f} min", flush=True)
        for run in result["runs"].values():
            run["plain_over"] = result["plain"]["projected_longbench16_s"] / run["projected_longbench16_s"]
    return result


# ---- kvpress ----------------------------------------------------------------------------------------

def kvpress_compare(lm, contexts, budget: int, window: int, kernel: int, repeats: int, new_tokens: int,
                    site: str | None, out: Path) -> dict:
    """kvpress's SnapKV against ours on the same model config, contexts and setting."""
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    config_file = out / "model_config.json"
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    config_file.write_text(json.dumps(config))
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site     # kvpress and the transformers it supports, alone on the path
    result_file = out / "kvpress.json"
    # run as a copy under another name: Python puts the script's folder first on sys.path, and next to
    # harness/bench/kvpress.py an `import kvpress` would find that file instead of the package
    script = out / "kvpress_bench.py"
    shutil.copyfile(KVPRESS_SCRIPT, script)
    command = [sys.executable, str(script), "--config", str(config_file),
               "--contexts", *map(str, contexts), "--budget", str(budget), "--window", str(window),
               "--kernel", str(kernel), "--repeats", str(repeats), "--new-tokens", str(new_tokens),
               "--out", str(result_file)]
    # kvpress loads its own copy of the model in its own process: both fit on one 80 GB GPU at 8B
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    theirs = json.loads(result_file.read_text())
    ours = []
    for n in contexts:
        ids = torch.randint(2, min(model.config.vocab_size, 30000), (1, n), device=device)
        row = {"context": n}
        for granularity in ("kv_head", "query_head"):
            compressor = build("snapkv", budget, window, kernel_size=kernel, granularity=granularity)
            times = []
            for _ in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms, gen = wall_ms(device, lambda: generate(model, tok, ids, compressor, new_tokens, []))
                assert len(gen.token_ids) == new_tokens
                times.append(ms)
            row[f"{granularity}_end_to_end_ms"] = statistics.median(times[1:])
            row[f"{granularity}_first_call_ms"] = times[0]   # includes the graph capture for new shapes
            if device.type == "cuda":
                row[f"{granularity}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            _free(device)
        ours.append(row)
    return {"kvpress": theirs, "ours": ours}


# ---- divergence ----------------------------------------------------------------------------------

def divergence(lm, prompts: int, lengths, budget: int, window: int, tokens: int, text_dir: str | None = None,
               baseline: bool = False) -> dict:
    """Fast vs plain decoding on the same prompts: random token ids, or (``text_dir``) windows of real
    text (the files of a directory, e.g. the Paul Graham essays), which a real model continues with
    confident logits. ``baseline``: also the plain path with SDPA's math backend against the plain
    path with the backend SDPA picks (flash on a GPU): two faithful implementations, whose
    disagreement is the model's own bf16 tie noise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    compressors = [build(name, budget, window) for name in SIX]
    corpus = None
    if text_dir:
        text = "\n\n".join(p.read_text(errors="ignore") for p in sorted(Path(text_dir).glob("*.txt")))
        corpus = torch.tensor(tok(text).input_ids, device=device)
    compared = differing = 0
    prefix = []
    per_method = {name: 0 for name in SIX}
    base_differing = 0
    for i in range(prompts):
        n = lengths[i % len(lengths)]
        if corpus is not None:
            start = (i * 7919) % max(1, corpus.numel() - n)
            ids = corpus[start:start + n][None]
        else:
            ids = torch.randint(2, min(model.config.vocab_size, 30000), (1, n), device=device,
                                generator=torch.Generator(device).manual_seed(1000 + i))
        fast = generate_many(model, tok, ids, compressors, tokens, [])
        for name, c, f in zip(SIX, compressors, fast):
            slow = generate(model, tok, ids, c, tokens, [], decode="plain")
            same = next((k for k, (a, b) in enumerate(zip(f.token_ids, slow.token_ids)) if a != b), tokens)
            compared += 1
            if same < tokens:
                differing += 1
                per_method[name] += 1
            prefix.append(same / tokens)
            if baseline:
                with sdpa_kernel([SDPBackend.MATH]):
                    other = generate(model, tok, ids, c, tokens, [], decode="plain")
                base_differing += other.token_ids != slow.token_ids
        _free(device)
    return {"rows": compared, "rows_differing": differing, "rate": differing / compared, "tokens": tokens,
            "mean_identical_prefix": statistics.mean(prefix), "per_method": per_method,
            "lengths": list(lengths), "prompts": prompts, "prompt_source": text_dir or "random token ids",
            "baseline_rows_differing": base_differing if baseline else None}


# ---- hardware ------------------------------------------------------------------------------------

def copy_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float | None:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s); None on the CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.ms)
    del src, dst
    return 2 * gib * 2**30 / (statistics.median(times) / 1000) / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- report --------------------------------------------------------------------------------------

def markdown(data: dict) -> str:
    hw = data.get("hardware") or {}
    floor = hw.get("weight_read_floor_ms")
    lines = [f"device: {data['device']}; model: {data['args']['model']} ({data['weight_gb']:.2f} GB of weights)"]
    if floor:
        lines.append(f"copy bandwidth {hw['copy_bandwidth_gbs']:.0f} GB/s (read + write), "
                     f"weight-read floor {floor:.2f} ms/step")
    rows = data.get("methods") or []
    if rows:
        lines += ["", "| context | method | budget | prefill ms | overhead vs FullKV | peak GiB | KV kept GiB | "
                  "decode plain ms/token | decode fast ms/token (/ compiled) | x floor (best) | achieved GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            over = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
            if r.get("decode_fast_ms") is None:     # a prefill-only row (another H2O scorer)
                lines.append(f"| {r['context']} | {r['method']} | {r['budget'] or 'full'} | {r['prefill_ms']:.1f} | "
                             f"{over} | {peak} | {r['kv_gib']:.3f} | (as above) | (as above) | - | - |")
                continue
            best = min(r["decode_fast_ms"], r.get("decode_compiled_ms") or float("inf"))
            ratio = f"{best / floor:.2f}" if floor else "-"
            compiled = f" / {r['decode_compiled_ms']:.2f}" if r.get("decode_compiled_ms") else ""
            achieved = f"{r['achieved_gbs']:.0f}" if r.get("achieved_gbs") else "-"
            lines.append(f"| {r['context']} | {r['method']} | {r['budget'] or 'full'} | {r['prefill_ms']:.1f} | {over} | "
                         f"{peak} | {r['kv_gib']:.3f} | {r['decode_plain_ms']:.2f} | {r['decode_fast_ms']:.2f}{compiled} | "
                         f"{ratio} | {achieved} |")
    if data.get("batches"):
        lines += ["", "| context | method | batch | ms/step | tokens/s | x floor |", "|---|---|---|---|---|---|"]
        for b in data["batches"]:
            if b.get("oom"):
                lines.append(f"| {b['context']} | {b['method']} | {b['batch']} | out of memory | | |")
            else:
                ratio = f"{b['ms_per_step'] / floor:.2f}" if floor else "-"
                lines.append(f"| {b['context']} | {b['method']} | {b['batch']} | {b['ms_per_step']:.2f} | "
                             f"{b['tokens_per_s']:.0f} | {ratio} |")
    s = data.get("sweep")
    if s:
        lines += ["", f"Sweep: the six-method LongBench-16 sweep as `make longbench` runs it (harness.run.runner, "
                  f"protocol {s['protocol']}, budget {s['budget']}, window {s['window_size']}, prompts truncated to "
                  f"{s['max_input_tokens']} tokens, stop tokens off so every row decodes its dataset's max new tokens"
                  f"{''.join(', ' + o for o in s.get('run_overrides') or [])}), "
                  f"timed on {s['samples']} synthetic samples in LongBench's mix (apportioned by dataset: at most "
                  f"{s.get('mix_max_deviation', 0):.1f} samples from the exact share; the projection is only as "
                  f"representative as that mix) and projected to the full "
                  f"{s['longbench16_samples']} (x {s['longbench16_samples']} / {s['samples']})", "",
                  "| path | measured s | warm-up s | rows | prompt tokens (min / mean / max) | "
                  "projected LongBench-16 sweep, min |", "|---|---|---|---|---|---|"]
        for decode, r in s["runs"].items():
            low, mean, high = r["prompt_tokens"]
            lines.append(f"| runner, decode={decode} | {r['seconds']:.1f} | {r['warmup_seconds']:.1f} | {r['rows']} | "
                         f"{low} / {mean:.0f} / {high} | {r['projected_longbench16_min']:.1f} |")
        p = s.get("plain")
        if p:
            lines.append(f"| one sample and one method at a time, plain decode (projected) | {p['measured_s']:.1f} | "
                         f"- | {len(p['measurements'])} | - | {p['projected_longbench16_min']:.1f} |")
            lines += ["", f"Plain projection: per sample and method, t_K and t_2K (K = {p['tokens']} new tokens, medians "
                      f"of {p.get('repeats', 1)} runs) on "
                      f"{p['samples_per_dataset']} sample(s) per dataset; per token = (t_2K - t_K) / K, fixed = t_K - K x "
                      "per token, a sample = fixed + maxlen(dataset) x per token; the sweep = sum over datasets of its "
                      f"size x the mean sample's six methods. Negative per-token estimates (timing noise): "
                      f"{p.get('negative_per_token', '-')} of {len(p['measurements'])}."]
            lines += [f"plain / runner decode={decode}: {r['plain_over']:.1f}x" for decode, r in s["runs"].items()
                      if r.get("plain_over")]
        for decode, r in s["runs"].items():
            met = "met" if r["projected_longbench16_min"] <= s["target_minutes"] else "not met"
            lines.append(f"Target: a full six-method LongBench-16 sweep in {s['target_minutes']} min; decode={decode} "
                         f"projects {r['projected_longbench16_min']:.1f} min ({met})")
    k = data.get("kvpress")
    if k and "error" not in k:
        theirs = {r["context"]: r for r in k["kvpress"]["rows"]}
        lines += ["", f"kvpress {k['kvpress']['kvpress']} (transformers {k['kvpress']['transformers']}), SnapKV "
                  f"budget {data['args']['budget']}, window {data['args']['window']}, kernel {data['args']['kernel']}, "
                  f"{k['kvpress']['new_tokens']} new tokens", "",
                  "| context | kvpress FullKV prefill ms | kvpress SnapKV prefill ms | kvpress peak GiB | "
                  "kvpress end to end ms | ours end to end ms (kv_head) | ours / kvpress | ours (query_head) | "
                  "ours peak GiB (kv_head) |", "|---|---|---|---|---|---|---|---|---|"]
        for o in k["ours"]:
            t = theirs[o["context"]]
            peak = t.get("snapkv_peak_gib")
            ours_peak = o.get("kv_head_peak_gib")
            lines.append(f"| {o['context']} | {t['fullkv_prefill_ms']:.1f} | {t['snapkv_prefill_ms']:.1f} | "
                         f"{'-' if peak is None else f'{peak:.1f}'} | {t['snapkv_end_to_end_ms']:.0f} | "
                         f"{o['kv_head_end_to_end_ms']:.0f} | "
                         f"{o['kv_head_end_to_end_ms'] / t['snapkv_end_to_end_ms']:.3f} | "
                         f"{o['query_head_end_to_end_ms']:.0f} | {'-' if ours_peak is None else f'{ours_peak:.1f}'} |")
    elif k:
        lines += ["", "kvpress: not run: " + k["error"].strip().splitlines()[-1]]
    d = data.get("divergence")
    if d:
        lines += ["", f"Divergence, fast vs plain decode ({d['prompts']} prompts of {d['lengths']} tokens from "
                  f"{d['prompt_source']}, six methods): {d['rows_differing']} of {d['rows']} rows differ within "
                  f"{d['tokens']} tokens (rate {d['rate']:.3f}); mean identical prefix {d['mean_identical_prefix']:.3f}; "
                  f"per method {d['per_method']}"]
        if d.get("baseline_rows_differing") is not None:
            lines.append(f"Baseline, plain decode with SDPA's math backend vs its default backend (both faithful): "
                         f"{d['baseline_rows_differing']} of {d['rows']} rows differ")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = data.get("methods") or []
    if not rows:
        return
    contexts = sorted({r["context"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows if r.get("decode_fast_ms") is not None))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(contexts)
    for k, n in enumerate(contexts):
        by = {r["method"]: r for r in rows if r["context"] == n}
        xs = [i + k * width for i in range(len(names))]
        axes[0].bar(xs, [by[m]["prefill_ms"] for m in names], width, label=f"{n} tokens")
        axes[1].plot(names, [by[m]["decode_plain_ms"] for m in names], "o--", label=f"plain, {n}")
        axes[1].plot(names, [by[m]["decode_fast_ms"] for m in names], "s-", label=f"fast, {n}")
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axes[0].set_ylabel("prefill + compression, ms")
    axes[0].set_yscale("log")
    axes[0].legend()
    floor = (data.get("hardware") or {}).get("weight_read_floor_ms")
    if floor:
        axes[1].axhline(floor, color="k", lw=1, ls=":", label="weight-read floor")
    axes[1].set_ylabel("decode ms/token, batch 1")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{data['args']['model']} on {data['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvh bench", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("--model", default="llama3_8b_random", help="a conf/model/*.yaml name")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=SIX, choices=SIX)
    parser.add_argument("--h2o-scorers", nargs="+", default=["reference"], choices=["reference", "fused"],
                        help="methods section: H2O once per scorer (methods/h2o.py; fused: Triton on a GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time the fast step through torch.compile")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256, 512])
    parser.add_argument("--batch-methods", nargs="+", default=["fullkv", "snapkv"], choices=SIX)
    parser.add_argument("--batch-context", type=int, default=32768)
    parser.add_argument("--sweep-samples", type=int, default=128,
                        help="synthetic LongBench-16 samples, apportioned over the 16 datasets in proportion to "
                             f"their sizes (at least 16); the projection scales the run by {LONGBENCH16_TOTAL} / this")
    parser.add_argument("--sweep-max-input", type=int, default=7950,
                        help="model.max_input_tokens of the sweep (the task truncates to it): LongBench's limit for "
                             "Llama-3-8B-Instruct")
    parser.add_argument("--sweep-decode", nargs="+", default=["continuous"], choices=SWEEP_DECODES,
                        help="the runner's decode path(s) to time, each a run of its own")
    parser.add_argument("--sweep-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides of the sweep's run config (kvh run's settings), e.g. decode_prompts=32")
    parser.add_argument("--sweep-plain", action="store_true",
                        help="also project the six methods one at a time on the plain path, from short timed runs")
    parser.add_argument("--sweep-plain-samples", type=int, default=1, help="samples per dataset the plain projection times")
    parser.add_argument("--sweep-plain-tokens", type=int, default=16,
                        help="K: the plain projection times K and 2K new tokens per sample and method")
    parser.add_argument("--sweep-plain-repeats", type=int, default=3,
                        help="runs per timing of the plain projection (their median)")
    parser.add_argument("--kvpress-site", default=None,
                        help="a directory with kvpress and a transformers it supports (<5.3), put alone on "
                             "PYTHONPATH for the kvpress subprocess; default: this Python's own packages")
    parser.add_argument("--kvpress-tokens", type=int, default=100)
    parser.add_argument("--divergence-prompts", type=int, default=8)
    parser.add_argument("--divergence-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--divergence-tokens", type=int, default=64)
    parser.add_argument("--divergence-text", default=None, help="a directory of .txt files: prompts are windows of it")
    parser.add_argument("--divergence-baseline", action="store_true",
                        help="also compare the plain path on SDPA's math backend against its default backend")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the model config, e.g. source=gguf path=/tmp/smollm2.gguf")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if "sweep" in args.sections:
        try:
            stratified_counts(args.sweep_samples)
        except ValueError as error:
            parser.error(f"--sweep-samples {args.sweep_samples}: {error}")
        for name in ("sweep_max_input", "sweep_plain_samples", "sweep_plain_tokens", "sweep_plain_repeats"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
        check_sweep_sets(parser, args)
    if "fullkv" not in args.methods:
        args.methods = ["fullkv", *args.methods]
    args.methods = ["fullkv"] + [m for m in args.methods if m != "fullkv"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = OmegaConf.load(config.config_dir() / "model" / f"{args.model}.yaml")
    cfg.dtype = args.dtype
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.set))
    lm = load_model(cfg)
    device = next(lm.model.parameters()).device
    weights = weight_bytes(lm.model)
    bandwidth = copy_bandwidth_gbs(device)
    data = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "args": vars(args),
            "weight_gb": weights / 1e9, "torch": torch.__version__, "hardware": {}}
    if bandwidth:
        data["hardware"] = {"copy_bandwidth_gbs": bandwidth, "weight_gb": weights / 1e9,
                            "weight_read_floor_ms": weights / (bandwidth * 1e9) * 1000}

    def save():
        (out / "bench.json").write_text(json.dumps(data, indent=1))
        (out / "bench.md").write_text(markdown(data) + "\n")

    with torch.no_grad():
        if "methods" in args.sections:
            data["methods"] = method_rows(lm, args.contexts, args.budget, args.window, args.methods, args.repeats,
                                          args.decode_tokens, weights, bandwidth, args.compile,
                                          list(dict.fromkeys(args.h2o_scorers)))
            save()
        if "batches" in args.sections:
            data["batches"] = batch_rows(lm, args.batch_context, args.budget, args.window, args.batch_methods,
                                         args.batches, max(4, args.decode_tokens // 2))
            save()
        if "sweep" in args.sections:
            data["sweep"] = sweep(lm, args.model, out, args.sweep_samples, args.budget, args.window,
                                  args.sweep_max_input, args.sweep_decode, args.sweep_plain, args.sweep_plain_samples,
                                  args.sweep_plain_tokens, args.set, args.sweep_set, args.sweep_plain_repeats)
            save()
        if "kvpress" in args.sections:
            data["kvpress"] = kvpress_compare(lm, args.contexts, args.budget, args.window, args.kernel, args.repeats,
                                              args.kvpress_tokens, args.kvpress_site, out)
            save()
        if "divergence" in args.sections:
            data["divergence"] = divergence(lm, args.divergence_prompts, args.divergence_lengths, args.budget,
                                            args.window, args.divergence_tokens, args.divergence_text,
                                            args.divergence_baseline)
            save()
    save()
    plot(data, out / "bench.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
