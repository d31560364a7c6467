"""``task=perplexity``: the sliding-window perplexity equals transformers' own loss computed the way its
perplexity guide does it (labels masked with -100, each window weighted by its scored tokens)."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

import harness.run.runner as runner
from harness.run import results
from harness.tasks.perplexity import windows
from methods import ConfigError

from conftest import ROOT, user_error

CONF = str(ROOT / "conf")
TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen liquor jugs.\n\n") * 3


def config(tmp_path, *overrides):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=tiny_llama", "task=perplexity", f"task.text_path={path}", "task.context_length=160",
            "task.stride=64", "task.bos=false", "method=fullkv", f"results_dir={tmp_path / 'results'}", "wandb=false",
            "progress=never", *overrides])


def guide_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """transformers' perplexity guide's method: model(..., labels=...) with -100 masking, each window
    weighted by the tokens its loss really averages (the guide weights by trg_len, one too many for
    windows after the first)."""
    nll, count, previous = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        target = end - previous
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :-target] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * valid
        count += valid
        previous = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [64, 160])
def test_perplexity_equals_the_transformers_guide(tmp_path, stride):
    [summary] = runner.run(config(tmp_path, f"task.stride={stride}"))
    lm = runner._MODEL[next(iter(runner._MODEL))]
    ids = lm.tokenizer(TEXT, add_special_tokens=False).input_ids
    expected = guide_perplexity(lm.model, ids, 160, stride)
    assert math.isclose(summary["perplexity"], expected, rel_tol=1e-5)
    rows = list(results.finished(summary["folder"]).values())
    assert sum(r["scored_tokens"] for r in rows) == len(ids) - 1 - (len(windows(len(ids), 160, stride)) - 1
                                                                      if stride == 160 else 0)
    scores = json.loads((tmp_path / "results" / "perplexity").rglob("scores.json").__next__().read_text())
    assert scores["perplexity"] == summary["perplexity"]


def test_windows_cover_every_token_once():
    for total, context, stride in ((1000, 256, 128), (1000, 256, 256), (300, 1024, 512), (257, 256, 1)):
        spans = windows(total, context, stride)
        scored = [t for begin, end, n in spans for t in range(end - n, end)]
        step_one = stride < context
        assert len(scored) == len(set(scored))
        if step_one:
            assert scored == list(range(1, total))            # every token but the first, once


def test_perplexity_settings_fail_before_the_model_loads(tmp_path):
    assert "task.stride=300 is larger than task.context_length=160" in user_error(
        lambda: runner.plan(config(tmp_path, "task.stride=300")))
    assert "runs FullKV or a K/V transform alone" in user_error(lambda: runner.plan(config(tmp_path, "method=snapkv")))
    assert "is not a file" in user_error(lambda: runner.plan(config(tmp_path, "task.text_path=/nope.txt")))
    with pytest.raises(ConfigError):
        runner.plan(config(tmp_path, "task.context_length=0"))


def test_with_bos_every_window_starts_with_it_unscored_and_every_token_is_scored(tmp_path):
    [summary] = runner.run(config(tmp_path, "task.bos=true"))
    lm = runner._MODEL[next(iter(runner._MODEL))]
    ids = lm.tokenizer(TEXT, add_special_tokens=False).input_ids
    bos = lm.tokenizer.bos_token_id
    nll, count, previous = 0.0, 0, 0
    for begin in range(0, len(ids), 64):                 # windows of 1 BOS + 159 text tokens
        end = min(begin + 159, len(ids))
        scored = end - previous
        window = torch.tensor([[bos] + ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(window).logits[0].double(), dim=-1)
        targets = window[0, 1:]
        nll -= float(logp[:-1].gather(1, targets[:, None])[-scored:].sum())
        count += scored
        previous = end
        if end == len(ids):
            break
    assert count == len(ids) and summary["scored_tokens"] == len(ids)
    assert math.isclose(summary["perplexity"], math.exp(nll / count), rel_tol=1e-5)
