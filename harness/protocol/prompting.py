"""Turning a task sample into model input ids, per protocol (chat template or raw prompt)."""

from __future__ import annotations

import torch

CHAT_MODES = ("auto", "always", "never")
TRUNCATION_MODES = ("middle", "none")


def check_protocol(protocol, model_cfg) -> None:
    """Before the model loads: the protocol's chat rule is known, and a protocol that always uses a chat
    template meets a model configured as a chat model (whose template ``models.chat_template_of`` then
    guarantees at load time)."""
    from methods import ConfigError
    mode = protocol.chat_template
    if mode not in CHAT_MODES:
        raise ConfigError(f"protocol.chat_template={mode!r} is not one of {CHAT_MODES}")
    if mode == "always" and model_cfg.chat_template is False:   # null: judged once the tokenizer is loaded
        raise ConfigError(f"protocol.chat_template=always, but model {model_cfg.name!r} is not configured as a "
                          "chat model (model.chat_template=false); fix: model.chat_template=true, with "
                          "model.chat_template_file=<a .jinja file> where the model's files carry no template, or a "
                          "protocol with chat_template: auto or never")
    special = protocol.prompt_special_tokens
    if special not in SPECIAL_TOKEN_MODES:
        raise ConfigError(f"protocol.prompt_special_tokens={special!r} is not one of {SPECIAL_TOKEN_MODES}: text (special-"
                          "token text in a task's prompt stays text) or parse (the tokenizer's default, as the "
                          "reference scripts)")
    truncation = protocol.truncation
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"protocol.truncation={truncation!r} is not one of {TRUNCATION_MODES}: middle (LongBench's "
                          "first and last halves of max_input_tokens) or none")
    skip = protocol.chat_template_skip or []
    if isinstance(skip, str):
        raise ConfigError(f"protocol.chat_template_skip={skip!r} must be a list of dataset names")


def use_chat_template(mode: str, model_has_template: bool, tokenizer, dataset: str | None = None,
                      skip: tuple = ()) -> bool:
    from methods import ConfigError
    if mode not in CHAT_MODES:
        raise ConfigError(f"protocol.chat_template={mode!r} is not one of {CHAT_MODES}")
    if mode == "never" or dataset in skip:
        return False
    has = getattr(tokenizer, "chat_template", None) is not None
    if mode == "always" and not has:
        raise ConfigError("protocol.chat_template=always but this tokenizer has no chat template; fix: "
                          "protocol.chat_template=auto or never, or model.chat_template_file=<a .jinja file>")
    return has and (mode == "always" or model_has_template)


SPECIAL_TOKEN_MODES = ("text", "parse")
_CONTENT = "\ue000kv-harness-user-content\ue000"      # private-use characters: never in a template


def special_text(text: str, tokenizer) -> list[str]:
    """The special tokens of ``tokenizer`` (``<|im_start|>``, ``<s>``, ...) written out in ``text``."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(t for t in specials if t and t in text)


def encode(sample, tokenizer, chat: bool, device, special_tokens: str = "text") -> torch.Tensor:
    """``[1, n]`` input ids. Chat: the prompt is the user turn and the answer prefix opens the
    assistant turn. Raw: prompt + answer prefix with the tokenizer's special tokens (BOS).

    ``special_tokens`` (``protocol.prompt_special_tokens``) says what special-token text inside the task's
    prompt becomes: ``text`` keeps it text (the needle prompt of the compression papers starts with a
    literal ``<|im_start|>``, which a ChatML tokenizer such as SmolLM2's would otherwise turn into a
    control token inside the user turn); ``parse`` tokenizes the whole string with the tokenizer's
    defaults, exactly as the reference scripts do. Only the prompt is affected: the chat template's own
    special tokens and BOS stay special, and where the prompt holds no special text both give the same
    ids (the template is split around the content, which is tokenized on its own).
    """
    if special_tokens not in SPECIAL_TOKEN_MODES:
        raise ValueError(f"protocol.prompt_special_tokens={special_tokens!r} is not one of {SPECIAL_TOKEN_MODES}")
    split = special_tokens == "text"
    if not chat:
        ids = tokenizer(sample.prompt + sample.answer_prefix, split_special_tokens=split).input_ids
        return torch.tensor([ids], device=device)
    text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                         add_generation_prompt=True, tokenize=False)
    text += sample.answer_prefix.lstrip()
    if not split:
        return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=device)
    frame = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}], add_generation_prompt=True,
                                          tokenize=False) + sample.answer_prefix.lstrip()
    if frame.count(_CONTENT) != 1:
        raise ValueError("the chat template repeats or drops the user content; use protocol.prompt_special_tokens=parse")
    before, after = frame.split(_CONTENT)
    if not (text.startswith(before) and text.endswith(after)):
        raise ValueError("the chat template renders its frame differently for this prompt; use "
                         "protocol.prompt_special_tokens=parse")
    content = text[len(before):len(text) - len(after)]   # as the template wrote it (some trim it)
    ids = (tokenizer(before, add_special_tokens=False).input_ids
           + tokenizer(content, add_special_tokens=False, split_special_tokens=True).input_ids
           + tokenizer(after, add_special_tokens=False).input_ids)
    return torch.tensor([ids], device=device)
