"""Continuous batching: greedy decoding of the compressed caches of many prompts in fixed-shape slots.

``harness.engine.batched.decode_caches`` decodes the variants of ONE prompt together: every row shares the
prompt length, ``max_new_tokens`` and one ``Stopping``, and the batch lasts until its longest row ends, so
the GPU idles between prompts and on rows that stopped early. Here the rows of many prompts (one per
(prompt, method) variant: ``Row``) share the same fixed-shape slot buffers, and a row that finishes is
replaced in place by the next waiting row, so the batch stays full and the shapes never change (a captured
CUDA graph stays valid). The buffers, the attention over them and the model forward are
``harness.engine.batched``'s (``Segment``, ``SlotCache``, ``allocate``, ``load_row``, ``slot_attention``).

* **Layouts (segments).** Rows are grouped into layout classes by their per-layer need: heads (KV heads,
  or query heads after a ``query_head`` compression) and slots (kept tokens plus the steps still to come,
  ``max_new_tokens - 1``). Classes are formed as ``group_rows`` forms segments: rows in increasing
  need, a new class whenever padding to the class's largest row per layer would exceed ``waste`` times the
  rows' own sizes (so FullKV's long KV-head caches get a segment of their own next to the short query-head
  caches). A class's segment has per layer the most heads and slots (rounded up to ``bucket``) of its rows.
* **Slots per segment.** At most ``slots`` rows per step and ``max_bytes`` of slot buffers (plus the
  per-row logits and bias, ``STEP_BYTES_PER_VOCAB``). Every class first gets one slot (in class order, while
  the budget allows), then slots are handed out one at a time to the class with the most decode steps to
  come (``max_new_tokens - 1`` summed over its rows) per slot it already has (D'Hondt apportionment:
  proportional to the work, so the classes take about as many steps), never more than a class has rows;
  ties go to the class of smaller rows.
  Classes that get no slot (memory) wait for a later allocation; if not even one slot fits, the first
  class (smallest rows) gets one slot anyway (a row is never dropped: it is then decoded alone).
* **Admission (deterministic).** A free slot takes the first waiting row, in the order given, of its own
  class; when that class has none left, the first waiting row, in the order given, of any class that fits
  the segment (every layer: the row's heads divide the segment's, its kept tokens plus ``max_new_tokens - 1``
  fit the capacity, same head size and window). Sort the rows (e.g. by length) to choose the order. A slot
  no waiting row fits goes idle (its fills go back to slot 0 and, like its position, stop advancing; its
  tokens are ignored). When the allocation has no row left, the rows that fit none of its segments are
  decoded in the next allocation, planned afresh from the rows still waiting.
* **Per-row state** (what ``decode_caches`` shares): each slot's input token, position (its own prompt
  length plus step), fill per layer (and so its mask, sliding windows included), its ``Stopping``,
  ``max_new_tokens``, and a ``[B, vocab]`` float32 logit bias (-inf at the ids ``Stopping.suppressed`` names
  for that row's next token: ``min_new_tokens`` per row). A step advances positions and fills by
  ``active`` (``[B, 1]``: 1 for a decoding slot, 0 for an idle one), inside the step.
* **Refill** between steps, in place only: ``load_row`` copies the new row's kept tokens to the front of its
  slot and sets its fills; then its first token, position, bias row and ``active`` are written. So one
  CUDA graph, captured once per allocation after the first rows are loaded, is replayed for every step.
  On the CPU (and where capture fails, reason in ``ContinuousStats.eager_reason``) the step runs eagerly.
  Allocations are not kept across calls (unlike ``decode_caches``' ``DecoderPool``: their size follows the
  free memory), and the step is not ``torch.compile``d.
* **K/V transforms** (``harness.engine.transform.transformed``): their hooks are part of the step (and of its
  graph); each generated token's kept ranks are written in place per row at that row's own step
  (``RowRankRecorder``) and handed to the log as the row finishes, under the row's index in ``rows``
  (``TransformLog.generated``).

Greedy results equal the plain path (``harness.engine.generate.decode_loop``, one prompt and one method at a
time) token for token on the CPU in float32 (tests/test_continuous.py; scripts/gpu_check_continuous.py on a
GPU). Rows are results per sample and per method: ``on_done`` is called as each row finishes, so a runner can
write results as they come (resumable).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from harness.engine import compat
from harness.engine.batched import (
    Decoder,
    RankRecorder,
    RowLayer,
    SlotCache,
    allocate,
    load_row,
    recording,
    row_layers,
    slot_routing,
    spans_devices,
    transform_log,
    vocab_size,
)
from harness.engine.shared import appended, compressed_cache, prefill_variants
from harness.engine.stopping import Stopping
from methods.base import KVCompressor

#: share of the free GPU memory (``torch.cuda.mem_get_info``) the slot buffers may take by default; the rest is
#: left to the step's activations, the graph's memory pool and the caches still waiting to be decoded
FREE_MEMORY_FRACTION = 0.5
CPU_MAX_BYTES = 2**30            # default budget of the slot buffers on the CPU
DEFAULT_SLOTS = {"cuda": 256, "cpu": 16}   # default most rows per step (H200, 8B: 7128 tokens/s at 128, 9427 at 384)
STEP_BYTES_PER_VOCAB = 16        # per slot and vocabulary entry: the bias, and the logits in float32 and their sum


@dataclass
class Row:
    """One row to decode: a prefilled (and compressed) transformers cache of one prompt and one method.

    ``cache``: from ``harness.engine.shared.compressed_cache`` (or a ``generate``-style prefill), one device;
    ``first_token``: the prefill's greedy token (an int, or a one-element tensor such as ``[1, 1]``);
    ``prompt_length``: the tokens the model has seen (the full prompt, appended suffix included: decode
    positions continue from it); ``max_new_tokens``: at most this many tokens, ``first_token`` included;
    ``stopping``: when this row stops (its own stop ids, stop strings, ``min_new_tokens``)."""

    cache: object
    first_token: int | torch.Tensor
    prompt_length: int
    max_new_tokens: int
    stopping: Stopping


@dataclass
class ContinuousStats:
    """What ``decode_rows`` did: per allocation its rows per segment (``segments``), per-layer capacities
    per segment (``capacities``) and the bytes of its key and value slot buffers (``buffer_bytes``: what each
    step reads, idle slots included); decode steps run; slot-steps offered and used by a decoding row (their
    ratio is ``occupancy``); rows loaded into a slot (``admitted``), of which into a slot another row had held in
    the same allocation (``refills``); rows finished without a decode step (``immediate``: ``max_new_tokens``
    1 or a stop at the first token); allocations that replayed a CUDA graph; the last capture failure."""

    segments: list[list[int]] = field(default_factory=list)          # per allocation: rows per segment
    capacities: list[list[tuple]] = field(default_factory=list)      # per allocation: per segment, slots per layer
    buffer_bytes: list[int] = field(default_factory=list)            # per allocation: bytes of its slot buffers
    steps: int = 0
    slot_steps: int = 0
    busy_slot_steps: int = 0
    admitted: int = 0
    refills: int = 0
    immediate: int = 0
    graphs: int = 0
    eager_reason: str | None = None

    @property
    def allocations(self) -> int:
        """Slot-buffer allocations made (more than one when the rows did not fit one allocation)."""
        return len(self.segments)

    @property
    def occupancy(self) -> float:
        """Share of the slot-steps that decoded a row (1.0: the batch was always full)."""
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 1.0


# ---- building rows -------------------------------------------------------------------------------

@torch.no_grad()
def prompt_rows(model, tokenizer, input_ids: torch.Tensor, compressors: list[KVCompressor], max_new_tokens: int,
                stop_token_ids=(), stop_strings=(), min_new_tokens: int = 0,
                compressed_tokens: int | None = None) -> tuple[list[Row], list[dict | None]]:
    """One shared prefill of ``input_ids [1, n]`` and one ``Row`` per compressor (with its report, None for
    FullKV), as ``harness.engine.shared.generate_many`` builds them for its batched path:
    ``compressed_tokens`` (the first ``c`` tokens compressed, the rest appended uncompressed per variant) and
    the compressors' ``compression_ratio`` resolve as there. Raises what ``generate_many`` raises for these
    arguments."""
    compressors, stopping, shared, c = prefill_variants(model, tokenizer, input_ids, compressors, max_new_tokens,
                                                        stop_token_ids, stop_strings, min_new_tokens, compressed_tokens)
    n = input_ids.shape[1]
    built, reports = [], []
    for compressor in compressors:
        cache, report = compressed_cache(shared, compressor)
        first = shared.first_token
        if c < n:
            first = appended(model, compressor, cache, input_ids[:, c:], c, stopping)
        if first.numel() != 1:
            raise ValueError(f"prompt_rows: {compressor.method_name}'s first token is {first.numel()} ids, not one")
        built.append((cache, first.reshape(1)))
        reports.append(report)
    # one host copy for every variant's first token
    firsts = torch.cat([first for _, first in built]).tolist() if built else []
    return [Row(cache, first, n, max_new_tokens, stopping) for (cache, _), first in zip(built, firsts)], reports


# ---- planning: layout classes and slots ------------------------------------------------------------

@dataclass(frozen=True)
class _Need:
    """One row's buffer needs per layer: heads, slots (kept tokens + steps), head size, window."""

    heads: tuple[int, ...]
    tokens: tuple[int, ...]
    dims: tuple[int, ...]
    windows: tuple

    @property
    def cost(self) -> int:
        return sum(h * t for h, t in zip(self.heads, self.tokens))


