"""What a K/V transform kept, per row: realised retain rates and the bytes a latent store would hold
(reference-dynakv.md section 4: KV bytes follow the kept ranks ``sum (r_K + r_V)`` against ``2 T L d``; the
per-token rank metadata and the paper's omission of it are reported separately).

The transform runs on every token, so its ranks come from the hook's log (``TransformLog.calls``, in call
order): the prompt's tokens from the first calls (the prefill, then the appended question under a split
``compression_scope``; row 0 of a batched call, every row holding the same prompt), the generated tokens from
the decoder, per row (``TransformLog.generated``). For an eviction method stacked on the transform (``snapkv+dynakv``), a layer's store holds the
union over heads of its kept prompt positions (one latent vector per token serves every head: with
``granularity=layer`` every head keeps the same tokens, so the union is that set) plus the appended tokens.
"""

from __future__ import annotations

import torch

#: bytes of one token's kept rank in a latent store (an int16 per token, layer and K/V)
RANK_BYTES = 2


def prompt_ranks(log, prompt_length: int) -> dict:
    """``(layer, kind) -> int64 [prompt_length]``: each prompt token's kept rank (the first calls' row 0)."""
    out = {}
    for key, calls in log.calls.items():
        parts, total = [], 0
        for ranks in calls:
            if total >= prompt_length:
                break
            row = ranks.reshape(-1, ranks.shape[-1])[0] if ranks.dim() > 1 else ranks.reshape(-1)
            parts.append(row.cpu())
            total += row.numel()
        out[key] = torch.cat(parts)[:prompt_length]
        if out[key].numel() != prompt_length:
            raise RuntimeError(f"the K/V transform saw {out[key].numel()} prompt tokens of layer {key[0]} ({key[1]}), "
                               f"not {prompt_length}: it was not applied to the whole prompt")
    return out


def sliding_windows(model) -> dict:
    """Model layer -> how many of the latest tokens its cache holds, for the sliding-window layers (Gemma 3's
    local layers): ``sliding_window - 1``, as transformers' ``DynamicSlidingWindowLayer`` keeps (5.x). Full
    attention layers are not listed."""
    from harness.engine.cache import full_attention_layers, num_layers, text_config
    window = getattr(text_config(model.config), "sliding_window", None)
    full = set(full_attention_layers(model.config))
    if window is None:
        return {}
    return {layer: window - 1 for layer in range(num_layers(model.config)) if layer not in full}


def stored_positions(report: dict | None, compressed: int, prompt_length: int, sliding: dict | None = None) -> dict:
    """Model layer -> the prompt positions a layer's latent store holds (bool ``[prompt_length]``): the union
    over heads of the kept positions (``report``: the eviction's compression report; None, or a layer kept
    whole: every position) plus the appended tokens ``[compressed, prompt_length)``; a sliding-window layer
    (``sliding``: layer -> tokens held) its last tokens only. Layers in neither: every position (not listed)."""
    out = {}
    for layer in (report or {}).get("layers", []):
        mask = torch.ones(prompt_length, dtype=torch.bool)
        positions = layer.get("positions")
        if positions is not None:
            mask[:compressed] = False
            valid = positions.reshape(-1)
            valid = valid[valid >= 0].cpu()
            mask[valid] = True
        out[layer.get("model_layer", layer["layer"])] = mask
    for layer, held in (sliding or {}).items():   # whatever the report says, the layer holds its window only
        mask = torch.zeros(prompt_length, dtype=torch.bool)
        mask[max(0, prompt_length - held):] = True
        out[layer] = mask
    return out


