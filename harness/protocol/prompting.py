"""Turning a task sample into model input ids, per protocol (chat template or raw prompt)."""

from __future__ import annotations

import torch

CHAT_MODES = ("auto", "always", "never")
TRUNCATION_MODES = ("middle", "none")
#: ``protocol.compression_scope``: which leading part of the model input is prefilled and compressed; the
#: rest is appended uncompressed (``harness.engine.generate.extend``). ``prompt``: all of it, the reference
#: scripts' way (KVCache-Factory, DynamicKV, RULER's own runs); ``context``: the context only, question,
#: end of turn and answer prefix appended (kvpress's default, query-agnostic, NVIDIA/kvpress 8bb29b9
#: ``pipeline.py``); ``context_and_question``: context and question compressed, the template's end of turn and
#: the answer prefix appended (kvpress's ``--query_aware``).
COMPRESSION_SCOPES = ("prompt", "context", "context_and_question")


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
    scope = protocol.get("compression_scope", "prompt")
    if scope not in COMPRESSION_SCOPES:
        raise ConfigError(f"protocol.compression_scope={scope!r} is not one of {COMPRESSION_SCOPES}: prompt (the whole "
                          "input compressed, the reference scripts), context (the question appended uncompressed, "
                          "kvpress's default) or context_and_question (kvpress's query-aware mode)")
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
    """``[1, n]`` input ids of ``sample`` (``encode_parts`` with the whole prompt compressed)."""
    return encode_parts(sample, tokenizer, chat, device, special_tokens)[0]


def split_offset(sample, scope: str) -> int | None:
    """Where, in ``sample.prompt``, the part appended uncompressed begins under ``scope``: None for
    ``prompt`` (nothing is appended), ``sample.question_start`` for ``context``, the prompt's end for
    ``context_and_question`` (only the template's end of turn and the answer prefix follow). Raises
    ``ValueError`` when ``context`` meets a sample without a context/question split."""
    if scope == "prompt":
        return None
    if scope == "context_and_question":
        return len(sample.prompt)
    if sample.question_start is None:
        raise ValueError(f"sample {sample.id}: protocol.compression_scope=context needs the question's place in the "
                         "prompt, and this task's samples have none; fix: protocol.compression_scope=prompt or "
                         "context_and_question")
    return sample.question_start


def _token_ids(tokenizer, text: str, split: bool, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special, split_special_tokens=split).input_ids


def encode_parts(sample, tokenizer, chat: bool, device, special_tokens: str = "text",
                 scope: str = "prompt") -> tuple[torch.Tensor, int]:
    """``([1, n] input ids, c)``: the model input of ``sample`` and how many of its leading tokens are
    prefilled and compressed under ``protocol.compression_scope`` ``scope`` (``c == n`` for ``prompt``).

    Chat: the prompt is the user turn and the answer prefix opens the assistant turn. Raw: prompt +
    answer prefix with the tokenizer's special tokens (BOS). Where the input is split, the two parts are
    tokenized separately at the split (as kvpress tokenizes context and question apart), so the ids can
    differ from the unsplit ones at the boundary.

    ``special_tokens`` (``protocol.prompt_special_tokens``) says what special-token text inside the task's
    prompt becomes: ``text`` keeps it text (the needle prompt of the compression papers starts with a
    literal ``<|im_start|>``, which a ChatML tokenizer such as SmolLM2's would otherwise turn into a
    control token inside the user turn); ``parse`` tokenizes the whole string with the tokenizer's
    defaults, exactly as the reference scripts do. Only the prompt is affected: the chat template's own
    special tokens and BOS stay special, and where the prompt holds no special text both give the same
    ids (the template is split around the content, which is tokenized on its own).
    Raises ``ValueError`` for an unknown mode, a template that repeats, drops or rewrites the content, or
    a split that the sample does not have (``split_offset``).
    """
    if special_tokens not in SPECIAL_TOKEN_MODES:
        raise ValueError(f"protocol.prompt_special_tokens={special_tokens!r} is not one of {SPECIAL_TOKEN_MODES}")
    if scope not in COMPRESSION_SCOPES:
        raise ValueError(f"protocol.compression_scope={scope!r} is not one of {COMPRESSION_SCOPES}")
    split = special_tokens == "text"
    at = split_offset(sample, scope)
    prompt = sample.prompt
    if not chat:
        if at is None:
            ids = tokenizer(prompt + sample.answer_prefix, split_special_tokens=split).input_ids
            return torch.tensor([ids], device=device), len(ids)
        head = tokenizer(prompt[:at], split_special_tokens=split).input_ids
        ids = head + _token_ids(tokenizer, prompt[at:] + sample.answer_prefix, split)
        return torch.tensor([ids], device=device), len(head)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    text += sample.answer_prefix.lstrip()
    if not split and at is None:     # parse: the tokenizer's defaults on the whole text, as the reference scripts
        ids = _token_ids(tokenizer, text, False)
        return torch.tensor([ids], device=device), len(ids)
    frame = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}], add_generation_prompt=True,
                                          tokenize=False) + sample.answer_prefix.lstrip()
    fix = "protocol.prompt_special_tokens=parse" if split else "protocol.compression_scope=prompt"
    if frame.count(_CONTENT) != 1:
        raise ValueError(f"the chat template repeats or drops the user content; fix: {fix}")
    before, after = frame.split(_CONTENT)
    if not (text.startswith(before) and text.endswith(after)):
        raise ValueError(f"the chat template renders its frame differently for this prompt; fix: {fix}")
    content = text[len(before):len(text) - len(after)]   # as the template wrote it (some trim it)
    cut = len(content)
    if at is not None and at < len(prompt):
        question = prompt[at:].strip()
        cut = content.rstrip().rfind(question) if question else len(content)
        if cut < 0 or content.rstrip()[cut:] != question:
            raise ValueError(f"sample {sample.id}: the chat template rewrites the question, so the prompt cannot be "
                             "split at it; fix: protocol.compression_scope=prompt")
    if not split:
        head = _token_ids(tokenizer, before + content[:cut], False)
        return torch.tensor([head + _token_ids(tokenizer, content[cut:] + after, False)], device=device), len(head)
    head = _token_ids(tokenizer, before, False) + _token_ids(tokenizer, content[:cut], True)
    ids = head + _token_ids(tokenizer, content[cut:], True) + _token_ids(tokenizer, after, False)
    if at is None:
        return torch.tensor([ids], device=device), len(ids)
    return torch.tensor([ids], device=device), len(head)