def _need(layers: list[RowLayer], max_new_tokens: int) -> _Need:
    steps = max_new_tokens - 1
    return _Need(tuple(r.keys.shape[1] for r in layers), tuple(r.keys.shape[2] + steps for r in layers),
                 tuple(r.keys.shape[3] for r in layers), tuple(r.window for r in layers))


def _fits(need: _Need, spec: tuple) -> bool:
    """Whether a row with ``need`` fits a segment of per-layer ``(heads, capacity, dim, window)`` ``spec``."""
    return all(heads % h == 0 and t <= capacity and d == dim and w == window
               for h, t, d, w, (heads, capacity, dim, window)
               in zip(need.heads, need.tokens, need.dims, need.windows, spec))


def _round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def _spec(needs: list[_Need], bucket: int) -> tuple:
    """Per layer ``(heads, capacity, dim, window)`` covering every need in ``needs``."""
    return tuple((max(n.heads[l] for n in needs), _round_up(max(n.tokens[l] for n in needs), bucket),
                  needs[0].dims[l], needs[0].windows[l]) for l in range(len(needs[0].heads)))


def plan_classes(needs: list[_Need], waste: float = 2.0) -> list[list[int]]:
    """Layout classes of rows (indices into ``needs``), in increasing need: consecutive rows in the order
    (head size and windows, cost, index) share a class while padding every row to the class's largest per
    layer (heads x slots) costs at most ``waste`` times the rows' own sizes and the class's heads stay a
    multiple of every row's. Deterministic."""
    order = sorted(range(len(needs)), key=lambda i: (needs[i].dims, repr(needs[i].windows), needs[i].cost, i))
    classes, current = [], []
    for i in order:
        trial = current + [i]
        members = [needs[j] for j in trial]
        layers = range(len(needs[i].heads))
        heads = [max(n.heads[l] for n in members) for l in layers]
        padded = len(trial) * sum(heads[l] * max(n.tokens[l] for n in members) for l in layers)
        own = sum(n.cost for n in members)
        same = all(n.dims == needs[i].dims and n.windows == needs[i].windows for n in members)
        divides = all(heads[l] % n.heads[l] == 0 for n in members for l in layers)
        if current and (padded > waste * own or not same or not divides):
            classes.append(current)
            trial = [i]
        current = trial
    if current:
        classes.append(current)
    return classes


