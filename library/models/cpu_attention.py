"""The U-Net's attention processor on CPU: diffusers' SDPA processor, with short bf16/fp16 attention
computed in float32.

PyTorch's CPU flash-attention kernel is slow in the backward pass in bf16 on short sequences: for
SDXL's 8x8 blocks at 256 px (64 queries, 64 or 77 keys, 20 heads of 64) the bf16 backward took
4.6-6.5 ms against 1.1-1.4 ms in float32, while the forward took the same time in both. SDXL has 60
such self- and cross-attention pairs: upcast, the attention backward of a bf16 step went from 0.66 to
0.38 s (torch profiler) and a bare SDXL bf16 step from 4.64 to 4.10 s (median of 10, interleaved).
On long sequences bf16 wins (SD1.5's 32x32 self-attention, 1024x1024 scores: 38 against 48 ms
forward and backward), so only attention with at most `FLOAT32_MAX_SCORES` scores per head is
upcast; SD1.5's step did not change measurably (2.33 against 2.40 s). Float32 inputs, masks and
the less common module layouts (group norm, spatial norm, 4-D input, ...) take diffusers' own
processor unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

FLOAT32_MAX_SCORES = 256 * 256  # query x key length at or under which half-precision attention is upcast


def _plain_layout(attn, hidden_states: torch.Tensor, attention_mask, args, kwargs) -> bool:
    """The attention of the SD/SDXL U-Net's transformer blocks: projections, SDPA, output projection."""
    return (hidden_states.ndim == 3 and attention_mask is None and not args and not kwargs
            and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0)


class CpuAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 whose short half-precision attention runs in float32 (see the module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not _plain_layout(attn, hidden_states, attention_mask, args, kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, heads = hidden_states.shape[0], attn.heads
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        dtype = query.dtype
        if dtype in (torch.float16, torch.bfloat16) and query.shape[-2] * key.shape[-2] <= FLOAT32_MAX_SCORES:
            with torch.autocast(query.device.type, enabled=False):
                out = F.scaled_dot_product_attention(query.float(), key.float(), value.float())
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)
        return attn.to_out[1](attn.to_out[0](out))
