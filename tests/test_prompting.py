"""Prompts as the reference scripts build them: special-token text in a task's prompt, chat templates
a model config supplies or requires, and the protocol checks made before any model loads."""

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import harness.run.runner as runner
from harness.engine.models import byte_tokenizer
from harness.protocol.prompting import encode, special_text
from harness.tasks import Sample, needle
from methods import ConfigError

from conftest import ROOT, real_model, tiny_config, user_error


def sample(prompt: str, prefix: str = "") -> Sample:
    return Sample(id="x", prompt=prompt, answers=[], max_new_tokens=1, answer_prefix=prefix)


def test_special_token_text_in_a_raw_prompt_stays_text_unless_the_protocol_parses_it():
    tok = byte_tokenizer()
    prompt = sample("the end token is written </s> here")
    assert special_text(prompt.prompt, tok) == ["</s>"]
    as_text = encode(prompt, tok, False, "cpu", "text")[0].tolist()
    parsed = encode(prompt, tok, False, "cpu", "parse")[0].tolist()
    assert as_text[0] == parsed[0] == tok.bos_token_id                 # BOS is still added
    assert tok.eos_token_id not in as_text and parsed.count(tok.eos_token_id) == 1
    assert tok.decode(as_text[1:]) == prompt.prompt


def test_a_trimming_chat_template_gets_the_same_ids_either_way_without_special_text():
    """The content is tokenized apart from the template's frame; where the template transforms it
    (Llama-3's template trims the message), the frame split must still see what the template wrote."""
    tok = byte_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n\n{{ m['content'] | trim }}"
                         "{{ eos_token }}{% endfor %}<assistant>\n\n")
    for text in ("  padded on both sides \n", "plain", "\nnewline first", "x" * 300):
        ids_text = encode(sample(text, " Answer:"), tok, True, "cpu", "text")
        ids_parse = encode(sample(text, " Answer:"), tok, True, "cpu", "parse")
        assert torch.equal(ids_text, ids_parse), repr(text)
        assert tok.decode(ids_text[0]).count(text.strip()) == 1


def test_the_needle_prompt_on_smollm2_keeps_its_literal_im_start_as_text():
    """The compression papers' needle prompt starts with the text <|im_start|>; SmolLM2's tokenizer
    would make it a second control token inside the user turn (reference-eval.md B.2)."""
    lm = real_model("smollm2_135m")
    tok = lm.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    prompt = sample(needle.PAPER_PROMPT.format(context="Some text. " * 20, question="What is it?"))
    frame = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    frame = frame["input_ids"] if isinstance(frame, dict) or hasattr(frame, "keys") else frame
    in_frame = list(frame).count(im_start)
    assert list(encode(prompt, tok, True, "cpu", "text")[0]).count(im_start) == in_frame
    assert list(encode(prompt, tok, True, "cpu", "parse")[0]).count(im_start) == in_frame + 1
    plain = sample("There is an important info hidden inside a lot of irrelevant text. " * 30)
    assert torch.equal(encode(plain, tok, True, "cpu", "text"), encode(plain, tok, True, "cpu", "parse"))


def test_a_chat_model_without_a_template_fails_before_its_weights_load(monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_weights)
    cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": 0, "tokenizer": "bytes", "dtype": "float32",
                            "device": "cpu", "config": tiny_config(), "chat_template": True})
    from harness.engine.models import load_model
    with pytest.raises(ConfigError, match=r"model.chat_template=true, but the tokenizer of 'tiny' has no chat template"
                                          r".*fix: model.chat_template_file="):
        load_model(cfg)


def test_a_template_file_becomes_the_tokenizers_and_is_recorded(tmp_path):
    template = tmp_path / "turns.jinja"
    template.write_text("{% for m in messages %}<turn {{ m['role'] }}>{{ m['content'] }}{% endfor %}<turn model>")
    cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": 0, "tokenizer": "bytes", "dtype": "float32",
                            "device": "cpu", "config": tiny_config(), "chat_template": True,
                            "chat_template_file": str(template)})
    from harness.engine.models import load_model
    lm = load_model(cfg)
    assert lm.tokenizer.chat_template == template.read_text() and lm.info["chat_template_source"] == str(template)
    ids = encode(sample("hello"), lm.tokenizer, True, "cpu")
    assert lm.tokenizer.decode(ids[0]) == "<turn user>hello<turn model>"


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny_llama", "wandb=false", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["protocol.chat_template=always"], r"protocol.chat_template=always, but model 'tiny_llama' is not configured as a "
                                        r"chat model.*fix: model.chat_template=true"),
    (["protocol.chat_template=sometimes"], r"protocol.chat_template='sometimes' is not one of \[auto, always, never\]"),
    (["protocol.prompt_special_tokens=escape"], r"protocol.prompt_special_tokens='escape' is not one of \[text, parse\]"),
    (["+model.chat_template_file=nope/missing.jinja"], r"model.chat_template_file='nope/missing.jinja': no such file"),
    (["protocol.stop_tokens.samsum=eos"], r"protocol.stop_tokens.samsum must be a list, e.g. protocol.stop_tokens.samsum=\[a,b\]"),
    (["protocol.min_new_tokens.default=-1"], r"protocol.min_new_tokens.default=-1 must be an integer >= 0"),
])
def test_protocol_and_template_settings_fail_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    def no_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_cached_model", no_model)
    assert re.search(message, user_error(lambda: runner.run(compose_config(f"results_dir={tmp_path}", *overrides))))