def apportion(members: list[int], slot_bytes: list[int], slots: int, max_bytes: int,
              work: list[float] | None = None) -> list[int]:
    """Slots per class (``members``: its rows; ``slot_bytes``: bytes of one of its slots; ``work``: its decode
    steps to come, default ``members``), at most ``slots`` in all and ``max_bytes`` of ``slot_bytes``: first one
    slot per class in class order while they fit, then one at a time to the class with the most work per slot
    already given (``work[c] / (given[c] + 1)``, D'Hondt: the classes then take about as many steps each; ties
    to the lower index), never above ``members[c]``. When not one slot fits ``max_bytes``, the first class with
    rows gets one (a row is decoded alone rather than never)."""
    work = list(members) if work is None else work
    given = [0] * len(members)
    used = 0
    for c in range(len(members)):       # first one slot per class, while they fit: no class waits for a later allocation
        if members[c] and sum(given) < slots and used + slot_bytes[c] <= max_bytes:
            given[c] = 1
            used += slot_bytes[c]
    while sum(given) < slots:
        open_ = [c for c in range(len(members)) if given[c] < members[c] and used + slot_bytes[c] <= max_bytes]
        if not open_:
            break
        best = max(open_, key=lambda c: (work[c] / (given[c] + 1), -c))
        given[best] += 1
        used += slot_bytes[best]
    if not any(given):
        given[next(c for c in range(len(members)) if members[c])] = 1
    return given