def row_fields(log, report: dict | None, compressed: int, prompt_length: int, element_bytes: int,
               row: int = 0, generated_tokens: int | None = None, sliding: dict | None = None,
               per_token_ranks: bool = True) -> dict:
    """The row's transform record: ``kv_retain_rate`` (kept fraction of the joint K/V dimensions over the
    prompt's tokens, layers, K and V), ``_k``/``_v``, ``kv_retain_rate_layers`` ([k, v] per model layer),
    ``kv_retain_rate_generated`` (over the generated tokens fed back to the model, row ``row`` of the decode:
    ``TransformLog.generated``; None without any), ``kv_rank_histogram``
    (``{"k"|"v": {rank: tokens}}`` over the prompt, all layers), ``kv_combined_rate`` (stored dimensions
    after eviction and transform over what FullKV's cache of the prompt holds: ``2 T d`` per full-attention layer,
    ``2 min(T, held) d`` per sliding-window layer, ``sliding``), ``kv_bytes_full`` (that FullKV cache at
    ``element_bytes``), ``kv_bytes_latent`` (the kept coefficients) and ``kv_bytes_rank_metadata`` (an int16
    rank per stored token, layer and K/V; 0 where ``per_token_ranks`` is False: a transform whose rank is the
    same for every token, pca_uniform and svd_weights, needs none).

    ``generated_tokens``: how many generated tokens the row fed back (its tokens minus the last); when given,
    every transformed layer must have recorded exactly that many, else ``RuntimeError`` (a decode step that
    bypassed the transform)."""
    ranks = prompt_ranks(log, prompt_length)
    stored = stored_positions(report, compressed, prompt_length, sliding)
    dims = log.dims
    layers = sorted({layer for layer, _ in ranks})
    kept = {kind: sum(int(ranks[(layer, kind)].sum()) for layer in layers) for kind in ("k", "v")}
    full_one = {kind: sum(prompt_length * dims[layer] for layer in layers) for kind in ("k", "v")}
    held = {layer: min(prompt_length, (sliding or {}).get(layer, prompt_length)) for layer in layers}
    cache_dims = sum(2 * held[layer] * dims[layer] for layer in layers)
    combined = metadata_tokens = 0
    for layer in layers:
        mask = stored.get(layer)
        for kind in ("k", "v"):
            r = ranks[(layer, kind)]
            combined += int(r[mask].sum()) if mask is not None else int(r.sum())
            metadata_tokens += int(mask.sum()) if mask is not None else prompt_length
    histogram = {}
    for kind in ("k", "v"):
        values, counts = torch.unique(torch.cat([ranks[(layer, kind)] for layer in layers]), return_counts=True)
        histogram[kind] = {int(v): int(c) for v, c in zip(values, counts)}
    generated = log.generated_row(row)
    if generated_tokens is not None:
        wrong = sorted(key for key in ranks if generated_tokens and generated.get(key, torch.empty(0)).numel()
                       != generated_tokens)
        if wrong:
            raise RuntimeError(f"the K/V transform saw {generated.get(wrong[0], torch.empty(0)).numel()} generated "
                               f"tokens of layer {wrong[0][0]} ({wrong[0][1]}), not {generated_tokens}: a decode step "
                               "bypassed it")
    gen_kept = sum(int(r.sum()) for r in generated.values())
    gen_dims = sum(r.numel() * dims[key[0]] for key, r in generated.items())
    full = full_one["k"] + full_one["v"]
    return {"kv_retain_rate": round((kept["k"] + kept["v"]) / full, 6),
            "kv_retain_rate_k": round(kept["k"] / full_one["k"], 6),
            "kv_retain_rate_v": round(kept["v"] / full_one["v"], 6),
            "kv_retain_rate_layers": [[round(float(ranks[(layer, kind)].sum()) / (prompt_length * dims[layer]), 4)
                                       for kind in ("k", "v")] for layer in layers],
            "kv_retain_rate_generated": round(gen_kept / gen_dims, 6) if gen_dims else None,
            "kv_rank_histogram": histogram,
            "kv_combined_rate": round(combined / cache_dims, 6),
            "kv_bytes_full": cache_dims * element_bytes,
            "kv_bytes_latent": combined * element_bytes,
            "kv_bytes_rank_metadata": metadata_tokens * RANK_BYTES if per_token_ranks else 0}

