"""The fused H2O scorer (methods/h2o_fused.py, ``H2O(scorer="fused")``) against the reference scorer: equal to
rounding. Its Triton kernels run only where a CUDA GPU is (Triton's CPU interpreter, 3.6 with numpy 2.4, cannot run
a loop with a runtime bound and reads bfloat16 wrongly): the last test here, and scripts/gpu_check_h2o.py, which
also compares both scorers with the reference code's literal computation (docs/BENCHMARKS.md)."""

import pytest
import torch

from methods.base import repeat_heads
from methods.h2o import accumulated_attention
from methods.h2o_fused import two_pass_torch


def inputs(dtype, seed=0, b=1, hkv=2, groups=2, n=150, d=32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, hkv * groups, n, d, generator=g)).to(dtype)
    k = (scale * torch.randn(b, hkv, n, d, generator=g)).to(dtype)
    return q, k


@pytest.mark.parametrize("variant", ["causal", "reference_2024"])
def test_the_torch_passes_equal_the_reference_to_rounding(variant):
    q, k = inputs(torch.float32, scale=2.0)
    ref = accumulated_attention(q, repeat_heads(k, 2), 16, variant, 32)
    ours = two_pass_torch(q, k, 16, variant, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    q, k = inputs(torch.bfloat16, seed=1, scale=2.0)
    ref = accumulated_attention(q, repeat_heads(k, 2), 16, variant, 32).float()
    ours = two_pass_torch(q, k, 16, variant, 64).float()
    assert ((ours - ref).abs() <= 2 * 2.0 ** -7 * ref.abs().clamp_min(1e-3)).all()   # within two bf16 ulps
    assert (ours == ref).float().mean() > 0.9


def test_float16_is_refused():
    q, k = inputs(torch.float16)
    with pytest.raises(ValueError, match="does not take float16"):
        two_pass_torch(q, k, 8, "causal")


def test_h2o_scorer_fused_keeps_the_reference_scorers_tokens_and_has_its_own_folder():
    """H2O(scorer="fused") on the CPU runs the PyTorch passes: on float32 random inputs (no near ties) it keeps
    exactly the tokens the reference scorer keeps, for both all-query variants; its runs are named apart, and
    the default scorer leaves names and knobs as they were before the knob existed."""
    import methods
    from harness.run.results import run_name
    q, k = inputs(torch.float32, seed=3, n=200, scale=1.5)
    v = torch.randn_like(k)
    for variant in ("causal", "reference_2024"):
        ref = methods.build("h2o", budget=64, window_size=8, variant=variant)
        fused = methods.build("h2o", budget=64, window_size=8, variant=variant, scorer="fused")
        (rk, rv, rp), = ref.compress_all([k], [v], [q])
        (fk, fv, fp), = fused.compress_all([k], [v], [q])
        assert torch.equal(rp, fp) and torch.equal(rk, fk) and torch.equal(rv, fv)
    assert "scorer" not in ref.knobs()
    assert run_name({"name": "h2o", **ref.knobs()}) == "h2o_b64_w8_k7_maxpool_qh_variantreference2024"
    assert run_name({"name": "h2o", **fused.knobs()}) == "h2o_b64_w8_k7_maxpool_qh_scorerfused_variantreference2024"


def test_h2o_scorer_is_checked():
    import methods
    with pytest.raises(methods.ConfigError, match="scorer='fast' is not one of"):
        methods.build("h2o", budget=64, window_size=8, scorer="fast")
    with pytest.raises(methods.ConfigError, match="variant='window'"):
        methods.build("h2o", budget=64, window_size=8, scorer="fused", variant="window")


def test_a_float16_model_with_the_fused_scorer_is_refused_before_loading(tmp_path):
    from harness import config
    from harness.run import runner
    cfg = config.compose(["method=h2o", "protocol.h2o_scorer=fused", "model.dtype=float16", "wandb=false",
                          f"results_dir={tmp_path}"])
    import methods
    with pytest.raises(methods.ConfigError, match="scorer=fused does not take a float16 model"):
        runner.plan(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU (none here); "
                    "scripts/gpu_check_h2o.py is their GPU check")
@pytest.mark.parametrize("variant", ["causal", "reference_2024"])
def test_the_triton_kernels_equal_the_torch_passes(variant):   # pragma: no cover - GPU only
    from methods.h2o_fused import fused_triton
    g = torch.Generator("cuda").manual_seed(0)
    q = (2 * torch.randn(1, 8, 700, 64, device="cuda", generator=g)).to(torch.bfloat16)
    k = (2 * torch.randn(1, 2, 700, 64, device="cuda", generator=g)).to(torch.bfloat16)
    ours, ref = fused_triton(q, k, 16, variant).float(), two_pass_torch(q, k, 16, variant).float()
    assert ((ours - ref).abs() <= 2 * 2.0 ** -7 * ref.abs()).all()
    assert (ours == ref).float().mean() > 0.99


def test_report_labels_name_the_default_scorer():
    """Two H2O runs that differ only in the scorer: the reference one (its records leave the knob out) is labelled
    scorer=reference, not scorer=None."""
    from pathlib import Path

    from harness.report.common import RunInfo, distinct_labels
    knobs = {"name": "h2o", "budget": 64, "window_size": 8, "variant": "causal"}
    infos = [RunInfo(Path("a"), "h2o", 64, knobs, "needle", "m", "p"),
             RunInfo(Path("b"), "h2o", 64, {**knobs, "scorer": "fused"}, "needle", "m", "p")]
    labels = distinct_labels(infos)
    assert labels[0].endswith("(scorer=reference)") and labels[1].endswith("(scorer=fused)")


@pytest.mark.parametrize("granularity", ["query_head", "kv_head", "layer"])
@pytest.mark.parametrize("batch, n, window", [(2, 40, 8), (1, 33, 1), (1, 40, 39)])
def test_h2o_fused_keeps_the_reference_tokens_at_every_granularity_and_edge(granularity, batch, n, window):
    """The fused scorer's PyTorch passes through H2O at each granularity, a batch of 2, a one-token window and a window of
    n - 1: the same kept tokens as the reference scorer (float32, no near ties)."""
    import methods
    q, k = inputs(torch.float32, seed=7, b=batch, n=n, scale=1.5)
    v = torch.randn_like(k)
    for variant in ("causal", "reference_2024"):
        kw = dict(budget=window + 1 if window == n - 1 else min(window + 8, n - 1), window_size=window,
                  variant=variant, granularity=granularity)
        ref = methods.build("h2o", **kw).compress_all([k], [v], [q])[0]
        fused = methods.build("h2o", scorer="fused", **kw).compress_all([k], [v], [q])[0]
        assert all(torch.equal(a, b) for a, b in zip(ref, fused))
