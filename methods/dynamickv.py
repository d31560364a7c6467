"""DynamicKV (Zhou et al., 2024, arXiv 2412.14838; EMNLP 2025 Findings): task-adaptive per-layer budgets.

Follows the released v11 code (DreamMr/DynamicKV 8ab3c08, ``kv_compression/token_drop/methods/
dynamic_v11.py`` and the per-model forwards; reference-methods.md sections 2.6 and 9):

1. per layer ``l``: SnapKV's pooled window scores ``s_l``; keep the top
   ``budget_size = min(int(radio_max * base), n - w)`` prefix tokens in score order, plus the window
   (``base = budget - w``);
2. every ``m`` layers (``l % m == m - 1``, ``m = 4`` in the code), re-allocate over the ``k`` layers
   seen so far: count which layer each of the global top ``base * H * k`` pooled scores falls in,
   divide the counts by ``k``, turn them into shares of the *whole-model* budget ``base * L``, and cut
   every layer seen so far to its share (the first ``f_j`` entries, i.e. its top ``f_j`` tokens) plus
   the window again; tokens cut at one step never come back;
3. write all layers at the end of prefill.

``variant="reference"`` (the default, so published numbers can be reproduced) keeps the reference's
behaviour including its quirks:
* a layer given more than it stores is sliced into its stored window, which is then appended again
  (the window is duplicated and fewer distinct tokens are kept);
* budget a layer cannot use (its share capped at ``n - w``) is lost, not redistributed;
* layers after the last multiple of ``m`` are never re-allocated (they keep ``budget_size``);
* it has no short-prompt rule: with ``budget >= n`` the allocation is not FullKV (section 9, item 3);
* where the reference crashes (ZeroDivisionError / NaN when every share floors to 0, or ``n < w``,
  section 9, item 4) the whole prompt is kept and the session records a note.
The float32 shares and float64 rescaling are reproduced, since counts can depend on that rounding.

``variant="fixed"`` uses the same scores and shares but never duplicates a token (a layer keeps at
most what it stores), hands what a cap frees to the layers that can still take it, always
re-allocates at the last layer, and keeps prompts no longer than the budget whole (FullKV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.base import CompressionSession, ConfigError, Kept, KVCompressor, register
from methods.scoring import window_scores

VARIANTS = ("reference", "fixed")


class _OutsideReferenceDomain(Exception):
    """The reference code would crash on this prompt."""


@register
@dataclass
class DynamicKV(KVCompressor):
    """DynamicKV: SnapKV's pooled window scores with per-layer budgets re-allocated across layers
    during the prefill (arXiv 2412.14838; DreamMr/DynamicKV 8ab3c08 ``dynamic_v11.py``; the module
    docstring gives the steps and the variants).

    ``budget`` is the per-layer average (window included). Extra knobs: ``radio_max``, the cap of one
    layer's provisional selection in units of ``base``; ``m``, the re-allocation interval in layers;
    ``variant``, ``reference`` or ``fixed``. A session takes one prompt (a batch of 1):
    ``compress_all`` runs a batch row by row.
    """

    name = "dynamickv"
    rows_independent = False     # one allocation per prompt: a session takes a batch of one
    choices = {**KVCompressor.choices, "variant": VARIANTS}
    radio_max: float = 10.0   # the code's spelling of ratio_max: cap of one layer, in units of base
    m: int = 4                # re-allocation interval in layers
    variant: str = "reference"

    def validate(self) -> None:
        """``KVCompressor.validate``, then ``ConfigError`` when ``variant`` is not in ``VARIANTS``,
        ``m`` is not a positive integer (a bool is rejected) or ``radio_max`` is not a positive number."""
        super().validate()
        if self.variant not in VARIANTS:
            raise ConfigError(f"dynamickv: variant={self.variant!r} is not one of {VARIANTS}")
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m <= 0:
            raise ConfigError(f"dynamickv: m={self.m!r} must be a positive integer (the code uses 4)")
        if isinstance(self.radio_max, bool) or not isinstance(self.radio_max, (int, float)) or self.radio_max <= 0:
            raise ConfigError(f"dynamickv: radio_max={self.radio_max!r} must be a positive number (5 or 10 in the scripts)")

    @property
    def base(self) -> int:
        """``budget - window_size``: the average per-layer count of selected prefix tokens (window
        excluded), in tokens; ``base * L`` is the whole-model budget the shares divide."""
        return self.budget - self.window_size

    def new_session(self, num_layers: int) -> "DynamicKVSession":
        """A fresh ``DynamicKVSession`` for one prompt over ``num_layers`` compressed layers. Raises
        ``ValueError`` when ``num_layers <= 0``."""
        return DynamicKVSession(self, num_layers)


class DynamicKVSession(CompressionSession):
    """Per-prompt state of DynamicKV: every layer's selection (``Kept``, score order then the window),
    cut down at each re-allocation, and its pooled scores ``[1, H, n - w]``.

    Takes a batch of one, layers in order ``0..L-1``. With ``variant="reference"`` on a prompt where
    the reference may crash (``risky``) it returns nothing until the last layer, so a fall-back to the
    whole prompt never finds a layer already written; the fall-back is recorded in ``notes``.
    """

    compressor: DynamicKV

    def __init__(self, compressor: DynamicKV, num_layers: int):
        super().__init__(compressor, num_layers)
        self.kept: list[Kept] = []          # per layer: current selection (score order) + window
        self.scores: list[torch.Tensor] = []
        self.budget_size = 0
        self.whole = False                  # the prompt is kept whole (short prompt or outside domain)
        self.risky = False                  # reference variant on a prompt where the reference may crash

    # ----------------------------------------------------------------- per layer
    def add_layer(self, layer, keys, values, queries):
        """Score layer ``layer`` and keep its top ``budget_size = min(int(radio_max * base), n - w)``
        prefix tokens plus the window; every ``m`` layers (and, for ``fixed``, at the last layer)
        re-allocate the layers seen so far.

        ``keys``, ``values``: ``[1, Hkv, n, d]`` post-RoPE; ``queries``: ``[1, Hq, >=w, d]``. Returns the
        layers to (re)write now: ``{layer: Kept}``, every layer seen so far after a re-allocation, all
        layers at the last one, ``{}`` while ``risky``; when the prompt is kept whole, zero-length
        markers with ``Kept.whole`` set (nothing to write). Raises ``ValueError`` when the batch is not 1
        or a layer arrives out of order.
        """
        c = self.compressor
        n = keys.shape[2]
        if keys.shape[0] != 1:
            raise ValueError(f"dynamickv allocates its budget over the heads and layers of one prompt; a session takes "
                             f"a batch of 1, got {keys.shape[0]} (compress_all compresses a batch row by row)")
        self.prompt_length = n
        if layer == 0:
            self.whole = self._keeps_whole(n)
            heads = {"query_head": queries.shape[1], "kv_head": keys.shape[1]}.get(c.granularity, 1)
            self.risky = c.variant == "reference" and self._may_crash(n, heads)
        if self.whole:
            return {layer: self._whole_marker(layer, keys, values, queries)}
        if layer != len(self.kept):
            raise ValueError(f"dynamickv: layers must arrive in order; expected {len(self.kept)}, got {layer}")
        w = c.window_size
        self.budget_size = min(int(c.radio_max * c.base), n - w)
        scores = window_scores(queries, keys, w, c.kernel_size, c.pooling, c.granularity)
        selected = scores.topk(self.budget_size, dim=-1).indices
        kept = c.keep_selected(keys, values, queries, selected)
        self.kept.append(kept)
        self.scores.append(scores)
        updates = {layer: kept}
        last = layer == self.num_layers - 1
        if layer % c.m == c.m - 1 or (last and c.variant == "fixed"):
            try:
                updates = self._reallocate(final=last)
            except _OutsideReferenceDomain as why:
                # only possible in `risky` mode, where nothing has been written yet: keep the prompt whole
                self.notes.append(f"outside the reference's domain ({why}; the reference crashes here): "
                                  "kept the whole prompt")
                self.whole = True
                return {j: self._whole_marker(j, keys, values, queries) for j in range(layer + 1)}
        if last:
            if c.variant == "reference" and self.num_layers % c.m:
                first = self.num_layers - self.num_layers % c.m
                self.notes.append(f"reference: {self.num_layers} layers is not a multiple of m={c.m}, so layers "
                                  f"{first}..{self.num_layers - 1} were never re-allocated and keep "
                                  f"budget_size={self.budget_size} tokens each (variant=fixed re-allocates them)")
            for j, item in enumerate(self.kept):
                self.record(j, item)
            return dict(enumerate(self.kept))
        return {} if self.risky else updates

    def _keeps_whole(self, n: int) -> bool:
        c = self.compressor
        if c.variant == "fixed" and n <= c.budget:
            return True
        if n <= c.window_size:  # the reference returns None here and crashes
            self.notes.append(f"prompt length {n} <= window {c.window_size}: outside the reference's domain "
                              "(it crashes); kept the whole prompt")
            return True
        return False

    def _may_crash(self, n: int, heads: int) -> bool:
        """Whether a re-allocation can divide by zero or produce NaN shares (reference-methods.md
        section 9, item 4). It cannot when ``budget_size > L`` (some layer's share stays >= 1 token)
        and ``H * min(base, n - w) >= L`` (some layer holds >= k of the top scores at every step).
        Only then may the session hold back its provisional selections and fall back to FullKV."""
        c = self.compressor
        budget_size = min(int(c.radio_max * c.base), n - c.window_size)
        return budget_size <= self.num_layers or heads * min(c.base, n - c.window_size) < self.num_layers

    def _whole_marker(self, layer, keys, values, queries) -> Kept:
        kept = self.compressor.whole_prompt(keys[:, :, :0], values[:, :, :0], queries.shape[1])
        self.record(layer, kept)
        return kept

    # ----------------------------------------------------------------- re-allocation
    def _layer_counts(self, final: bool) -> torch.Tensor:
        """Per-layer counts of the global top ``base * H * k`` pooled scores, floor-divided by k,
        with the reference's final-layer top-up: int64 ``[k]`` on the scores' device."""
        c = self.compressor
        device = self.scores[0].device                          # layers may sit on different GPUs
        stacked = torch.stack([scores.to(device) for scores in self.scores])   # [k, B, H, n - w]
        k = stacked.shape[0]
        heads = stacked.shape[2]
        flat = stacked.reshape(-1)
        per_layer = flat.numel() // k                           # B * H * (n - w)
        take = min(c.base * heads * k, flat.numel())
        top = flat.topk(take).indices
        # left on the scores' device: the reference divides these counts on its GPU, where a tensor divided by a
        # number is a product with its reciprocal (not the CPU's true division), so moving the share arithmetic
        # to the host changes a share in rare cases
        counts = torch.bincount(top // per_layer, minlength=k) // k
        if final and int(counts.sum()) != per_layer:
            counts[-1] += (c.base * heads * k) // self.num_layers - counts.sum()
        return counts

    def _shares(self, counts: torch.Tensor) -> list[int]:
        """Whole-model budget split by share, with the reference's float32/float64 arithmetic."""
        c = self.compressor
        total = int(counts.sum())
        if total == 0:
            raise _OutsideReferenceDomain("every per-layer count floors to 0 (NaN shares)")
        # the reference's per-layer ``t / total`` (a float32 tensor over a Python int) and ``int(budget_size * s)``,
        # element by element as one tensor: the same kernels (a division and a product by a scalar, on the scores'
        # device) and one host copy instead of one per layer; ``.to(int64)`` truncates toward zero as int() does
        shares = counts / total
        fix = (self.budget_size * shares).to(torch.int64).tolist()
        need = c.base * self.num_layers
        ratio = sum(fix) / need
        if ratio == 0:
            raise _OutsideReferenceDomain("every int(budget_size * share) is 0 (division by zero)")
        fix = [int(f // ratio) for f in fix]
        fix[-1] += need - sum(fix)
        return fix

    def _reallocate(self, final: bool) -> dict[int, Kept]:
        c = self.compressor
        targets = self._shares(self._layer_counts(final))
        prefix = self.scores[0].shape[-1]                       # n - w
        if c.variant == "reference":
            lengths = [min(t, prefix) for t in targets]
            self.kept = [_reference_slice(kept, f, c.window_size) for kept, f in zip(self.kept, lengths)]
        else:
            stored = [kept.count - c.window_size for kept in self.kept]
            lengths = _water_fill(targets, stored, c.base * self.num_layers)
            self.kept = [_truncate(kept, f, c.window_size) for kept, f in zip(self.kept, lengths)]
        return dict(enumerate(self.kept))


def _reference_slice(kept: Kept, length: int, window: int) -> Kept:
    """``cat(x[:, :, :length], x[:, :, -window:])`` exactly as the reference slices (Python slice
    semantics included: a length beyond the selection runs into the stored window). A cut that keeps
    everything in place (``length + window`` is the stored count) returns ``kept`` itself, uncopied."""
    if window > 0 and length >= 0 and length + window == kept.count:   # (x[:, :, -0:] would be all of x)
        return kept
    def cut(x):
        return torch.cat([x[:, :, :length], x[:, :, -window:]], dim=2)
    return Kept(cut(kept.keys), cut(kept.values), cut(kept.positions))


def _truncate(kept: Kept, length: int, window: int) -> Kept:
    """Keep the first ``length`` selected entries (top by score) and the window, nothing twice."""
    selected = kept.count - window
    length = max(0, min(length, selected))
    if length == selected:      # nothing cut: the same tensors, uncopied
        return kept
    def cut(x):
        return torch.cat([x[:, :, :length], x[:, :, selected:]], dim=2)
    return Kept(cut(kept.keys), cut(kept.values), cut(kept.positions))


def _water_fill(targets: list[int], caps: list[int], total: int) -> list[int]:
    """Integer allocation close to ``targets`` with ``alloc[j] <= caps[j]`` and, where the caps
    allow, ``sum(alloc) == total``: what a capped layer cannot use goes to the others in proportion
    to their targets (one token at a time, largest target first, for the integer remainder)."""
    alloc = [max(0, min(t, cap)) for t, cap in zip(targets, caps)]
    remaining = total - sum(alloc)
    while remaining > 0:
        room = [j for j in range(len(alloc)) if alloc[j] < caps[j]]
        if not room:
            break
        weight = sum(max(targets[j], 0) for j in room)
        given = 0
        for j in room:
            share = math.floor(remaining * max(targets[j], 0) / weight) if weight else 0
            extra = min(share, caps[j] - alloc[j])
            alloc[j] += extra
            given += extra
        if given == 0:
            for j in sorted(room, key=lambda j: -targets[j]):
                if remaining - given == 0:
                    break
                alloc[j] += 1
                given += 1
        remaining -= given
    return alloc