# ---- the decoder ---------------------------------------------------------------------------------

class RowRankRecorder(RankRecorder):
    """``RankRecorder`` with a step per row: ``step`` is ``[B]`` int64 (each slot's own decode step, zeroed
    when the slot is refilled or goes idle, advanced by ``active``); row ``b``'s ranks of its step ``t`` go to
    ``buffers[key][t, b]``. ``steps`` must exceed every row's decode steps."""

    def __init__(self, steps: int, batch: int, device):
        super().__init__(steps, batch, device)
        self.step = torch.zeros(batch, dtype=torch.long, device=device)
        self.columns = torch.arange(batch, device=device)

    def write(self, key: tuple, ranks: torch.Tensor) -> None:
        """One decode step's ranks of ``key``, one per row (``[B, 1]`` or ``[B]``), each at its row's step."""
        self.buffer(key).index_put_((self.step, self.columns), ranks.reshape(self.batch).to(torch.int32))


class RowDecoder(Decoder):
    """A ``Decoder`` whose rows are independent: ``bias`` is ``[B, vocab]`` float32 (row ``b``'s suppressed
    ids at -inf), ``active`` ``[B, 1]`` int64 (1: the slot decodes a row; 0: idle, its position and its fills,
    reset to 0, stay).
    ``ids``, ``positions``: ``[B, 1]`` int64 as in ``Decoder``. Use ``start_row``/``suppress_row``/``idle_row``
    between steps (in place: a captured graph reads the same buffers); ``reset``/``suppress`` do not apply."""

    def __init__(self, cache: SlotCache, batch: int, vocab: int):
        super().__init__(cache, batch, vocab)
        device = cache.fills.device
        self.bias = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.active = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.suppressing_rows: list[tuple[int, ...]] = [()] * batch

    def reset(self, first_tokens, positions) -> None:
        """Not for this decoder (rows start one at a time): raises ``TypeError`` naming ``start_row``."""
        raise TypeError("RowDecoder rows start one at a time: use start_row(b, first_token, position)")

    def suppress(self, ids) -> None:
        """Not for this decoder (the bias is per row): raises ``TypeError`` naming ``suppress_row``."""
        raise TypeError("RowDecoder suppresses per row: use suppress_row(b, ids)")

    def start_row(self, b: int, first_token: int, position: int) -> None:
        """Slot ``b`` decodes a new row from ``first_token`` at ``position`` (its prompt length)."""
        self.ids[b, 0] = first_token
        self.positions[b, 0] = position
        self.active[b, 0] = 1
        if self.recorder is not None:
            self.recorder.step[b] = 0
            self.recorder.clear(b)

    def idle_row(self, b: int) -> None:
        """Slot ``b`` holds no row: its fills go back to slot 0 and stop advancing, as does its position (its
        tokens are ignored). A row that ended with its last slot filled would otherwise write past its buffer."""
        self.active[b, 0] = 0
        self.cache.fills[:, b] = 0
        if self.recorder is not None:
            self.recorder.step[b] = 0

    def suppress_row(self, b: int, ids: list[int]) -> None:
        """The ids slot ``b``'s next token may not be (its bias row rewritten only when they change)."""
        if tuple(ids) != self.suppressing_rows[b]:
            self.bias[b].zero_()
            if ids:
                self.bias[b, torch.tensor(ids, device=self.bias.device)] = float("-inf")
            self.suppressing_rows[b] = tuple(ids)

    def _step(self, model) -> None:
        logits = model(input_ids=self.ids, position_ids=self.positions, **compat.forward_kwargs(model, self.cache)).logits
        self.ids.copy_((logits[:, -1].float() + self.bias).argmax(dim=-1, keepdim=True))
        self.positions.add_(self.active)
        self.cache.fills.add_(self.active.view(1, -1))
        if self.recorder is not None:
            self.recorder.step.add_(self.active.view(-1))


