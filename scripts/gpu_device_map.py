"""Compression with a model split over GPUs (device_map=balanced, accelerate) equals the same model on
one device. Builds a small random Llama (8 layers), saves it as a local checkpoint, loads it both ways
through the harness's model loader, and compares greedy outputs of every method.

    python scripts/gpu_device_map.py
"""

import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.engine.generate import generate  # noqa: E402
from harness.engine.models import byte_tokenizer, load_model  # noqa: E402
from methods import build  # noqa: E402


def main() -> None:
    folder = Path(tempfile.mkdtemp()) / "tiny-llama"
    config = AutoConfig.for_model("llama", vocab_size=258, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                                  bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    base = {"name": "tiny", "source": "hub", "name_or_path": str(folder), "dtype": "float32", "device": "auto"}
    single = load_model(OmegaConf.create(base))
    split = load_model(OmegaConf.create({**base, "device_map": "balanced"}))
    devices = sorted({str(p.device) for p in split.model.parameters()})
    print("split model on", devices)
    ids = torch.randint(2, 258, (1, 3000), generator=torch.Generator().manual_seed(1))
    same = True
    for name, knobs in [("fullkv", {}), ("snapkv", {}), ("pyramidkv", {}), ("dynamickv", {}),
                        ("dynamickv", {"variant": "fixed", "granularity": "kv_head"}), ("h2o", {})]:
        compressor = build(name, budget=128, window_size=16, **knobs)
        a = generate(single.model, single.tokenizer, ids.to(next(single.model.parameters()).device), compressor, 16, [])
        b = generate(split.model, split.tokenizer, ids.to(next(split.model.parameters()).device), compressor, 16, [])
        match = a.token_ids == b.token_ids and (a.report is None or
                                                [e["kept"] for e in a.report["layers"]] == [e["kept"] for e in b.report["layers"]])
        same &= match
        print(f"{name:10s} {knobs} identical={match} kept={None if b.report is None else [e['kept'] for e in b.report['layers']]}")
    print("ALL IDENTICAL" if same else "SOME DIFFER")


if __name__ == "__main__":
    main()
