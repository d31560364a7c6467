"""Batched, fixed-shape decoding of many compressed caches of one prompt, with CUDA graphs on a GPU.

After a shared prefill (``harness.engine.shared``) every method and budget has its own cache, and each layer
of each cache holds a different number of tokens. The plain path decodes them one at a time, one
model call per token, each call paying Python and kernel-launch overhead on every layer (the
reference scripts' ``generate`` loop; 25-110 ms/token for an 8B model on an H100 whose weight-read
floor is about 6 ms). Here the rows are decoded together:

* ``SlotCache``: per model layer one buffer ``[B, H, capacity, d]`` holding every row's kept tokens
  left-aligned, plus the capacity for the tokens still to come. Row ``b`` of layer ``l`` writes its
  decode step ``t`` at slot ``start[l, b] + t``; the attention mask of that row is computed from the
  same numbers (slots ``<= start + t``, and for sliding-window layers also ``> start + t - window``),
  so rows of different lengths, and layers of different lengths, share one batch. Shapes never change
  during decoding.
* ``slot_attention``: the attention of one decode query against its row's valid slots, registered
  with transformers' ``AttentionInterface`` (and with no mask function, so transformers builds no
  mask at all): PyTorch's ``scaled_dot_product_attention`` with the query heads of each KV head as
  its query rows, so each KV head is read once (no ``repeat_kv`` copy); buffers of ``LONG_BUFFER``
  slots or more use two matmuls instead (``Segment.attend`` says why).
* Rows sharing a buffer layout form a *segment* (per layer ``[rows, H, capacity, d]``); a batch may
  hold several (FullKV's long KV-head cache next to the short query-head caches of the compressed
  methods), all decoded in the same forward, so the weights are read once per step for all rows.
* ``Decoder``: one greedy step (model forward, argmax, positions and slots advanced) runs eagerly on
  the CPU and is captured once into a CUDA graph on a GPU, then replayed: a decode step is one graph
  launch. Graphs (with their buffers) are kept and reused for later prompts whose bucketed shapes
  match (capacities are rounded up to ``bucket`` slots). Where capture fails the step runs eagerly and
  the reason is recorded.
* Rows stop on their own (``harness.engine.stopping.Stopping``: stop token, stop string, ``max_new_tokens``);
  a finished row still rides along in the fixed-shape batch until the group finishes, its tokens
  ignored. ``min_new_tokens`` is a bias added to the logits inside the step (-inf at the stop ids
  while it applies), updated in place between steps, so a captured graph needs no re-capture.

``harness.engine.continuous`` reuses these buffers and this step for the rows of many prompts at once, refilling
a finished row's slot in place (``load_row``) with the next waiting row (continuous batching).

Greedy results equal the plain path (``harness.engine.generate.decode_loop``) token for token on the CPU
(tests/test_batched.py); on a GPU in bf16 the reductions differ in order, so rare near-ties can flip
(``kvh bench --divergence`` reports the rate).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from harness.engine import compat, hook
from harness.engine.cache import text_config
from harness.engine.compat import IntegrationError
from harness.engine.stopping import Stopping
from methods.base import repeat_heads

#: set on a model while K/V transforms are attached (``harness.engine.transform.transformed``): their log
TRANSFORMS_ATTACHED = "_kv_harness_transforms_attached"


def transform_log(model):
    """The ``TransformLog`` of the K/V transforms attached to ``model`` (``harness.engine.transform.transformed``),
    None when none are."""
    return getattr(model, TRANSFORMS_ATTACHED, None)


@contextlib.contextmanager
def decoding_row(model, row: int):
    """Plain decoding of row ``row`` (one model call per token): the attached transforms' hooks record each
    generated token's kept ranks as that row's (``TransformLog.generated``). Nothing when none are attached."""
    log = transform_log(model)
    if log is None:
        yield
        return
    log.row = row
    try:
        yield
    finally:
        log.row = None


class RankRecorder:
    """Kept ranks of the generated tokens while K/V transforms are attached, written in place so that a
    captured CUDA graph records them on every replay: per ``(layer, kind)`` a ``[steps, B]`` int32 buffer
    (made at the first write), row ``step`` written by every hooked call of a decode step; ``step`` (``[1]``
    int64) advances after each step's forward. ``steps`` bounds the decode steps (a slot buffer's capacity).
    Entries nothing wrote hold -1 (``clear`` at every new decode), so a step that bypassed a hook is seen as
    such (``TransformLog.generated`` refuses it) instead of showing an earlier prompt's ranks."""

    def __init__(self, steps: int, batch: int, device):
        self.steps, self.batch, self.device = steps, batch, device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, key: tuple) -> torch.Tensor:
        """The ``[steps, B]`` int32 buffer of ``key``, made (all -1) at its first use."""
        if key not in self.buffers:
            self.buffers[key] = torch.full((self.steps, self.batch), -1, dtype=torch.int32, device=self.device)
        return self.buffers[key]

    def write(self, key: tuple, ranks: torch.Tensor) -> None:
        """One decode step's ranks of ``key``, one per row (``[B, 1]`` or ``[B]``)."""
        self.buffer(key).index_copy_(0, self.step, ranks.reshape(1, self.batch).to(torch.int32))

    def clear(self, column: int | None = None) -> None:
        """Every buffer entry (or those of row ``column``) back to -1, in place; ``step`` is the caller's."""
        for buffer in self.buffers.values():
            (buffer if column is None else buffer[:, column]).fill_(-1)

    def rows(self, b: int, steps: int) -> dict:
        """Row ``b``'s ranks of its first ``steps`` steps: ``(layer, kind) -> [steps]``, copies (the buffers serve
        the next decode)."""
        return {key: buffer[:steps, b].clone() for key, buffer in self.buffers.items()}