# ---- decoding ------------------------------------------------------------------------------------

def default_max_bytes(device: torch.device) -> int:
    """Slot-buffer budget: ``FREE_MEMORY_FRACTION`` of the free memory of a CUDA ``device``, else
    ``CPU_MAX_BYTES``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * FREE_MEMORY_FRACTION)
    return CPU_MAX_BYTES


def _check(rows: list[Row], slots, max_bytes, bucket) -> None:
    for name, value in (("slots", slots), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"decode_rows: {name}={value!r} must be a positive integer, or None for the default "
                             "(e.g. slots=64, max_bytes=8 * 2**30)")
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"decode_rows: bucket={bucket!r} must be a positive integer (slot multiple, e.g. 64)")
    for i, row in enumerate(rows):
        if isinstance(row.max_new_tokens, bool) or not isinstance(row.max_new_tokens, int) or row.max_new_tokens < 1:
            raise ValueError(f"decode_rows: rows[{i}].max_new_tokens={row.max_new_tokens!r} must be an integer >= 1 "
                             "(the first token counts)")
        if row.prompt_length < 1:
            raise ValueError(f"decode_rows: rows[{i}].prompt_length={row.prompt_length!r} must be >= 1")
        if torch.as_tensor(row.first_token).numel() != 1:
            raise ValueError(f"decode_rows: rows[{i}].first_token must be one token id; got "
                             f"{torch.as_tensor(row.first_token).numel()} ids")
        if not isinstance(row.stopping, Stopping):
            raise ValueError(f"decode_rows: rows[{i}].stopping must be a harness.engine.stopping.Stopping, "
                             f"got {type(row.stopping).__name__}")
        if spans_devices(row.cache):
            raise ValueError(f"decode_rows: rows[{i}].cache spans several devices (device_map); decode it on the "
                             "plain path (harness.engine.generate.decode_loop)")


@torch.no_grad()
def decode_rows(model, rows: list[Row], slots: int | None = None, max_bytes: int | None = None, bucket: int = 64,
                waste: float = 2.0, cuda_graphs: bool = True, stats: ContinuousStats | None = None,
                on_done=None) -> list[tuple[list[int], str]]:
    """Greedy decoding of every ``Row`` (many prompts, many methods) with continuous batching; returns
    ``(tokens, stopped_by)`` per row in the order of ``rows``, as ``harness.engine.generate.decode_loop`` gives
    for each alone: at most ``max_new_tokens`` ids, the first token first; ``stopped_by`` is ``"stop_token"``,
    ``"stop_string"`` or ``"max_new_tokens"``.

    ``slots``: most rows per step (default ``DEFAULT_SLOTS`` for the device type); ``max_bytes``: budget of
    the slot buffers and the per-slot logits (default ``default_max_bytes``); ``bucket``: slot multiple of the
    capacities; ``waste``: most padding of a layout class (``plan_classes``); ``cuda_graphs``: capture the
    step once per allocation on a GPU; ``stats``: filled in when given; ``on_done(index, tokens, stopped_by)``:
    called as each row finishes (rows finishing at one step in slot order). The module docstring gives the
    slot policy. Every row's cache is read, never modified.

    Raises ``ValueError`` (naming the value and the fix) for ``slots``, ``max_bytes`` or ``bucket`` below 1, a
    row with ``max_new_tokens < 1``, ``prompt_length < 1``, more than one first token, no ``Stopping`` or a
    cache over several devices, rows whose caches differ in layers, dtype or device, and (``row_layers``) a
    cache with an empty layer; ``IntegrationError`` when the model does not route through the slot cache."""
    stats = stats if stats is not None else ContinuousStats()
    _check(rows, slots, max_bytes, bucket)
    results: list[tuple[list[int], str] | None] = [None] * len(rows)
    if not rows:
        return []
    layers = [row_layers(row.cache) for row in rows]
    keys0 = layers[0][0].keys
    for i, row in enumerate(layers):
        if len(row) != len(layers[0]) or row[0].keys.dtype != keys0.dtype or row[0].keys.device != keys0.device:
            raise ValueError(f"decode_rows: rows[{i}] has {len(row)} layers in {row[0].keys.dtype} on "
                             f"{row[0].keys.device}, rows[0] {len(layers[0])} in {keys0.dtype} on {keys0.device}; "
                             "decode the rows of one model (and dtype, device) together")
    device = keys0.device
    slots = slots or DEFAULT_SLOTS.get(device.type, DEFAULT_SLOTS["cpu"])
    max_bytes = max_bytes or default_max_bytes(device)
    firsts = [int(torch.as_tensor(row.first_token).reshape(-1)[0]) for row in rows]
    log = transform_log(model)

    def finish(i: int, tokens: list[int], reason: str) -> None:
        results[i] = (tokens, reason)
        if on_done is not None:
            on_done(i, tokens, reason)

    waiting = []
    for i, row in enumerate(rows):        # rows that end at their first token need no slot
        reason = row.stopping.reason([firsts[i]])
        if reason or row.max_new_tokens == 1:
            stats.immediate += 1
            finish(i, [firsts[i]], reason or "max_new_tokens")
        else:
            waiting.append(i)
    needs = {i: _need(layers[i], rows[i].max_new_tokens) for i in waiting}
    vocab = vocab_size(model)
    while waiting:
        allocation = _Allocation(model, rows, layers, firsts, needs, waiting, slots, max_bytes, bucket, waste, vocab,
                                 log, stats)
        allocation.run(cuda_graphs, finish)
        waiting = allocation.left()
    return results


class _Allocation:
    """One set of slot buffers planned for the rows ``waiting`` (``plan_classes``, ``apportion``) and the state
    of its slots: which row each decodes (``occupant``) and that row's tokens so far."""

    def __init__(self, model, rows, layers, firsts, needs, waiting, slots, max_bytes, bucket, waste, vocab, log,
                 stats: ContinuousStats):
        self.model, self.rows, self.layers, self.firsts, self.log, self.stats = model, rows, layers, firsts, log, stats
        self.waiting = waiting
        keys = layers[waiting[0]][0].keys
        classes = [[waiting[j] for j in members] for members in plan_classes([needs[i] for i in waiting], waste)]
        specs = [_spec([needs[i] for i in members], bucket) for members in classes]
        slot_bytes = [2 * keys.element_size() * sum(h * c * d for h, c, d, _ in spec) + STEP_BYTES_PER_VOCAB * vocab
                      for spec in specs]
        work = [sum(rows[i].max_new_tokens - 1 for i in members) for members in classes]
        given = apportion([len(m) for m in classes], slot_bytes, slots, max_bytes, work)
        kept = [c for c in range(len(classes)) if given[c]]
        self.shape = tuple((given[c], specs[c]) for c in kept)       # batched.layout's format
        self.own = [deque(sorted(classes[c])) for c in kept]         # each segment's own rows, in the order given
        self.fitting = [deque(i for i in waiting if _fits(needs[i], spec)) for _, spec in self.shape]
        self.taken: set[int] = set()
        stats.segments.append([given[c] for c in kept])
        stats.capacities.append([tuple(capacity for _, capacity, _, _ in specs[c]) for c in kept])

        self.batch = sum(given)
        self.device = keys.device
        self.cache = allocate(self.shape, keys.dtype, keys.device)
        stats.buffer_bytes.append(self.cache.nbytes)
        self.cache.seen = max(rows[i].prompt_length for i in waiting)   # cache_position only: positions are per row
        self.decoder = RowDecoder(self.cache, self.batch, vocab)
        if log is not None:
            longest = max(capacity for _, spec in self.shape for _, capacity, _, _ in spec)
            self.decoder.recorder = RowRankRecorder(longest + 1, self.batch, keys.device)
            self.decoder.transforms = log.transforms
        self.segment_of = [s for s, (count, _) in enumerate(self.shape) for _ in range(count)]
        self.occupant: list[int | None] = [None] * self.batch
        self.tokens: list[list[int]] = [[] for _ in range(self.batch)]
        self.held = [False] * self.batch

    def next_row(self, s: int) -> int | None:
        """The first waiting row (in the order given) of segment ``s``'s class, else of any class that fits it."""
        for queue in (self.own[s], self.fitting[s]):
            while queue and queue[0] in self.taken:
                queue.popleft()
            if queue:
                self.taken.add(queue[0])
                return queue.popleft()
        return None

    def admit(self, b: int) -> None:
        """Slot ``b`` takes the next row (its cache, first token, position, bias: in place), or goes idle."""
        i = self.occupant[b] = self.next_row(self.segment_of[b])
        if i is None:
            self.decoder.idle_row(b)
            return
        self.stats.admitted += 1
        self.stats.refills += self.held[b]
        self.held[b] = True
        load_row(self.cache, b, self.layers[i])
        self.decoder.start_row(b, self.firsts[i], self.rows[i].prompt_length)
        self.decoder.suppress_row(b, self.rows[i].stopping.suppressed(1))
        self.tokens[b] = [self.firsts[i]]

    def run(self, cuda_graphs: bool, finish) -> None:
        """Fill every slot, capture the step (CUDA), then step until no slot holds a row, refilling as rows end."""
        for b in range(self.batch):
            self.admit(b)
        for layer in self.cache.layers:
            layer.writes = layer.attention_calls = 0
        use_graphs = cuda_graphs and self.device.type == "cuda"
        with slot_routing(self.model, self.cache), recording(self.log, self.decoder):
            if use_graphs:
                if self.decoder.capture(self.model):     # the captured step ran eagerly: its routing is the graph's
                    self.cache.verify_routing()
                    self.stats.graphs += 1
                else:
                    self.stats.eager_reason = self.decoder.graph_error
            verify = self.decoder.graph is None          # an eager first step must go through the slot cache
            while any(i is not None for i in self.occupant):
                self.decoder.step(self.model, use_graphs)
                if verify:
                    self.cache.verify_routing()
                    verify = False
                self.collect(self.decoder.ids.view(-1).tolist(), finish)

    def collect(self, chosen: list[int], finish) -> None:
        """One step's tokens: each decoding slot appends its own; a row that stops is finished and its slot
        refilled, the others get their bias for the next token."""
        self.stats.steps += 1
        self.stats.slot_steps += self.batch
        for b, i in enumerate(self.occupant):
            if i is None:
                continue
            self.stats.busy_slot_steps += 1
            tokens = self.tokens[b]
            tokens.append(chosen[b])
            reason = self.rows[i].stopping.reason(tokens)
            if reason or len(tokens) == self.rows[i].max_new_tokens:
                if self.log is not None:       # the tokens fed back: all but the last; copies (the slot is reused)
                    ranks = self.decoder.recorder.rows(b, len(tokens) - 1)
                    self.log.set_generated(i, ranks)
                finish(i, tokens, reason or "max_new_tokens")
                self.admit(b)
            else:
                self.decoder.suppress_row(b, self.rows[i].stopping.suppressed(len(tokens)))

    def left(self) -> list[int]:
        """The rows (in the order given) this allocation did not take: they fit none of its segments."""
        return [i for i in self.waiting if i not in self.taken]
