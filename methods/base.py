"""The KVCompressor contract and the method registry.

A compressor decides, once per attention layer at the end of that layer's prefill, which prompt
tokens each head keeps in the KV cache (the scheme shared by SnapKV, PyramidKV, H2O and DynamicKV as
their reference code implements it: KVCache-Factory ``pyramidkv/pyramidkv_utils.py`` at ffac160 and
DynamicKV ``kv_compression/token_drop/methods/dynamic_v11.py`` at 8ab3c08).

Two ways to drive one, sharing all of the logic:

* streaming, layer by layer, as the model hook does: ``session = compressor.new_session(L)`` per
  prompt, then ``session.add_layer(l, keys, values, queries)`` per compressed layer and
  ``session.finish()``; each call returns the layers whose cache should now be (re)written, so a
  cross-layer method may revise layers it has already seen;
* model-free, on plain tensors: ``compressor.compress_all(keys, values, queries)``.

A compressor object holds configuration only. Everything that belongs to one prompt lives in the
session, which is created per prefill and dropped afterwards: the reference code kept per-layer
state on modules and in globals, which silently turned every sample after the first into FullKV
(KVCache-Factory issues #15, #54). Here there is nothing to go stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

POOLINGS = ("maxpool", "avgpool")
GRANULARITIES = ("query_head", "kv_head", "layer")
#: the K/V transforms a method can carry (``methods.lowrank``; ``transform`` knob), each with the knob it needs
TRANSFORM_KNOBS = {"pca_uniform": "transform_rate", "svd_weights": "transform_rate", "energy": "transform_eta",
                   "dynakv": "transform_tau"}
TRANSFORM_FIELDS = ("transform", "transform_rate", "transform_eta", "transform_tau", "transform_checkpoint")


@dataclass
class Kept:
    """What one layer keeps of the prompt.

    ``keys``/``values`` are ``[B, H, k, d]``; ``positions`` ``[B, H, k]`` holds the original token
    index of every kept entry, in the same order (selection order, then the window, as the reference
    stores them). ``H`` is the number of query heads for ``granularity=query_head`` and of KV heads
    for ``kv_head``. ``whole`` marks a layer that keeps the whole prompt untouched (its cache need not
    be rewritten).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    whole: bool = False

    @property
    def count(self) -> int:
        """Entries kept per head, ``k`` (``keys.shape[-2]``), the window included; a token stored twice
        (DynamicKV's reference variant) counts twice."""
        return self.keys.shape[-2]


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, n, d] -> [B, Hkv*groups, n, d]``, each KV head repeated for its query heads.

    Same layout as ``repeat_kv`` of the reference code and of transformers (query head ``h`` reads KV
    head ``h // groups``). Any dtype; with ``groups == 1`` returns ``x`` itself (no copy), otherwise a
    new tensor.
    """
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick tokens along the token axis: ``x [B, H, n, d]``, ``index [B, H, k]`` -> ``[B, H, k, d]``.

    ``out[b, h, i] = x[b, h, index[b, h, i]]``, in ``x``'s dtype. ``index`` holds int64 token indices
    in ``[0, n)`` (``torch.gather`` rejects anything else).
    """
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def gather_grouped(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather_tokens(repeat_heads(x, H // Hkv), index)`` without the repeated copy of ``x``.

    ``x``: ``[B, Hkv, n, d]``; ``index``: int64 ``[B, H, k]`` with ``H`` a multiple of ``Hkv`` (head ``h``
    reads KV head ``h // (H // Hkv)``, the ``repeat_kv`` layout). Returns ``[B, H, k, d]`` in ``x``'s dtype:
    the same values (a gather copies, it computes nothing), read from a stride-0 view of ``x``.
    """
    b, hkv, n, d = x.shape
    h, k = index.shape[1], index.shape[2]
    if h == hkv:
        return gather_tokens(x, index)
    groups = h // hkv
    view = x[:, :, None].expand(b, hkv, groups, n, d)                       # no copy
    picked = view.gather(3, index.view(b, hkv, groups, k, 1).expand(b, hkv, groups, k, d))
    return picked.view(b, h, k, d)


class ConfigError(ValueError):
    """A compressor setting that cannot work; the message names the value, the rule and the fix."""


@dataclass
class KVCompressor:
    """Base of every method. Subclasses are dataclasses whose fields are their config knobs.

    budget:      prompt tokens kept per head per layer, the observation/recent window included
                 (``max_capacity_prompt`` of the reference code); a prompt no longer than the budget
                 is kept whole. For PyramidKV and DynamicKV it is the per-layer average.
    window_size: the last ``window_size`` prompt tokens: always kept, and their queries score the rest.
    kernel_size: 1-D pooling kernel over the window scores (odd, stride 1, padding kernel//2).
    pooling:     ``maxpool`` or ``avgpool`` (avg counts the zero padding, as ``avg_pool1d`` does).
    granularity: ``query_head`` (reference: keys repeated to query heads, one token set per query
                 head, the cache holds Hq heads) or ``kv_head`` (window scores averaged over each
                 query group, one token set per KV head, a true GQA cache; KVCache-Factory HEAD's
                 ``--kv_cache_granularity kv_head --gqa_score_agg mean``), or ``layer`` (window
                 scores averaged over all query heads, one token set per layer kept in every KV head:
                 DynaKV's "global token eviction", reference-dynakv.md section 5; the mean and the sum
                 over heads select the same tokens).
    transform:   a per-token K/V transform applied where keys and values are produced (``methods.lowrank``;
                 DynaKV and its baselines), stacked with the eviction: ``pca_uniform`` / ``svd_weights``
                 (``transform_rate``: the fraction of the joint K/V dimensions kept), ``energy``
                 (``transform_eta``), ``dynakv`` (``transform_tau``, the mask threshold); bases and gates
                 come from ``transform_checkpoint`` (``auto``: the checkpoint shipped for the model). None:
                 no transform (every method's default).

    Construction runs ``validate``: a knob that cannot work raises ``ConfigError``.
    """

    name: ClassVar[str] = ""
    #: How many trailing prompt queries the method reads: "window" or "all" (H2O).
    queries_needed: ClassVar[str] = "window"
    #: FullKV: the hook leaves the model alone.
    is_noop: ClassVar[bool] = False
    #: False for methods whose session allocates across heads and layers of a whole prompt (DynamicKV):
    #: a session then takes one prompt at a time, and ``compress_all`` runs a batch row by row.
    rows_independent: ClassVar[bool] = True
    #: The allowed values of each text knob with a closed set of choices (configs type them as enums).
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"pooling": POOLINGS, "granularity": GRANULARITIES}
    #: Knobs added after records existed, with their default: ``knobs()`` leaves each out while it is at that
    #: default, so earlier folder names and run identities stay the same (H2O: ``{"scorer": "reference"}``).
    left_out_at_default: ClassVar[dict] = {}

    budget: int = 128
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "maxpool"
    granularity: str = "query_head"
    compression_ratio: float | None = None
    transform: str | None = None
    transform_rate: float | None = None
    transform_eta: float | None = None
    transform_tau: float | None = None
    transform_checkpoint: str | None = None

    def __post_init__(self) -> None:
        self.validate()
        self.validate_transform()

    def validate_transform(self) -> None:
        """Check the K/V transform knobs: ``transform`` one of ``TRANSFORM_KNOBS`` (or None, with the other
        ``transform_*`` knobs None too), the knob it needs set and in range (rate, eta in (0, 1]; tau in
        [0, 1)), the others None, and a checkpoint for every transform but ``svd_weights`` (which needs
        none). Raises ``ConfigError`` naming the knob and the fix."""
        label = self.method_name
        name = self.transform
        if name is None:
            stray = [f for f in TRANSFORM_FIELDS[1:] if getattr(self, f) is not None]
            if stray:
                raise ConfigError(f"{label}: {stray} set without a transform; fix: method.transform=<one of "
                                  f"{sorted(TRANSFORM_KNOBS)}> or leave them null")
            return
        if name not in TRANSFORM_KNOBS:
            raise ConfigError(f"{label}: transform={name!r} is not one of {sorted(TRANSFORM_KNOBS)} (or null)")
        needed = TRANSFORM_KNOBS[name]
        value = getattr(self, needed)
        low_open = needed != "transform_tau"
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and (0 < value <= 1 if low_open else 0 <= value < 1))
        if not ok:
            meaning = {"transform_rate": "the fraction of the joint K/V dimensions kept, in (0, 1]",
                       "transform_eta": "the share of each token's energy kept, in (0, 1]",
                       "transform_tau": "the gate's mask threshold, in [0, 1); the paper's example is 0.1"}[needed]
            example = {"transform_rate": 0.5, "transform_eta": 0.9, "transform_tau": 0.1}[needed]
            raise ConfigError(f"{label}: transform={name} needs {needed}={value!r} to be {meaning}; fix: "
                              f"method.{needed}={example}")
        stray = [f for f in ("transform_rate", "transform_eta", "transform_tau") if f != needed
                 and getattr(self, f) is not None]
        if stray:
            raise ConfigError(f"{label}: transform={name} reads {needed} only, but {stray} are set; fix: leave them null")
        if name == "svd_weights" and self.transform_checkpoint is not None:
            raise ConfigError(f"{label}: transform=svd_weights factorises the model's own K/V projections and reads "
                              f"no checkpoint, but transform_checkpoint={self.transform_checkpoint!r}; fix: "
                              "method.transform_checkpoint=null")
        if name != "svd_weights" and not self.transform_checkpoint:
            raise ConfigError(f"{label}: transform={name} needs the PCA bases{' and gates' if name == 'dynakv' else ''} "
                              "of a checkpoint; fix: method.transform_checkpoint=auto (the one shipped for the model) "
                              "or a file from `kvh dynakv calibrate`/`kvh dynakv train`")
        if name != "svd_weights" and self.transform_checkpoint != "auto" \
                and not str(self.transform_checkpoint).endswith(".safetensors"):
            raise ConfigError(f"{label}: transform_checkpoint={self.transform_checkpoint!r} must be a .safetensors file "
                              "(from `kvh dynakv calibrate`/`kvh dynakv train`) or auto")

    # ------------------------------------------------------------------ configuration
    def validate(self) -> None:
        """Check the knobs (run by ``__post_init__``); subclasses extend it for their own.

        Raises ``ConfigError`` when ``budget``, ``window_size`` or ``kernel_size`` is not an ``int``
        (a bool is rejected), ``window_size <= 0``, ``budget <= window_size``, ``kernel_size`` is not a
        positive odd number, or ``pooling``/``granularity`` is outside ``POOLINGS``/``GRANULARITIES``.
        """
        def bad(msg: str) -> None:
            raise ConfigError(f"{self.name or type(self).__name__}: {msg}")

        for knob in ("budget", "window_size", "kernel_size"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(f"{knob}={value!r} must be an integer")
        if self.window_size <= 0:
            bad(f"window_size={self.window_size} must be > 0 (the last window_size prompt tokens "
                "score the rest and are always kept); set method.window_size to e.g. 8 or 32")
        ratio = self.compression_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 <= ratio < 1):
            bad(f"compression_ratio={ratio!r} must be a number in [0, 1) (the fraction of prompt tokens evicted, "
                "kvpress's convention), or null to use the token budget; fix: e.g. method.compression_ratio=0.5")
        if ratio is None and self.budget <= self.window_size:
            bad(f"budget={self.budget} must be larger than window_size={self.window_size}: the budget "
                "includes the window, so nothing would be left to select; raise method.budget or "
                "lower method.window_size")
        if self.kernel_size <= 0 or self.kernel_size % 2 == 0:
            bad(f"kernel_size={self.kernel_size} must be a positive odd number (pooling keeps the "
                "score length only for odd kernels); use e.g. 5 or 7")
        if self.pooling not in POOLINGS:
            bad(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.granularity not in GRANULARITIES:
            bad(f"granularity={self.granularity!r} is not one of {GRANULARITIES}")

    @property
    def method_name(self) -> str:
        """What the method is called in summaries and messages: the registry name, the transform's alone
        (``dynakv`` on FullKV), or ``<eviction>+<transform>`` (``snapkv+dynakv``)."""
        if self.transform is None:
            return self.name or type(self).__name__
        return self.transform if self.is_noop else f"{self.name}+{self.transform}"

    def budget_for(self, prompt_length: int) -> int:
        """The token budget for a compressed prompt of ``prompt_length`` tokens: ``budget``, or with a
        ``compression_ratio`` ``int(prompt_length * (1 - compression_ratio))`` (kvpress's ``n_kept``,
        ``kvpress/presses/scorer_press.py`` at 8bb29b9, which truncates toward zero)."""
        if self.compression_ratio is None:
            return self.budget
        return int(prompt_length * (1 - self.compression_ratio))

    def resolved(self, prompt_length: int) -> "KVCompressor":
        """The compressor for one prompt of ``prompt_length`` tokens (the part that is compressed): itself
        for a token budget; with a ``compression_ratio`` a copy whose ``budget`` is ``budget_for(prompt_length)``
        and whose ratio is None, so it compresses exactly as that token budget does. Raises ``ConfigError``
        when the method's checks refuse the resolved budget (not larger than ``window_size``: the ratio leaves
        too few tokens)."""
        if self.compression_ratio is None or self.is_noop:
            return self
        budget = self.budget_for(prompt_length)
        try:
            return dataclasses.replace(self, budget=budget, compression_ratio=None)
        except ConfigError as error:
            raise ConfigError(f"{self.name}: compression_ratio={self.compression_ratio} leaves a budget of {budget} of "
                              f"{prompt_length} prompt tokens, which cannot work ({str(error).split(';')[0]}); fix: a lower "
                              "compression_ratio, a smaller window, or longer prompts") from None

    def knobs(self) -> dict:
        """The config knobs by name (what ``build`` accepts and results record); the ``transform*`` knobs only
        where a transform is set, and ``left_out_at_default`` knobs only away from their default (records made
        before they existed stay the same)."""
        skip = TRANSFORM_FIELDS if self.transform is None else ()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and self.left_out_at_default.get(f.name, object()) != getattr(self, f.name)}

    def check_model_dtype(self, dtype: str) -> None:
        """Before the model loads: ``ConfigError`` when this method cannot run a model in ``dtype`` (the resolved
        ``model.dtype``, e.g. ``"float16"``). Every method can, unless it says otherwise."""

    def query_count(self, prompt_length: int) -> int:
        """How many trailing prompt queries (tokens) the hook must capture per layer for a prompt of
        ``prompt_length`` tokens: ``min(window_size, prompt_length)``, or all ``prompt_length`` when
        ``queries_needed == "all"``."""
        return prompt_length if self.queries_needed == "all" else min(self.window_size, prompt_length)

    # ------------------------------------------------------------------ driving
    def new_session(self, num_layers: int) -> "CompressionSession":
        """A fresh per-prompt ``CompressionSession`` over ``num_layers`` compressed layers. Raises
        ``ValueError`` when ``num_layers <= 0``."""
        return CompressionSession(self, num_layers)

    def compress_all(self, keys, values, queries) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Model-free entry point: compress every layer of one prompt.

        keys, values: one tensor per compressed layer, ``[B, Hkv, n, d]``, post-RoPE.
        queries:      one tensor per compressed layer, ``[B, Hq, n, d]``, post-RoPE, all prompt queries.
        Returns one ``(keys, values, positions)`` per layer: ``[B, H, k_l, d]`` twice and ``[B, H, k_l]``.

        Rows of a batch are independent prompts: row ``b`` of the result equals row ``b`` compressed
        alone. Where a cross-layer method (DynamicKV) gives the rows of one layer different lengths,
        that layer is right-padded to its longest row: padded entries have position ``-1`` and zero
        keys and values (``positions >= 0`` selects a row's real entries). ``H`` is Hq for
        ``query_head`` and Hkv for ``kv_head``; keys and values keep the input dtype, positions are
        int64 token indices. Each layer's queries are cut to the last ``query_count(n)`` before use.

        Raises ``ValueError`` when the three lists differ in length or are empty (a session needs one
        layer), and passes on the errors of the session's ``add_layer`` (e.g. ``ValueError`` when Hq is
        not a multiple of Hkv).
        """
        if not (len(keys) == len(values) == len(queries)):
            raise ValueError(f"keys, values and queries need one tensor per layer; got "
                             f"{len(keys)}, {len(values)}, {len(queries)}")
        batch = keys[0].shape[0] if keys else 0
        if batch > 1 and not self.rows_independent:
            rows = [self.compress_all([k[b:b + 1] for k in keys], [v[b:b + 1] for v in values],
                                      [q[b:b + 1] for q in queries]) for b in range(batch)]
            return [_pad_rows([row[layer] for row in rows]) for layer in range(len(keys))]
        session = self.new_session(len(keys))
        kept: dict[int, Kept] = {}
        for layer, (k, v, q) in enumerate(zip(keys, values, queries)):
            q = q[:, :, -self.query_count(q.shape[2]):]
            kept.update(session.add_layer(layer, k, v, q))
        kept.update(session.finish())
        out = []
        for layer in range(len(keys)):
            item = kept[layer]
            if item.whole:
                item = self.whole_prompt(keys[layer], values[layer], queries[layer].shape[1])
            out.append((item.keys, item.values, item.positions))
        return out

    # ------------------------------------------------------------------ helpers for methods
    def groups(self, keys: torch.Tensor, queries: torch.Tensor) -> int:
        """Query heads per KV head, ``Hq // Hkv``, from ``keys [B, Hkv, n, d]`` and ``queries [B, Hq, m, d]``.
        Raises ``ValueError`` when Hq is not a multiple of Hkv."""
        hkv, hq = keys.shape[1], queries.shape[1]
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
        return hq // hkv

    def whole_prompt(self, keys: torch.Tensor, values: torch.Tensor, num_query_heads: int) -> Kept:
        """The whole prompt at this compressor's granularity, as a ``Kept`` with ``whole=True``.

        ``keys``, ``values`` ``[B, Hkv, n, d]`` -> ``[B, H, n, d]`` (repeated to ``num_query_heads`` for
        ``query_head``, unchanged for ``kv_head``); positions ``0..n-1`` as an int64 ``[B, H, n]``
        expanded (non-contiguous) view.
        """
        groups = num_query_heads // keys.shape[1] if self.granularity == "query_head" else 1
        b, _, n, _ = keys.shape
        k, v = repeat_heads(keys, groups), repeat_heads(values, groups)
        positions = torch.arange(n, device=keys.device).expand(b, k.shape[1], n)
        return Kept(k, v, positions, whole=True)

    def keep_selected(self, keys, values, queries, selected: torch.Tensor | None) -> Kept:
        """Gather the ``selected`` prefix tokens ``[B, H, K]`` (any order) and append the window.

        ``selected`` indexes the prefix ``[0, n - w)``; heads are query heads for ``query_head``
        granularity and KV heads for ``kv_head``. The layout is the reference's:
        ``cat(prefix.gather(selected), last window)``.

        ``keys``, ``values``: ``[B, Hkv, n, d]``; ``queries``: ``[B, Hq, m, d]`` (only its head count is
        read). Returns a ``Kept`` of ``[B, H, K + w, d]`` with int64 positions ``[B, H, K + w]``; with
        ``selected`` None or empty, only the window (``[B, H, w, d]``). Raises ``ValueError`` (from
        ``groups``) when Hq is not a multiple of Hkv at ``query_head`` granularity.
        """
        w = self.window_size
        b, hkv, n, _ = keys.shape
        groups = self.groups(keys, queries) if self.granularity == "query_head" else 1
        h = hkv * groups
        if selected is not None and self.granularity == "layer" and selected.shape[1] == 1:
            selected = selected.expand(b, h, selected.shape[-1])   # one token set for the layer, in every head
        window_positions = torch.arange(n - w, n, device=keys.device).expand(b, h, w)
        window_k, window_v = repeat_heads(keys[:, :, -w:], groups), repeat_heads(values[:, :, -w:], groups)
        if selected is None or selected.shape[-1] == 0:
            return Kept(window_k, window_v, window_positions.contiguous())
        # the selected tokens straight from the KV heads (no repeated copy of the whole prompt first)
        kept_k = torch.cat([gather_grouped(keys[:, :, : n - w], selected), window_k], dim=2)
        kept_v = torch.cat([gather_grouped(values[:, :, : n - w], selected), window_v], dim=2)
        return Kept(kept_k, kept_v, torch.cat([selected, window_positions], dim=2))


@dataclass
class UniformCompressor(KVCompressor):
    """A method that compresses each layer on its own: subclasses give ``layer_budget`` and
    ``select`` (which prefix tokens to keep), and this class handles the short-prompt rule and the
    window."""

    def layer_budget(self, layer: int, num_layers: int, prompt_length: int) -> int:
        """Prompt tokens layer ``layer`` (of ``num_layers``) keeps for a prompt of ``prompt_length``
        tokens, window included; here ``budget`` for every layer."""
        return self.budget

    def select(self, layer, num_layers, keys, values, queries, count: int) -> torch.Tensor:
        """Which ``count`` prefix tokens to keep: int64 indices ``[B, H, count]`` into ``[0, n - w)``,
        in any order (``H`` per granularity).

        ``keys``, ``values``: ``[B, Hkv, n, d]`` post-RoPE; ``queries``: ``[B, Hq, m, d]``, the last
        ``query_count(n)`` prompt queries. Called only with ``0 < count <= n - w``. The base class
        raises ``NotImplementedError``.
        """
        raise NotImplementedError

    def compress_layer(self, layer, num_layers, keys, values, queries) -> Kept:
        """Compress layer ``layer`` of ``num_layers`` on its own.

        ``keys``, ``values``: ``[B, Hkv, n, d]`` post-RoPE; ``queries``: ``[B, Hq, m, d]``, the last
        ``query_count(n)`` prompt queries. A prompt of ``n <= budget`` tokens is kept whole
        (``whole_prompt``); otherwise ``select`` picks ``layer_budget(...) - window_size`` prefix tokens
        (clamped to ``[0, n - w]``) and the window is appended (``keep_selected``). Returns a ``Kept`` of
        ``[B, H, k, d]``. Raises ``ValueError`` (from ``keep_selected``) when Hq is not a multiple of Hkv
        at ``query_head`` granularity, and whatever ``select`` raises.
        """
        n = keys.shape[2]
        if n <= self.budget:  # reference: `if n < mcp: keep all`; n == mcp selects all n - w anyway
            return self.whole_prompt(keys, values, queries.shape[1])
        count = self.layer_budget(layer, num_layers, n) - self.window_size
        count = max(0, min(count, n - self.window_size))
        selected = self.select(layer, num_layers, keys, values, queries, count) if count else None
        return self.keep_selected(keys, values, queries, selected)


def _pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """One layer's per-row ``(keys, values, positions)`` (each ``[1, H, k_b, ...]``) as one batch, right-
    padded to the longest row with zero keys/values and position -1."""
    longest = max(positions.shape[-1] for _, _, positions in rows)

    def pad(x: torch.Tensor, fill) -> torch.Tensor:
        missing = longest - x.shape[2]
        if not missing:
            return x
        shape = (*x.shape[:2], missing, *x.shape[3:])
        return torch.cat([x, x.new_full(shape, fill)], dim=2)

    return (torch.cat([pad(k, 0) for k, _, _ in rows]), torch.cat([pad(v, 0) for _, v, _ in rows]),
            torch.cat([pad(p, -1) for _, _, p in rows]))


class CompressionSession:
    """Per-prompt state. Default behaviour: each layer is compressed on its own, immediately.

    ``report`` collects, per compressed layer, the kept positions ``[B, H, k]`` (None where the whole
    prompt was kept) so results can record what each method kept. The default drives
    ``compressor.compress_layer`` (``UniformCompressor``). Raises ``ValueError`` when
    ``num_layers <= 0``.
    """

    def __init__(self, compressor: KVCompressor, num_layers: int):
        if num_layers <= 0:
            raise ValueError(f"num_layers={num_layers}: a session needs at least one compressed layer")
        self.compressor = compressor
        self.num_layers = num_layers
        self.prompt_length: int | None = None
        self.kept_positions: dict[int, torch.Tensor | None] = {}
        self.notes: list[str] = []

    def add_layer(self, layer: int, keys, values, queries) -> dict[int, Kept]:
        """Compress compressed layer number ``layer`` (0-based, in ``[0, num_layers)``) of this prompt.

        ``keys``, ``values``: ``[B, Hkv, n, d]`` post-RoPE; ``queries``: ``[B, Hq, m, d]``, the last
        ``query_count(n)`` prompt queries. Returns the layers whose cache should now be (re)written,
        ``{layer: Kept}``, and records the kept positions for ``report``. Raises ``ValueError`` when
        ``layer`` is out of range; passes on the errors of ``compressor.compress_layer``.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} outside 0..{self.num_layers - 1}")
        self.prompt_length = keys.shape[2]
        kept = self.compressor.compress_layer(layer, self.num_layers, keys, values, queries)
        self.record(layer, kept)
        return {layer: kept}

    def finish(self) -> dict[int, Kept]:
        """Called once after the last layer: the layers to (re)write now, ``{layer: Kept}``; empty here,
        since every layer was final when ``add_layer`` returned it."""
        return {}

    def record(self, layer: int, kept: Kept) -> None:
        """Remember what ``layer`` kept, for ``report``: its positions ``[B, H, k]`` (detached, left on
        their device), or None when the whole prompt was kept."""
        # kept on the device: copying here would synchronise the GPU once per layer during prefill
        self.kept_positions[layer] = None if kept.whole else kept.positions.detach()

    def report(self) -> dict:
        """Per layer: kept count, distinct kept tokens per head, and the kept positions
        (``[B, H, k]`` CPU tensor, None where the whole prompt was kept), for results files.

        Returns ``{"prompt_length": n, "layers": [...], "notes": [...]}`` with one dict per compressed
        layer (``layer``, ``kept``, ``whole``, ``positions`` and, when compressed,
        ``distinct_per_head``, counted on batch row 0 only). Copies the layers' positions to the CPU in one
        copy per device (one host synchronisation; a copy per layer cost an 8B model's six-method prefill
        ~30 ms per method on an H200), and counts the distinct tokens per head by sorting (no Python sets).
        """
        n = self.prompt_length or 0
        on_host = host_positions(self.kept_positions)
        by_shape: dict = {}           # layers of one [H, k] shape counted in one sort (not one per layer)
        for layer in range(self.num_layers):
            if on_host.get(layer) is not None:
                by_shape.setdefault(tuple(on_host[layer].shape[1:]), []).append(layer)
        distinct = {}
        for (heads, _), group in by_shape.items():
            counts = distinct_per_head(torch.cat([on_host[layer][0] for layer in group]))
            distinct.update({layer: counts[i * heads:(i + 1) * heads] for i, layer in enumerate(group)})
        layers = []
        for layer in range(self.num_layers):
            positions = on_host.get(layer)
            if positions is None:
                layers.append({"layer": layer, "kept": n, "whole": True, "positions": None})
            else:
                layers.append({"layer": layer, "kept": int(positions.shape[-1]),
                               "distinct_per_head": distinct[layer], "whole": False,
                               "positions": positions})
        return {"prompt_length": n, "layers": layers, "notes": list(self.notes)}


def host_positions(kept: dict) -> dict:
    """``{layer: positions [B, H, k] or None}`` -> the same on the CPU, copied as one flat tensor per device
    (a GPU's layers in one device-to-host copy). The values, dtypes and shapes are unchanged."""
    out = {layer: None for layer, p in kept.items() if p is None}
    by_device: dict = {}
    for layer, positions in kept.items():
        if positions is not None:
            by_device.setdefault((positions.device, positions.dtype), []).append((layer, positions))
    for items in by_device.values():
        flat = torch.cat([p.reshape(-1) for _, p in items]).cpu()
        offset = 0
        for layer, positions in items:
            out[layer] = flat[offset:offset + positions.numel()].view(positions.shape)
            offset += positions.numel()
    return out


def distinct_per_head(positions: torch.Tensor) -> list[int]:
    """Distinct values per row of ``positions [H, k]`` (integers): ``[len(set(row)) for row in positions]``,
    computed by sorting each row and counting where the value changes."""
    heads, k = positions.shape
    if k == 0:
        return [0] * heads
    ordered = positions.sort(dim=-1).values
    return (1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=-1)).tolist()


# ---------------------------------------------------------------------- registry
REGISTRY: dict[str, type[KVCompressor]] = {}


def register(cls: type[KVCompressor]) -> type[KVCompressor]:
    """Class decorator: enter ``cls`` in ``REGISTRY`` under ``cls.name`` and return it unchanged (a
    later class with the same name replaces the earlier). Raises ``ValueError`` when ``cls.name`` is
    empty."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def build(name: str, **knobs) -> KVCompressor:
    """Build a compressor by registered name with its config knobs, e.g.
    ``build("snapkv", budget=128, window_size=32, kernel_size=7, pooling="maxpool")``.

    Raises ``ConfigError`` for an unknown method name or knob, and (from the method's ``validate``) for
    a knob value that cannot work."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise ConfigError(f"{name}: unknown knob(s) {unknown}; its knobs are {sorted(allowed)}")
    return cls(**knobs)
