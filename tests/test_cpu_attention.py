"""The CPU attention processor: diffusers' SDPA results, with short half-precision attention in float32."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from library.models import cpu_attention
from library.models.cpu_attention import CpuAttnProcessor


def attention(**kwargs) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=2, dim_head=16, **kwargs).eval()


def run(module: Attention, processor, x, context=None):
    module.set_processor(processor)
    return module(x, encoder_hidden_states=context)


@pytest.mark.parametrize("cross", [False, True])
def test_float32_equals_diffusers_sdpa_exactly(cross):
    module = attention(cross_attention_dim=24 if cross else None)
    x = torch.randn(2, 64, 32)
    context = torch.randn(2, 77, 24) if cross else None
    assert torch.equal(run(module, CpuAttnProcessor(), x, context), run(module, AttnProcessor2_0(), x, context))


def test_other_layouts_take_diffusers_processor():
    """The VAE's attention (group norm, 4-D input, residual, rescale) goes to AttnProcessor2_0 unchanged."""
    module = attention(norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0)
    x = torch.randn(1, 32, 4, 4)
    assert torch.equal(run(module, CpuAttnProcessor(), x), run(module, AttnProcessor2_0(), x))


def sdpa_dtypes(monkeypatch) -> list:
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("queries,keys,upcast", [(64, 77, True), (256, 256, True), (1024, 77, False)])
def test_short_bf16_attention_runs_in_float32(queries, keys, upcast, monkeypatch):
    """Under bf16 autocast, attention with at most 256x256 scores is computed in float32: output and
    gradients are then the float32 computation's to bf16 rounding of the projections; longer
    attention stays in bf16."""
    full = attention(cross_attention_dim=24)
    half = copy.deepcopy(full)
    x = torch.randn(1, queries, 32)
    context = torch.randn(1, keys, 24)
    reference = run(full, AttnProcessor2_0(), x, context)
    seen = sdpa_dtypes(monkeypatch)
    xh = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(half, CpuAttnProcessor(), xh, context)
    assert seen == [torch.float32 if upcast else torch.bfloat16]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.02)
    out.float().square().sum().backward()
    assert torch.isfinite(xh.grad).all() and xh.grad.abs().sum() > 0


def test_threshold_is_queries_times_keys(monkeypatch):
    monkeypatch.setattr(cpu_attention, "FLOAT32_MAX_SCORES", 64 * 76)
    seen = sdpa_dtypes(monkeypatch)
    module = attention(cross_attention_dim=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(module, CpuAttnProcessor(), torch.randn(1, 64, 32), torch.randn(1, 77, 24))
        run(module, CpuAttnProcessor(), torch.randn(1, 64, 32), torch.randn(1, 76, 24))
    assert seen == [torch.bfloat16, torch.float32]


def test_set_attention_on_cpu_uses_it_for_every_u_net_attention(tiny_checkpoint):
    from types import SimpleNamespace

    from library.models.device_setup import set_attention
    from library.models.loading import load_models

    models = load_models(tiny_checkpoint("sdxl"), sdxl=True)
    assert set_attention(models.unet, SimpleNamespace(), torch.device("cpu")) == "sdpa"
    processors = models.unet.attn_processors
    assert processors and all(type(p) is CpuAttnProcessor for p in processors.values())
