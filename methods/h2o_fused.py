"""H2O's accumulated attention without materialising the probabilities (``H2O(scorer="fused")``; issue 18).

The reference scorer (``methods.h2o.accumulated_attention``) forms each query chunk's ``[B, H, c, n]``
probabilities in float32, rounds them to the model dtype and sums them over the queries: memory-bound on the
probabilities (+155 % over FullKV's prefill at 8K, +380 % at 32K on the 8B shape on an H200, docs/BENCHMARKS.md;
+41 % / +106 % with this scorer). The fused scorer computes the same quantity in two passes that never write a
probability:

1. per query row, the log-sum-exp of its masked logits (an attention forward without the values);
2. per prefix key, the sum over the query rows of ``exp(logit - lse_row)``, each term rounded to the model dtype
   as the reference rounds its probabilities, accumulated in float32; one final rounding to the model dtype.

Logits are formed as the reference forms them: the product rounded to the model dtype, then scaled by
``1 / sqrt(d)`` (on a GPU, as CUDA divides by a number: times its float32 reciprocal, ``inverse_sqrt``) and rounded
again (``methods.scoring.attention_logits``). Masks are the variant's (``causal``:
key > query; ``reference_2024``: key > query for the queries of the trailing window only).

**Not bit for bit the reference.** ``exp(x - lse)`` and ``exp(x - max) / sum`` round differently in the last
float32 bit, and the float32 sums add in another order, so a score can differ from the reference's by one unit
in the last place of the model dtype, and ``topk`` can then break a near-tie the other way. Measured on an H200
(``scripts/gpu_check_h2o.py``, 6,000 random bf16 tokens of the 8B shape): 20-22 of 190,976 scores differ from the
reference code's literal computation, against 1-5 for the chunked scorer; no kept token differed. That is why the
fused scorer is an option, never the default. float16 is refused (the reference's overflow handling,
``methods.scoring``, has no counterpart here).

For bfloat16 on a CUDA device with Triton (``kernel_takes``) the two passes are Triton kernels (``_lse_kernel``,
``_column_kernel``); elsewhere (float32, another head size, the CPU tests) the same two passes run in PyTorch, a
query chunk at a time (``two_pass_torch``): they form the logits twice, so on the CPU (and for float32 on a GPU,
with a warning) the fused scorer is slower than the reference one; it exists there to be tested and to give the
same scores.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch

from methods.base import repeat_heads
from methods.scoring import attention_logits

log = logging.getLogger(__name__)


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None

def _check(queries: torch.Tensor, keys: torch.Tensor, window: int, variant: str) -> None:
    if queries.dtype == torch.float16:
        raise ValueError("h2o scorer='fused' does not take float16 (the reference's float16 overflow handling has no "
                         "counterpart in it); fix: h2o scorer='reference', or a bfloat16/float32 model")
    if variant not in ("causal", "reference_2024"):
        raise ValueError(f"fused H2O scorer: variant={variant!r} is not 'causal' or 'reference_2024'")
    if queries.shape[2] != keys.shape[2] or queries.shape[1] % keys.shape[1]:
        raise ValueError(f"fused H2O scorer: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} need the same "
                         "token count and query heads a multiple of the key heads")
    if not 0 <= window < keys.shape[2]:
        raise ValueError(f"fused H2O scorer: window={window} must be in [0, {keys.shape[2]})")


def _masked_logits(q: torch.Tensor, keys: torch.Tensor, start: int, variant: str, prefix: int) -> torch.Tensor:
    """The chunk's logits ``[B, Hq, c, n]`` in float32 (their values those of the model dtype), -inf where masked."""
    n = keys.shape[2]
    logits = attention_logits(q, repeat_heads(keys, q.shape[1] // keys.shape[1])).float()
    query = torch.arange(start, start + q.shape[2], device=q.device)[:, None]
    key = torch.arange(n, device=q.device)[None, :]
    future = key > query
    if variant == "reference_2024":
        future &= query >= prefix
    return logits.masked_fill_(future, float("-inf"))


def two_pass_torch(queries: torch.Tensor, keys: torch.Tensor, window: int, variant: str,
                   query_chunk: int = 256) -> torch.Tensor:
    """The fused scorer's two passes in PyTorch (module docstring), ``query_chunk`` query rows at a time.

    ``queries`` ``[B, Hq, n, d]``, ``keys`` ``[B, Hk, n, d]`` (Hk dividing Hq). Returns ``[B, Hq, n - window]``
    in the model dtype. Raises ``ValueError`` for float16, another variant, or mismatched shapes."""
    _check(queries, keys, window, variant)
    b, hq, n, _ = queries.shape
    prefix = n - window
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=queries.device)
    for start in range(0, n, query_chunk):
        q = queries[:, :, start:start + query_chunk]
        lse[:, :, start:start + q.shape[2]] = torch.logsumexp(_masked_logits(q, keys, start, variant, prefix), dim=-1)
    total = torch.zeros(b, hq, prefix, dtype=torch.float32, device=queries.device)
    for start in range(0, n, query_chunk):
        q = queries[:, :, start:start + query_chunk]
        logits = _masked_logits(q, keys, start, variant, prefix)[..., :prefix]
        probs = torch.exp(logits - lse[:, :, start:start + q.shape[2], None]).to(queries.dtype)
        total += probs.sum(dim=2, dtype=torch.float32)
    return total.to(queries.dtype)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The two Triton kernels, defined on first use (importing Triton is slow and it is optional: the CPU
    tests run the PyTorch passes). Raises ``RuntimeError`` without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("the fused H2O scorer's kernels need Triton (pip install triton); the PyTorch passes "
                           "(two_pass_torch) need nothing") from error

    @triton.jit
    def _logits(q, k, inv_scale, ROUND_BF16: tl.constexpr):
        s = tl.dot(q, tl.trans(k))                          # float32 accumulation
        if ROUND_BF16:                                      # the reference's bf16 product, then bf16 / sqrt(d)
            s = s.to(tl.bfloat16).to(tl.float32)
            s = (s * inv_scale).to(tl.bfloat16).to(tl.float32)
        else:
            s = s * inv_scale
        return s

    @triton.jit
    def _masked(s, rows, cols, n, prefix, REF2024: tl.constexpr):
        future = cols[None, :] > rows[:, None]
        if REF2024:
            future = future & (rows[:, None] >= prefix)
        bad = future | (cols[None, :] >= n) | (rows[:, None] >= n)
        return tl.where(bad, float("-inf"), s)

    @triton.jit
    def _lse_kernel(Q, K, LSE, n, prefix, inv_scale, groups, sqb, sqh, sqn, skb, skh, skn, heads,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, REF2024: tl.constexpr,
                    ROUND_BF16: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // heads, pid_bh % heads
        rows = pid_m * BM + tl.arange(0, BM)
        dims = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=rows[:, None] < n, other=0.0)
        kbase = K + b * skb + (h // groups) * skh
        m = tl.full([BM], float("-inf"), tl.float32)
        acc = tl.zeros([BM], tl.float32)
        last = (pid_m + 1) * BM      # causal: keys from the block's last query on are masked for every row
        for start in range(0, n, BN):   # (loop bounds from program ids break Triton's CPU interpreter: skip instead)
            if REF2024 or start < last:
                cols = start + tl.arange(0, BN)
                k = tl.load(kbase + cols[:, None] * skn + dims[None, :], mask=cols[:, None] < n, other=0.0)
                s = _masked(_logits(q, k, inv_scale, ROUND_BF16), rows, cols, n, prefix, REF2024)
                new = tl.maximum(m, tl.max(s, axis=1))
                acc = acc * tl.exp(m - new) + tl.sum(tl.exp(s - new[:, None]), axis=1)
                m = new
        tl.store(LSE + pid_bh * n + rows, m + tl.log(acc), mask=rows < n)

    @triton.jit
    def _column_kernel(Q, K, LSE, OUT, n, prefix, inv_scale, groups, sqb, sqh, sqn, skb, skh, skn, heads,
                       D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, REF2024: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // heads, pid_bh % heads
        cols = pid_n * BN + tl.arange(0, BN)
        dims = tl.arange(0, D)
        k = tl.load(K + b * skb + (h // groups) * skh + cols[:, None] * skn + dims[None, :], mask=cols[:, None] < n,
                    other=0.0)
        qbase = Q + b * sqb + h * sqh
        total = tl.zeros([BN], tl.float32)
        first = pid_n * BN          # causal: queries before the block's first key never see it
        for start in range(0, n, BM):
            if REF2024 or start + BM > first:
                rows = start + tl.arange(0, BM)
                q = tl.load(qbase + rows[:, None] * sqn + dims[None, :], mask=rows[:, None] < n, other=0.0)
                lse = tl.load(LSE + pid_bh * n + rows, mask=rows < n, other=0.0)
                s = _masked(_logits(q, k, inv_scale, ROUND_BF16), rows, cols, n, prefix, REF2024)
                p = tl.exp(s - lse[:, None])
                if ROUND_BF16:
                    p = p.to(tl.bfloat16).to(tl.float32)      # the reference's probabilities in the model dtype
                total += tl.sum(p, axis=0)
        tl.store(OUT + pid_bh * prefix + cols, total, mask=cols < prefix)

    return triton, _lse_kernel, _column_kernel


def inverse_sqrt(d: int) -> float:
    """``1 / sqrt(d)`` as CUDA scales a tensor by a Python number: the float32 reciprocal of float32 ``sqrt(d)``
    (PyTorch's CUDA ``div`` by a scalar multiplies by its reciprocal), returned exactly as a Python float."""
    return (torch.tensor(1.0) / torch.tensor(math.sqrt(d), dtype=torch.float32)).item()


def kernel_takes(queries: torch.Tensor) -> bool:
    """Whether the Triton kernels take these queries: bfloat16 on a CUDA device (the dtype they were checked in,
    ``scripts/gpu_check_h2o.py``), a power-of-two head size >= 16, fewer than 2**31 elements (the kernels' offsets
    are int32), and Triton importable."""
    d = queries.shape[-1]
    return (queries.is_cuda and queries.dtype == torch.bfloat16 and d >= 16 and not d & (d - 1)
            and queries.numel() < 2**31 and triton_available())


def fused_triton(queries: torch.Tensor, keys: torch.Tensor, window: int, variant: str,
                 block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """The two passes as Triton kernels (module docstring); same arguments and result as ``two_pass_torch``.
    ``block_m``/``block_n``: query rows and keys per tile (64 x 64 was the fastest of four shapes on an H200);
    ``num_warps``/``num_stages``: Triton's launch options (None: Triton's default). Raises ``ValueError`` for
    inputs ``kernel_takes`` refuses, ``RuntimeError`` without Triton, and what ``two_pass_torch`` raises."""
    _check(queries, keys, window, variant)
    if not kernel_takes(queries):
        raise ValueError(f"fused H2O kernels take bfloat16 CUDA queries with a power-of-two head size >= 16 and "
                         f"Triton; got {queries.dtype} on {queries.device}, head size {queries.shape[-1]}")
    triton, _lse_kernel, _column_kernel = _kernels()
    b, hq, n, d = queries.shape
    prefix = n - window
    q, k = queries.contiguous(), keys.contiguous()
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, prefix, dtype=torch.float32, device=q.device)
    args = (n, prefix, inverse_sqrt(d), hq // k.shape[1], q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), hq)
    flags = dict(D=d, BM=block_m, BN=block_n, REF2024=variant == "reference_2024",
                 ROUND_BF16=q.dtype == torch.bfloat16, num_warps=num_warps,
                 **({} if num_stages is None else {"num_stages": num_stages}))
    _lse_kernel[(triton.cdiv(n, block_m), b * hq)](q, k, lse, *args, **flags)
    _column_kernel[(triton.cdiv(prefix, block_n), b * hq)](q, k, lse, out, *args, **flags)
    return out.to(queries.dtype)


def fused_accumulated_attention(queries: torch.Tensor, keys: torch.Tensor, window: int, variant: str,
                                query_chunk: int = 256) -> torch.Tensor:
    """``methods.h2o.accumulated_attention`` by the fused scorer: the Triton kernels where ``kernel_takes`` the
    queries (bfloat16 on a CUDA device), else the same two passes in PyTorch. Shapes and errors as
    ``two_pass_torch``."""
    if kernel_takes(queries):
        return fused_triton(queries, keys, window, variant)
    if queries.is_cuda:
        _warn_once(f"h2o scorer='fused': the Triton kernels do not take {queries.dtype} queries of head size "
                   f"{queries.shape[-1]} ({queries.numel()} elements, Triton {'' if triton_available() else 'not '}"
                   "importable); the same two passes run in PyTorch, slower than scorer='reference'")
    return two_pass_torch(queries, keys, window, variant, query_chunk)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)
