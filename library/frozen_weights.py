"""Frozen base weights kept in the checkpoint's half precision while training computes in float32.

Most checkpoints store fp16 (or bf16) weights. A float32 run (no `--mixed_precision`) that trains a
LoRA or an embedding does not change the U-Net or text-encoder weights, so holding them as float32
copies doubles their memory for nothing: every fp16/bf16 value is exactly a float32 value. Here the
Linear and Conv2d layers of such a frozen part keep the file's dtype and upcast their weight inside
each forward and backward op; the float32 copy lives for one op only (autograd saves the half
weight, not the copy). Results are those of float32 weights, at half the memory. Norms, embeddings
and biases (a few MB) simply become float32.

The swapped layer classes keep the names `Linear` and `Conv2d`, because network modules (ours,
LyCORIS) choose the layers they adapt by class name; they stay subclasses of torch's, so
`isinstance` checks and state dicts are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class _UpcastConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


class Linear(torch.nn.Linear):
    """A frozen Linear whose weight stays in half precision; computes in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return _UpcastLinear.apply(x, self.weight, self.bias)


class Conv2d(torch.nn.Conv2d):
    """A frozen Conv2d whose weight stays in half precision; computes in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(x, self.weight.to(x.dtype), self.bias)
        return _UpcastConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


_SWAPS = {torch.nn.Linear: Linear, torch.nn.Conv2d: Conv2d}


def hold_in_half(module: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Swap the frozen half-precision Linear/Conv2d layers of `module` to upcasting ones and cast
    every other floating parameter and buffer to `compute_dtype`. Returns the bytes the layers keep
    in half precision (0 when the weights were already in `compute_dtype`)."""
    kept = 0
    for layer in module.modules():
        swap: Optional[type] = _SWAPS.get(type(layer))
        weight = getattr(layer, "weight", None)
        if swap is not None and weight is not None and weight.dtype in HALF and not weight.requires_grad:
            layer.__class__ = swap
            kept += weight.numel() * weight.element_size()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(compute_dtype)
            continue
        for name, p in layer.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != compute_dtype:
                p.data = p.data.to(compute_dtype)
        for name, b in layer.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != compute_dtype:
                setattr(layer, name, b.to(compute_dtype))
    return kept


def is_held_in_half(module: torch.nn.Module) -> bool:
    return any(isinstance(m, (Linear, Conv2d)) for m in module.modules())
