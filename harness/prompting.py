"""Turning a task sample into model input ids, per protocol (chat template or raw prompt)."""

from __future__ import annotations

import torch

CHAT_MODES = ("auto", "always", "never")


def use_chat_template(mode: str, model_has_template: bool, tokenizer, dataset: str | None = None,
                      skip: tuple = ()) -> bool:
    if mode not in CHAT_MODES:
        raise ValueError(f"protocol.chat_template={mode!r} is not one of {CHAT_MODES}")
    if mode == "never" or dataset in skip:
        return False
    has = getattr(tokenizer, "chat_template", None) is not None
    if mode == "always" and not has:
        raise ValueError("protocol.chat_template=always but this tokenizer has no chat template; use auto or never")
    return has and (mode == "always" or model_has_template)


def encode(sample, tokenizer, chat: bool, device) -> torch.Tensor:
    """``[1, n]`` input ids. Chat: the prompt is the user turn and the answer prefix opens the
    assistant turn. Raw: prompt + answer prefix with the tokenizer's special tokens (BOS)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                             add_generation_prompt=True, tokenize=False)
        text += sample.answer_prefix.lstrip()
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(sample.prompt + sample.answer_prefix, return_tensors="pt").input_ids
    return ids.to(device)