SLOT_ATTENTION = "kvharness_slots"
LONG_BUFFER = 4096   # slots from which a segment's attention uses two matmuls instead of SDPA (see Segment.attend)
_ACTIVE: dict[int, "SlotLayer"] = {}  # id(attention module) -> its layer of the cache being decoded


class Segment:
    """Rows ``[start, stop)`` of the batch that share one buffer layout in one layer.

    ``keys``, ``values``: ``[rows, H, capacity, d]`` zero-filled buffers (H: KV heads, or query heads
    for query-head caches); ``fill``: ``[rows]`` int64, each row's next slot to write (a view into
    ``SlotCache.fills``); ``window``: the layer's sliding window in tokens, None for full attention.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, fill: torch.Tensor, window: int | None, start: int):
        self.keys, self.values = keys, values       # [rows, H, capacity, d], zero-filled (finite padding)
        self.fill = fill                            # [rows] next slot to write (a view into SlotCache.fills)
        self.window = window                        # sliding window of this layer, None for full attention
        self.start, self.stop = start, start + keys.shape[0]
        self.slots = torch.arange(keys.shape[2], device=keys.device)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write one decode token per row, ``[rows, Hkv, 1, d]`` (repeated to ``H`` heads when the
        segment holds query heads), at each row's ``fill`` slot, in place. ``fill`` is not advanced
        (``SlotCache.advance`` does that)."""
        rows, heads, _, dim = self.keys.shape
        if key_states.shape[1] != heads:
            key_states = repeat_heads(key_states, heads // key_states.shape[1])
            value_states = repeat_heads(value_states, heads // value_states.shape[1])
        index = self.fill.view(rows, 1, 1, 1).expand(rows, heads, 1, dim)
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)

    def mask(self) -> torch.Tensor:
        """``[rows, 1, 1, capacity]`` bool: True where the row's current query may attend (after
        ``write``): slots ``<= fill``, and ``> fill - window`` for a sliding-window layer."""
        last = self.fill[:, None]
        allowed = self.slots[None, :] <= last
        if self.window is not None:
            allowed &= self.slots[None, :] > last - self.window
        return allowed[:, None, None, :]

    def attend(self, query: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
        """``query [rows, Hq, 1, d]`` -> ``[rows, Hq, 1, d]``; each KV head is read once for its query
        heads (no ``repeat_kv`` copy).

        Short buffers (capacity below ``LONG_BUFFER``): one ``scaled_dot_product_attention`` call with
        the query heads sharing a KV head laid out as that head's query rows (float32 accumulation
        inside, like the plain path's SDPA). Long buffers (FullKV's cache): SDPA's memory-efficient
        kernel does not split a long key axis for a handful of queries (measured on an H100: 28 ms
        per step at 32K tokens against 12 ms), so they take two matmuls with the scores in the model
        dtype and the softmax in float32, the numerics of transformers' eager attention.
        """
        rows, hq, q, d = query.shape
        hc = self.keys.shape[1]
        grouped = query.reshape(rows, hc, (hq // hc) * q, d)
        if softcap is None and self.keys.shape[2] < LONG_BUFFER:
            out = F.scaled_dot_product_attention(grouped, self.keys, self.values, attn_mask=self.mask(), scale=scale)
        else:  # long buffers, and logit soft-capping (Gemma 2), as transformers' eager attention computes them
            scores = torch.matmul(grouped, self.keys.transpose(-1, -2)) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~self.mask(), float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.values.dtype)
            out = torch.matmul(probs, self.values)
        return out.reshape(rows, hq, q, d)

    @property
    def nbytes(self) -> int:
        """Bytes of the segment's key and value buffers together."""
        return 2 * self.keys.numel() * self.keys.element_size()


class SlotLayer(CacheLayerMixin):
    """One model layer of a ``SlotCache``: its segments' fixed buffers and per-row write slots."""

    def __init__(self, segments: list[Segment], window: int | None):
        super().__init__()
        self.segments = segments
        self.window = window
        self.is_sliding = window is not None
        self.is_initialized = True
        self.writes = self.attention_calls = 0    # proof that the model routes through this layer

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        """Nothing to do: the buffers exist from construction."""
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write one decode token per row, ``[B, Hkv, 1, d]``, into every segment's slots and count the
        write. Returns the first segment's buffers ``[rows, H, capacity, d]`` (``slot_attention`` reads
        the segments instead). Raises ``ValueError`` when a step brings more than one token per row."""
        if key_states.shape[2] != 1:
            raise ValueError(f"a SlotCache decodes one token per row per step; got {key_states.shape[2]} tokens")
        self.writes += 1
        for seg in self.segments:
            seg.write(key_states[seg.start:seg.stop], value_states[seg.start:seg.stop])
        # what the attention function receives; slot_attention reads the segments instead
        return self.segments[0].keys, self.segments[0].values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers: the first segment's capacity in slots, 0. The
        real masks come from the slots (``Segment.mask``)."""
        return self.segments[0].keys.shape[2], 0

    def get_seq_length(self) -> int:
        """0: lengths live in the per-row slots, and ``SlotCache.get_seq_length`` reports the tokens seen."""
        return 0

    def get_max_length(self) -> int:
        """The largest segment capacity of this layer, in slots."""
        return max(seg.keys.shape[2] for seg in self.segments)


class SlotCache(Cache):
    """A transformers ``Cache`` of ``SlotLayer``s; ``advance()`` moves every row one slot on.

    ``fills``: ``[num_layers, B]`` int64, each row's next slot per layer (the segments hold views of
    it); ``seen``: tokens the model had seen before decoding started (the prompt length).
    """

    def __init__(self, layers: list[SlotLayer], fills: torch.Tensor, seen: int):
        super().__init__(layers=layers)
        self.fills = fills          # [num_layers, B]
        self.seen = seen            # tokens the model has seen before decoding (for cache_position only)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """``seen`` for every layer, constant while decoding (used for ``cache_position`` only; the
        step passes explicit position ids)."""
        return self.seen

    def advance(self) -> None:
        """Every row of every layer on to its next slot (``fills += 1`` in place, so a captured graph
        replays it)."""
        self.fills.add_(1)

    @property
    def nbytes(self) -> int:
        """Bytes of every key and value buffer of every layer."""
        return sum(seg.nbytes for layer in self.layers for seg in layer.segments)

    def verify_routing(self) -> None:
        """After a decode step ran eagerly (every call's first step) or was captured into a CUDA graph
        (whose replays run the captured kernels): every layer's keys were written into its slots and its
        attention read them through ``slot_attention``; otherwise the model bypassed the slot cache (and
        would decode from nothing). Raises ``IntegrationError`` naming the layers."""
        bypassed = [i for i, layer in enumerate(self.layers) if not (layer.writes and layer.attention_calls)]
        if bypassed:
            raise IntegrationError(f"batched decoding: layers {bypassed} did not write to their slot buffers or did "
                                   f"not attend through {SLOT_ATTENTION!r}; the model bypassed the slot cache")


def slot_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   softcap: float | None = None, **kwargs):
    """Attention of one decode query per row over its valid slots, segment by segment (``key`` and
    ``value`` are ignored, and no mask is built for this implementation: the slots carry both).

    ``query``: ``[B, Hq, 1, d]``; ``scaling`` defaults to ``1 / sqrt(d)``; ``softcap``: logit
    soft-capping (Gemma 2). Returns ``(out [B, 1, Hq, d], None)``, the layout transformers' attention
    functions return. Raises ``KeyError`` for a module outside ``slot_routing``.
    """
    layer = _ACTIVE[id(module)]
    layer.attention_calls += 1       # Python side effect: counted when run eagerly or captured, not on replay
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    outs = [seg.attend(query[seg.start:seg.stop], scale, softcap) for seg in layer.segments]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


@contextlib.contextmanager
def slot_routing(model, cache: SlotCache):
    """For the block, the model's attention reads ``cache`` through ``slot_attention``; the original
    implementation is restored on exit (also when the block raises).

    Raises ``IntegrationError`` when the attention modules found are not exactly layers
    ``0..len(cache.layers) - 1``, and (from ``hook.set_attention``) when a module does not follow the
    switch.
    """
    modules = hook.all_attention_modules(model)
    if sorted(modules) != list(range(len(cache.layers))):
        raise IntegrationError(f"attention modules found for layers {sorted(modules)}; the slot cache has "
                               f"{len(cache.layers)} layers")
    original = text_config(model.config)._attn_implementation
    try:
        hook.set_attention(model, SLOT_ATTENTION)
        for idx, module in modules.items():
            _ACTIVE[id(module)] = cache.layers[idx]
        yield
    finally:
        for module in modules.values():
            _ACTIVE.pop(id(module), None)
        hook.set_attention(model, original)


# ---- building slot caches from per-variant caches ------------------------------------------------

def _round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


@dataclass
class RowLayer:
    """One layer of one prefilled cache, as the batched decoder copies it: ``keys``, ``values``
    ``[1, H, n, d]`` (H: KV heads, or query heads after a ``query_head`` compression); ``window``: the
    layer's sliding window in tokens, None for full attention."""

    keys: torch.Tensor    # [1, H, n, d]
    values: torch.Tensor
    window: int | None    # sliding window (the stored tokens are the most recent ones)


def row_layers(cache) -> list[RowLayer]:
    """The stored keys/values of every layer of a prefilled transformers cache (one prompt), as
    ``RowLayer``s ``[1, H, n, d]``. Raises ``ValueError`` when a layer holds nothing."""
    out = []
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            raise ValueError("decoding needs a prefilled cache; a layer is empty")
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        out.append(RowLayer(layer.keys, layer.values, window))
    return out


def spans_devices(cache) -> bool:
    """True when the layers of a prefilled cache live on more than one device (``device_map``): the
    fixed-shape buffers and graphs assume one device, so such models decode on the plain path."""
    return len({layer.keys.device for layer in cache.layers if getattr(layer, "keys", None) is not None}) > 1


def layout(rows: list[list[RowLayer]], segments: list[list[int]], steps: int, bucket: int) -> tuple:
    """The buffer shapes of one decode batch: per segment, its row count and per layer
    ``(heads, capacity, head_dim, window)`` (capacity: its longest row plus ``steps``, rounded up).

    ``rows``: per cache, its ``RowLayer``s; ``segments``: row indices per segment; ``steps``: tokens to
    decode; ``bucket``: the slot multiple capacities are rounded up to. ``heads`` is the most heads of
    the segment's rows. The result is a hashable tuple (the key of a ``DecoderPool`` entry)."""
    out = []
    for segment in segments:
        layers = []
        for layer_rows in zip(*(rows[i] for i in segment)):
            heads = max(r.keys.shape[1] for r in layer_rows)
            capacity = _round_up(max(r.keys.shape[2] for r in layer_rows) + steps, bucket)
            layers.append((heads, capacity, layer_rows[0].keys.shape[3], layer_rows[0].window))
        out.append((len(segment), tuple(layers)))
    return tuple(out)


def allocate(shape: tuple, dtype, device) -> SlotCache:
    """Zero-filled slot buffers for a ``layout`` ``shape``, in ``dtype`` on ``device``: one
    ``SlotLayer`` per model layer with one ``Segment`` ``[rows, heads, capacity, d]`` per segment,
    ``fills`` ``[num_layers, B]`` int64 zeros and ``seen`` 0 (``load`` fills them in)."""
    batch = sum(count for count, _ in shape)
    num_layers = len(shape[0][1])
    fills = torch.zeros(num_layers, batch, dtype=torch.long, device=device)
    layers = []
    for i in range(num_layers):
        segments, start = [], 0
        for count, specs in shape:
            heads, capacity, dim, window = specs[i]
            keys = torch.zeros(count, heads, capacity, dim, dtype=dtype, device=device)  # finite padding
            segments.append(Segment(keys, torch.zeros_like(keys), fills[i, start:start + count], window, start))
            start += count
        layers.append(SlotLayer(segments, specs[i][3]))
    return SlotCache(layers, fills, 0)


def load(cache: SlotCache, rows: list[list[RowLayer]], seen: int) -> None:
    """Copy every row's stored tokens (``rows`` in batch order) to the front of its slots; decode step
    0 writes right after them.

    KV heads are repeated to the segment's head count; each row's ``fill`` becomes its token count,
    the layers' routing counters restart at 0 and ``cache.seen`` becomes ``seen`` (tokens). Slots past
    a row's tokens are left as they are (masked).
    """
    for b, row in enumerate(rows):
        load_row(cache, b, row)
    for layer in cache.layers:
        layer.writes = layer.attention_calls = 0
    cache.seen = seen


def load_row(cache: SlotCache, b: int, row: list[RowLayer]) -> None:
    """Copy one row's stored tokens (its ``RowLayer``s, one per model layer) to the front of batch row ``b``'s
    slots in every layer, in place, and set that row's ``fill`` to its token count per layer (continuous
    batching refills one slot this way between replays of a captured step; ``load`` does every row).

    KV heads are repeated to the segment's head count. Slots past the row's tokens keep what they held
    (masked). Raises ``ValueError`` when ``b`` is outside the batch or the row's tokens do not fit."""
    for i, layer in enumerate(cache.layers):
        seg = next((s for s in layer.segments if s.start <= b < s.stop), None)
        if seg is None:
            raise ValueError(f"load_row: row {b} is outside the batch of {cache.fills.shape[1]} rows")
        src = row[i]
        heads, n = seg.keys.shape[1], src.keys.shape[2]
        if n > seg.keys.shape[2] or heads % src.keys.shape[1]:
            raise ValueError(f"load_row: layer {i} of the row ({src.keys.shape[1]} heads, {n} tokens) does not fit "
                             f"its segment ({heads} heads, {seg.keys.shape[2]} slots)")
        groups = heads // src.keys.shape[1]
        seg.keys[b - seg.start, :, :n].copy_(repeat_heads(src.keys, groups)[0])
        seg.values[b - seg.start, :, :n].copy_(repeat_heads(src.values, groups)[0])
        seg.fill[b - seg.start] = n


def group_rows(costs: list[tuple[int, ...]], max_batch: int, waste: float = 2.0) -> list[list[list[int]]]:
    """Rows (each given its per-layer cost, heads x tokens) into decode batches of at most
    ``max_batch`` rows, each batch a list of segments. Within a segment every row is padded to the
    segment's largest per layer, at most ``waste`` times the rows' own sizes; the segments of a batch
    decode in the same forward (the weights, the bulk of a step's memory traffic, are read once).

    Rows are taken in increasing total cost. Returns the batches, each a list of segments, each a list
    of row indices into ``costs``."""
    order = sorted(range(len(costs)), key=lambda i: sum(costs[i]))
    segments, current = [], []
    for i in order:
        trial = current + [i]
        padded = len(trial) * sum(max(costs[j][l] for j in trial) for l in range(len(costs[i])))
        own = sum(sum(costs[j]) for j in trial)
        if current and padded > waste * own:
            segments.append(current)
            trial = [i]
        current = trial
    if current:
        segments.append(current)
    batches, batch, size = [], [], 0
    for segment in segments:
        while segment:
            take = segment[:max_batch - size]
            segment = segment[len(take):]
            batch.append(take)
            size += len(take)
            if size == max_batch:
                batches.append(batch)
                batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches


# ---- the decode step, eager or as a CUDA graph ---------------------------------------------------

def _logits(model, ids, positions, kwargs):
    return model(input_ids=ids, position_ids=positions, **kwargs).logits


_compiled_logits = None


def compiled_logits():
    """``_logits`` through ``torch.compile`` (dynamic shapes: one compilation serves every capacity);
    the whole decoder forward traces as one graph, so the elementwise work between the matmuls
    (norms, rotary, activations, residuals) fuses into a few kernels."""
    global _compiled_logits
    if _compiled_logits is None:
        _compiled_logits = torch.compile(_logits, dynamic=True)
    return _compiled_logits


class Decoder:
    """Fixed buffers (cache, input ids, positions) and one greedy step over them; ``compiled``: the
    forward goes through ``torch.compile`` (then, on a GPU, the compiled step is captured as a graph).

    ``ids``, ``positions``: ``[B, 1]`` int64, the tokens fed to the next step and their position ids;
    ``bias``: ``[vocab]`` float32 added to the last logits (-inf at suppressed ids)."""

    def __init__(self, cache: SlotCache, batch: int, vocab: int, compiled: bool = False):
        device = cache.fills.device
        self.cache = cache
        self.compiled = compiled
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.bias = torch.zeros(vocab, dtype=torch.float32, device=device)   # -inf at suppressed ids
        self.suppressing: tuple[int, ...] = ()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.recorder: RankRecorder | None = None    # K/V transforms attached: their generated tokens' ranks
        self.transforms = None                       # (kept alive: the captured graph reads their tensors)

    def reset(self, first_tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Start a decode: ``first_tokens`` (B token ids) and their ``positions`` (B position ids) are
        copied in place into the ``[B, 1]`` int64 input buffers."""
        self.ids.copy_(first_tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        if self.recorder is not None:
            self.recorder.step.zero_()
            self.recorder.clear()

    def suppress(self, ids: list[int]) -> None:
        """The ids the next steps may not choose (in place: a captured graph reads the same buffer)."""
        if tuple(ids) != self.suppressing:
            self.bias.zero_()
            if ids:
                self.bias[torch.tensor(ids, device=self.bias.device)] = float("-inf")
            self.suppressing = tuple(ids)

    def _step(self, model) -> None:
        forward = compiled_logits() if self.compiled else _logits
        logits = forward(model, self.ids, self.positions, compat.forward_kwargs(model, self.cache))
        self.ids.copy_((logits[:, -1].float() + self.bias).argmax(dim=-1, keepdim=True))
        self.positions.add_(1)
        self.cache.advance()
        if self.recorder is not None:
            self.recorder.step.add_(1)

    def capture(self, model) -> bool:
        """Record one step into a CUDA graph (after two eager warm-up steps on a side stream, undone).

        Returns True when a graph was captured. Any failure is caught: ``graph_error`` records it
        (``"Type: message"``) and the steps run eagerly. The input buffers and fills are restored
        either way. CUDA only."""
        saved = (self.ids.clone(), self.positions.clone(), self.cache.fills.clone(),
                 None if self.recorder is None else self.recorder.step.clone())
        try:
            stream = torch.cuda.Stream(device=self.ids.device)
            stream.wait_stream(torch.cuda.current_stream(self.ids.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(model)
                    self._restore(saved)
            torch.cuda.current_stream(self.ids.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a private memory pool per graph
                self._step(model)
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.graph, self.graph_error = None, f"{type(error).__name__}: {error}"
            torch.cuda.synchronize(self.ids.device)
        self._restore(saved)
        return self.graph is not None

    def _restore(self, saved) -> None:
        self.ids.copy_(saved[0])
        self.positions.copy_(saved[1])
        self.cache.fills.copy_(saved[2])
        if saved[3] is not None:
            self.recorder.step.copy_(saved[3])

    def step(self, model, graph: bool) -> None:
        """One greedy step for every row: replay the captured graph when ``graph`` and one exists, else
        run eagerly. Leaves the chosen tokens in ``ids`` ``[B, 1]`` and advances positions and fills,
        all in place."""
        if graph and self.graph is not None:
            self.graph.replay()
        else:
            self._step(model)


class DecoderPool:
    """Decoders (buffers and captured graphs) kept for reuse by later prompts of the same shapes
    (least recently used first out, at most ``max_entries`` and ``max_bytes`` of cache buffers)."""

    def __init__(self, max_bytes: int = 4 * 2**30, max_entries: int = 8):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: OrderedDict[tuple, Decoder] = OrderedDict()
        self.reuses = 0

    def get(self, key: tuple, make) -> Decoder:
        """The decoder kept under ``key`` (a reuse, counted in ``reuses``), or ``make()``'s new one, kept
        when its cache buffers fit ``max_bytes``; least recently used entries are dropped beyond
        ``max_entries`` or ``max_bytes``."""
        if key in self.entries:
            self.entries.move_to_end(key)
            self.reuses += 1
            return self.entries[key]
        decoder = make()
        if decoder.cache.nbytes <= self.max_bytes:
            self.entries[key] = decoder
            while len(self.entries) > self.max_entries or self._bytes() > self.max_bytes:
                self.entries.popitem(last=False)
        return decoder

    def _bytes(self) -> int:
        return sum(d.cache.nbytes for d in self.entries.values())

    def clear(self) -> None:
        """Drop every kept decoder (its buffers and graph)."""
        self.entries.clear()


_POOLS: "weakref.WeakKeyDictionary[torch.nn.Module, DecoderPool]" = weakref.WeakKeyDictionary()


def pool_for(model) -> DecoderPool:
    """The ``DecoderPool`` of ``model``, created on first use (held weakly: it goes with the model)."""
    if model not in _POOLS:
        _POOLS[model] = DecoderPool()
    return _POOLS[model]


def clear_pools() -> None:
    """Drop every kept decoder (buffers and graphs), e.g. before measuring peak memory."""
    for pool in _POOLS.values():
        pool.clear()


@dataclass
class DecodeStats:
    """What ``decode_caches`` did, accumulated over calls that share it: rows and segments per decode
    batch, batches that replayed a CUDA graph, batches that reused an earlier prompt's decoder, and the
    last CUDA-graph capture failure (None when none)."""

    groups: list[int] = field(default_factory=list)     # rows per decode batch
    segments: list[int] = field(default_factory=list)   # buffer layouts (segments) per decode batch
    graphs: int = 0                                     # groups that replayed a CUDA graph
    reused: int = 0                                     # groups whose buffers (and graph) an earlier prompt made
    eager_reason: str | None = None


def vocab_size(model) -> int:
    """Width of the model's logits (its output projection's rows)."""
    head = model.get_output_embeddings()
    return getattr(head, "out_features", None) or head.weight.shape[0]


@torch.no_grad()
def decode_caches(model, first_token: torch.Tensor, caches: list, prompt_length: int, max_new_tokens: int,
                  stopping: Stopping, cuda_graphs: bool = True, max_batch: int = 16, bucket: int = 64,
                  stats: DecodeStats | None = None, compile: bool = False) -> list[tuple[list[int], str]]:
    """Greedy decoding of every cache in ``caches`` (each prefilled with the same prompt, whose first
    generated token is ``first_token``); returns ``(tokens, stopped_by)`` per cache, as
    ``harness.engine.generate.decode_loop`` would for each alone. ``compile``: the step's forward goes
    through ``torch.compile`` (the first call compiles, about a minute for an 8B model).

    ``first_token``: ``[1, 1]`` (the first token of every row), or one first token per cache (a sequence
    or tensor of ``len(caches)`` ids: rows whose prompts ended differently after a shared prefill,
    ``harness.engine.generate.extend``); ``prompt_length`` and ``max_new_tokens`` in
    tokens; ``max_batch``: most rows decoded together; ``bucket``: slot multiple of the buffer
    capacities; ``stats``: filled in when given. ``stopped_by`` is ``"stop_token"``, ``"stop_string"``
    or ``"max_new_tokens"``. Raises ``ValueError`` (``row_layers``) for a cache with an empty layer and
    ``IntegrationError`` when the model does not route through the slot cache (``slot_routing``,
    ``SlotCache.verify_routing``).

    While K/V transforms are attached (``harness.engine.transform.transformed``) their hooks are part of the
    step (and of its CUDA graph: the graph is kept for those transforms only) and each generated token's kept
    ranks go to the transforms' log, per row (``TransformLog.generated``, row ``i`` the ``i``-th cache);
    ``compile`` is ignored then (the hooks' bookkeeping is Python)."""
    stats = stats if stats is not None else DecodeStats()
    log = transform_log(model)
    if log is not None:
        compile = False
    firsts = [int(t) for t in torch.as_tensor(first_token).reshape(-1).tolist()]
    if len(firsts) == 1:
        firsts = firsts * len(caches)
    if len(firsts) != len(caches):
        raise ValueError(f"decode_caches: {len(firsts)} first tokens for {len(caches)} caches")
    results: list[tuple[list[int], str] | None] = [None] * len(caches)
    if max_new_tokens <= 1 or not caches:
        for i in range(len(caches)):
            results[i] = ([firsts[i]], stopping.reason([firsts[i]]) or "max_new_tokens")
        return results
    rows = [row_layers(c) for c in caches]
    costs = [tuple(r.keys.shape[1] * r.keys.shape[2] for r in row) for row in rows]
    device = rows[0][0].keys.device
    use_graphs = cuda_graphs and device.type == "cuda"
    steps = max_new_tokens - 1
    vocab = vocab_size(model)
    for segments in group_rows(costs, max_batch):
        group = [i for segment in segments for i in segment]       # batch order
        batch_rows = [rows[i] for i in group]
        shape = layout(rows, segments, steps, bucket)
        dtype = batch_rows[0][0].keys.dtype
        batch = len(group)
        pool = pool_for(model)
        reused_before = pool.reuses
        decoder = pool.get((shape, dtype, str(device), compile, None if log is None else log.identity),
                           lambda: _decoder(shape, dtype, device, batch, vocab, compile, log))
        stats.reused += pool.reuses - reused_before
        load(decoder.cache, batch_rows, prompt_length)
        current = [firsts[i] for i in group]
        decoder.reset(torch.tensor(current, dtype=torch.long, device=device),
                      torch.full((batch,), prompt_length, dtype=torch.long, device=device))
        decoder.suppress(stopping.suppressed(1))
        stats.groups.append(batch)
        stats.segments.append(len(segments))
        tokens = [[] for _ in group]
        done: list[str | None] = [None] * batch
        with slot_routing(model, decoder.cache), recording(log, decoder):
            if use_graphs and decoder.graph is None and decoder.graph_error is None:
                if decoder.capture(model):      # the captured step ran eagerly: its routing is the graph's
                    decoder.cache.verify_routing()
            replayed = use_graphs and decoder.graph is not None
            if replayed:
                stats.graphs += 1
            elif use_graphs:
                stats.eager_reason = decoder.graph_error
            for step in range(max_new_tokens):
                for b in range(batch):
                    if done[b] is None:
                        tokens[b].append(current[b])
                        done[b] = stopping.reason(tokens[b])
                if all(d is not None for d in done) or step + 1 == max_new_tokens:
                    break
                decoder.suppress(stopping.suppressed(step + 1))    # choosing new token number step + 1
                decoder.step(model, use_graphs)
                if step == 0 and not replayed:     # an eager step: it must have gone through the slot cache
                    decoder.cache.verify_routing()
                current = decoder.ids.view(-1).tolist()
        for b, i in enumerate(group):
            results[i] = (tokens[b], done[b] or "max_new_tokens")
            if log is not None:      # the tokens fed back: all but the last
                log.set_generated(i, decoder.recorder.rows(b, len(tokens[b]) - 1))
    return results


def _decoder(shape: tuple, dtype, device, batch: int, vocab: int, compile: bool, log) -> Decoder:
    """A new ``Decoder`` for ``shape``; with transforms attached (``log``), a ``RankRecorder`` for as many steps
    as its smallest buffer has slots (every row's capacity covers its steps), and the transforms kept."""
    decoder = Decoder(allocate(shape, dtype, device), batch, vocab, compiled=compile)
    if log is not None:
        steps = min(seg.keys.shape[2] for layer in decoder.cache.layers for seg in layer.segments)
        decoder.recorder = RankRecorder(steps, batch, device)
        decoder.transforms = log.transforms
    return decoder


@contextlib.contextmanager
def recording(log, decoder: Decoder):
    """The transforms' hooks (``log``: their ``TransformLog``) write into ``decoder``'s recorder for the block
    (nothing without ``log``)."""
    if log is None:
        yield
        return
    log.recorder = decoder.recorder
    try:
        yield
    finally:
        log.recorder = None
