"""Frozen base weights kept in the checkpoint's half precision while training computes in float32.

Most checkpoints store fp16 (or bf16) weights. A float32 run (no `--mixed_precision`) that trains a
LoRA or an embedding does not change the U-Net or text-encoder weights, so holding them as float32
copies doubles their memory for nothing: every fp16/bf16 value is exactly a float32 value. Here the
Linear and Conv2d layers of such a frozen part keep the file's dtype and upcast their weight inside
each forward and backward op; the float32 copy lives for one op only (autograd saves the half
weight, not the copy). Results are those of float32 weights, at half the memory. Frozen embedding
tables (the text encoders' token and position embeddings) stay in half precision too and upcast
only the rows looked up. Norms and biases (a few MB) simply become float32.

The upcast writes into one reusable buffer per thread and dtype instead of a fresh tensor: a fresh
float32 weight of tens of MB is a new memory map whose pages fault in one by one, which made the
upcast 6-7x slower than the copy itself and cost about a third of an SD1.5 step on CPU.

Frozen convolutions on CPU also pick PyTorch's convolution path by feature-map size (oneDNN on
large maps, im2col + GEMM on small ones; see `_IM2COL_MAX_PIXELS`), and frozen Linear layers on few
rows multiply by blocks of weight rows (`_THIN_ROWS`). Float32 frozen Linear and Conv2d layers are
swapped for that too, so a run from an fp32 file and one from an fp16 file take the same paths
(except that on Intel CPUs a float32 Linear weight, with nothing to upcast, multiplies as it is).

A bf16 run on CPU (--mixed_precision bf16) holds its frozen layers here too, weights in bf16 and
compute dtype bf16: under autocast the layers take their input in autocast's dtype, and small-map
convolutions unfold into one bf16 GEMM instead of oneDNN's (`_UNFOLD_MAX_PIXELS_BF16`).

With `--fp8_base` (`hold_in_fp8`) the frozen U-Net's and text encoders' Linear and Conv2d weights
are held in float8_e4m3fn with a power-of-two scale per tensor (`library.models.fp8_weights`, which
says why) and go through the same layers: the upcast multiplies by the scale (on CPU, a table lookup
into the same reused buffer), and everything else above applies unchanged.

The swapped layer classes keep the names `Linear`, `Conv2d` and `Embedding`, because network
modules (ours, LyCORIS) choose the layers they adapt by class name; they stay subclasses of torch's,
so `isinstance` checks and state dicts are unchanged.
"""

from __future__ import annotations

import platform
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from library.models.fp8_weights import FP8, dequantize, quantize, release_scratch, upcast_cpu_into

HALF = (torch.float16, torch.bfloat16)
NARROW = HALF + (FP8,)  # the dtypes a held weight may have below its compute dtype


class _UpcastBuffers(threading.local):
    """Per-thread scratch buffers, one per compute dtype, grown to the largest weight seen."""

    def __init__(self):
        self.by_dtype: dict = {}


_buffers = _UpcastBuffers()


def _upcast(weight: torch.Tensor, dtype: torch.dtype, exponent: int = 0) -> torch.Tensor:
    """`weight` (times `2**-exponent`, the scale of an fp8 weight) in `dtype`, valid until the next
    call on this thread: callers use it in one op and drop it."""
    if weight.dtype == dtype:
        return weight
    if torch.compiler.is_compiling() or weight.device.type != "cpu":
        # a compiled graph must not write into a tensor outside it; CUDA's caching allocator
        # already reuses blocks, so the plain cast costs no page faults there
        return dequantize(weight, exponent, dtype)
    buffer = _buffers.by_dtype.get(dtype)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = _buffers.by_dtype[dtype] = torch.empty(weight.numel(), dtype=dtype)
    out = buffer[: weight.numel()].view(weight.shape)
    if weight.dtype == FP8:
        return upcast_cpu_into(out, weight, exponent)
    return out.copy_(weight)


# A Linear on few rows (tokens x batch) streams its weight once for little arithmetic. On CPU it
# multiplies by blocks of weight rows, each block upcast into a cache-sized buffer, instead of
# upcasting the whole weight first: the upcast copy is then read back from cache, not from memory.
# Which side of the product the block goes on depends on the CPU's BLAS kernels. On AMD, `W_block @
# x.T` into the transposed output ran 1.3-2.4x faster than `F.linear` on the full upcast weight for
# SDXL's 64-token blocks and the text encoders' 77 tokens (and no faster at 1024 rows). On Intel
# (a Xeon with AMX, MKL) `x @ W_block.T` into column blocks of the output was the faster layout:
# an SDXL float32 step with fp16-held weights took 14.7 s instead of 16.5 s (median of 5, interleaved),
# and with weights already float32, where there is nothing to upcast, plain `F.linear` was best.
_THIN_ROWS = 256
# about 4 MB of float32 weight per block; on the Intel CPU, blocks of 1/4 and 1/2 that size made the
# SDXL step slower (16.9 and 15.3 s against 14.1 s, median of 5, interleaved): more, smaller products
_BLOCK_ELEMENTS = 1 << 20


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# "input_left": x @ W_block.T (Intel); "weight_left": W_block @ x.T into the transposed output (others)
_THIN_LAYOUT = "input_left" if "Intel" in _cpu_vendor() else "weight_left"


def _thin_cpu(rows: int, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    # float32 compute only: in bf16, with no upcast to save, F.linear was the faster of the two
    if not (dtype == torch.float32 and rows <= _THIN_ROWS and weight.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return False
    return weight.dtype != dtype or _THIN_LAYOUT == "weight_left"


def _row_blocks(weight: torch.Tensor):
    step = max(16, _BLOCK_ELEMENTS // weight.shape[1])
    return range(0, weight.shape[0], step), step


# The rows become the GEMM's short side; a count that is not a multiple of the 16-float vector width
# (77 tokens) leaves a tail that the kernels handle slowly: padding 77 rows to 80 with zeros made
# these products 10-40 % faster for the text encoders and the U-Net's cross-attention keys/values.
_ROW_MULTIPLE = 16


def _padded_rows(x2d: torch.Tensor) -> torch.Tensor:
    short = -x2d.shape[0] % _ROW_MULTIPLE
    return F.pad(x2d, (0, 0, 0, short)) if short else x2d


def _thin_linear(x2d: torch.Tensor, weight: torch.Tensor, exponent: int = 0) -> torch.Tensor:
    """x2d @ weight.T, by blocks of weight rows (see `_THIN_ROWS`)."""
    rows = x2d.shape[0]
    x2d = _padded_rows(x2d)
    starts, step = _row_blocks(weight)
    if _THIN_LAYOUT == "input_left":
        out = torch.empty(x2d.shape[0], weight.shape[0], dtype=x2d.dtype)
        for i in starts:
            torch.mm(x2d, _upcast(weight[i:i + step], x2d.dtype, exponent).t(), out=out[:, i:i + step])
        return out[:rows]
    out_t = torch.empty(weight.shape[0], x2d.shape[0], dtype=x2d.dtype)
    for i in starts:
        torch.mm(_upcast(weight[i:i + step], x2d.dtype, exponent), x2d.t(), out=out_t[i:i + step])
    return out_t[:, :rows].t().contiguous()


def _thin_linear_input_grad(grad2d: torch.Tensor, weight: torch.Tensor, exponent: int = 0) -> torch.Tensor:
    """grad2d @ weight, summed over the same blocks of weight rows."""
    rows = grad2d.shape[0]
    grad2d = _padded_rows(grad2d)
    starts, step = _row_blocks(weight)
    if _THIN_LAYOUT == "input_left":
        grad = torch.zeros(grad2d.shape[0], weight.shape[1], dtype=grad2d.dtype)
        for i in starts:
            grad.addmm_(grad2d[:, i:i + step], _upcast(weight[i:i + step], grad2d.dtype, exponent))
        return grad[:rows]
    grad_t = torch.zeros(weight.shape[1], grad2d.shape[0], dtype=grad2d.dtype)
    for i in starts:
        grad_t.addmm_(_upcast(weight[i:i + step], grad2d.dtype, exponent).t(), grad2d[:, i:i + step].t())
    return grad_t[:, :rows].t().contiguous()


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, exponent):
        ctx.save_for_backward(weight)
        ctx.exponent = exponent
        x2d = x.reshape(-1, x.shape[-1])
        if not _thin_cpu(x2d.shape[0], weight, x.dtype):
            return F.linear(x, _upcast(weight, x.dtype, exponent), bias)
        out = _thin_linear(x2d, weight, exponent)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad2d = grad.reshape(-1, grad.shape[-1])
        if not _thin_cpu(grad2d.shape[0], weight, grad.dtype):
            return grad.matmul(_upcast(weight, grad.dtype, ctx.exponent)), None, None, None
        grad_x = _thin_linear_input_grad(grad2d, weight, ctx.exponent)
        return grad_x.view(*grad.shape[:-1], weight.shape[1]), None, None, None


# oneDNN's CPU convolution is slow on small feature maps with many channels (a 1280-channel 3x3
# conv at 8x8 ran at a third of the im2col+GEMM path's speed on 2 cores); the GEMM path is slower
# on large maps. Forward on maps up to 16x16 and backward up to 8x8 take the GEMM path.
_IM2COL_MAX_PIXELS = {"forward": 256, "backward": 64}


class _cpu_conv_path:
    """Context choosing PyTorch's CPU convolution backend for one op by feature-map size."""

    def __init__(self, x: torch.Tensor, direction: str):
        self.switch = (x.device.type == "cpu" and x.dtype == torch.float32
                       and x.shape[-1] * x.shape[-2] <= _IM2COL_MAX_PIXELS[direction])

    def __enter__(self):
        if self.switch:
            self.before = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)

    def __exit__(self, *exc):
        if self.switch:
            torch._C._set_mkldnn_enabled(self.before)


# In bf16 on CPU, PyTorch's own im2col path (oneDNN off) is not vectorised: a 320-channel 3x3 conv
# at 32x32 took 2.6 s instead of 5 ms. Small maps instead unfold explicitly and take one bf16 GEMM.
# Up to 8x8 that beat oneDNN, which moreover reorders the weight at every call into a fresh buffer:
# for the 2560->1280 convs of SD1.5's and SDXL's up blocks (59 MB in bf16) that buffer is mmap'd
# and faulted in every time (14k page faults; 50 ms against 17 ms by GEMM, forward, 2 threads).
_UNFOLD_MAX_PIXELS_BF16 = 64


def _unfold_cpu(shape, weight: torch.Tensor, groups: int, dtype: torch.dtype) -> bool:
    # an fp8 weight is upcast to bf16 first (into the reused buffer), then takes the same GEMM
    return (dtype == torch.bfloat16 and weight.dtype in (dtype, FP8) and groups == 1 and weight.device.type == "cpu"
            and shape[-1] * shape[-2] <= _UNFOLD_MAX_PIXELS_BF16 and not torch.compiler.is_compiling())


# Both multiply with the weight as the right-hand factor, (batch x pixels) x (cout, cin*kh*kw), so the
# GEMM reads it in place: as the left factor of a batched product it is first copied (59 MB again).
def _conv_by_unfold(x, weight, bias, stride, padding, dilation):
    kernel = weight.shape[-2:]
    cols = F.unfold(x, kernel, dilation, padding, stride)  # (batch, cin*kh*kw, output pixels)
    out = torch.matmul(cols.transpose(1, 2), weight.reshape(weight.shape[0], -1).t())  # (batch, pixels, cout)
    if bias is not None:
        out += bias
    height = (x.shape[-2] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    return out.transpose(1, 2).reshape(x.shape[0], weight.shape[0], height, -1)


def _conv_input_grad_by_fold(shape, weight, grad, stride, padding, dilation):
    cols = torch.matmul(grad.flatten(2).transpose(1, 2), weight.reshape(weight.shape[0], -1))  # (batch, pixels, K)
    return F.fold(cols.transpose(1, 2), shape[-2:], weight.shape[-2:], dilation, padding, stride)


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, exponent):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups, exponent)
        if _unfold_cpu(x.shape, weight, groups, x.dtype):
            return _conv_by_unfold(x, _upcast(weight, x.dtype, exponent), bias, stride, padding, dilation)
        with _cpu_conv_path(x, "forward"):
            return F.conv2d(x, _upcast(weight, x.dtype, exponent), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, exponent = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0] and _unfold_cpu(shape, weight, groups, grad.dtype):
            grad_x = _conv_input_grad_by_fold(shape, _upcast(weight, grad.dtype, exponent), grad, stride, padding,
                                              dilation)
        elif ctx.needs_input_grad[0]:
            with _cpu_conv_path(grad, "backward"):
                grad_x = torch.nn.grad.conv2d_input(shape, _upcast(weight, grad.dtype, exponent), grad, stride, padding,
                                                    dilation, groups)
        return grad_x, None, None, None, None, None, None, None


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast would give a Linear/Conv2d its inputs in (autocast's own), or as it is."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Linear(torch.nn.Linear):
    """A frozen Linear, its weight in half precision, in fp8 (times `2**-fp8_exponent`) or already in the
    compute dtype; computes in the input's dtype (autocast's under autocast), on CPU by weight-row blocks
    when the input has few rows."""

    fp8_exponent = 0  # set per layer by `hold_in_fp8`: the held weight is `weight * 2**-fp8_exponent`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        if self.weight.dtype == x.dtype and not _thin_cpu(x.numel() // max(1, x.shape[-1]), self.weight, x.dtype):
            return F.linear(x, self.weight, self.bias)
        return _UpcastLinear.apply(x, self.weight, self.bias, self.fp8_exponent)


class Conv2d(torch.nn.Conv2d):
    """A frozen Conv2d, its weight in half precision, in fp8 (times `2**-fp8_exponent`) or already in the
    compute dtype; computes in the input's dtype (autocast's under autocast), on CPU with the convolution
    path that suits the feature map's size."""

    fp8_exponent = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(x, dequantize(self.weight, self.fp8_exponent, x.dtype), self.bias)
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                                   self.fp8_exponent)


class Embedding(torch.nn.Embedding):
    """A frozen lookup table (token or position embeddings) kept in half precision: only the rows
    looked up are upcast, and only the rows ever used are read from the mapped file."""

    compute_dtype = torch.float32  # set per layer by `hold_in_half`

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
        return rows.to(self.compute_dtype)


_SWAPS = {torch.nn.Linear: Linear, torch.nn.Conv2d: Conv2d, torch.nn.Embedding: Embedding}


def _swappable(layer: torch.nn.Module, compute_dtype: torch.dtype, fp8: bool = False) -> Optional[type]:
    swap: Optional[type] = _SWAPS.get(type(layer))
    weight = getattr(layer, "weight", None)
    if swap is None or weight is None or weight.requires_grad:
        return None
    if fp8 and swap is not Embedding and weight.is_floating_point():
        return swap  # quantised whatever the file's dtype
    if weight.dtype in HALF or swap is not Embedding and weight.dtype == compute_dtype:
        return swap  # float32 Linear/Conv2d are swapped too, so both runs take the same CPU paths
    return None


_REPORTING: dict = {}  # (model class, dtype) -> its subclass whose `dtype` says the compute dtype


def _report_compute_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """diffusers and transformers models tell their dtype by their first parameter, which may now be
    a half weight; pipelines cast their inputs to it. Make `module.dtype` the compute dtype instead
    (a subclass of the same name, so isinstance checks and saved configs are unchanged)."""
    cls = type(module)
    if cls in _REPORTING.values() or not isinstance(getattr(cls, "dtype", None), property):
        return
    sub = _REPORTING.get((cls, dtype))
    if sub is None:
        sub = type(cls.__name__, (cls,), {"dtype": property(lambda self: dtype), "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _REPORTING[(cls, dtype)] = sub
    module.__class__ = sub


def hold_in_half(module: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Swap the frozen half-precision Linear/Conv2d/Embedding layers of `module` (and its frozen
    Linear/Conv2d layers already in `compute_dtype`) to the classes above and cast every other floating
    parameter and buffer to `compute_dtype`; `module.dtype` (diffusers/transformers models) then
    reports `compute_dtype`. Returns the bytes the layers keep in half precision (0 when the weights
    were already in `compute_dtype`)."""
    return _hold(module, compute_dtype, fp8=False)


def hold_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """As `hold_in_half`, but every frozen Linear/Conv2d weight (from any float dtype) is quantised to
    float8_e4m3fn with a power-of-two scale (`library.models.fp8_weights`) and upcast per op to
    `compute_dtype`. Embedding tables stay as `hold_in_half` keeps them (half precision, or the compute
    dtype): sd-scripts keeps the text encoders' embeddings out of fp8 as well, and a looked-up row is
    used as it is, with no later product to average its rounding out. Norms and biases (well under 1 %
    of the weights) become `compute_dtype`: in fp8 they would shift every activation for nothing.
    A weight that was a zero-copy map of the model file gives its resident pages back once quantised,
    so the file's pages do not stay in memory beside the fp8 copy. Returns the bytes held in fp8 and
    half precision."""
    return _hold(module, compute_dtype, fp8=True)


def _hold(module: torch.nn.Module, compute_dtype: torch.dtype, fp8: bool) -> int:
    from library.models.safetensors_io import MappedPages

    kept = 0
    mapped = MappedPages() if fp8 else None
    for name, layer in module.named_modules():
        swap = _swappable(layer, compute_dtype, fp8)
        if swap is not None:
            layer.__class__ = swap
            if fp8 and swap is not Embedding:
                old = layer.weight.data
                layer.weight.data, layer.fp8_exponent = quantize(old, f"{name}.weight")
                mapped.release(old)
                del old
            weight = layer.weight
            if weight.dtype in NARROW:
                kept += weight.numel() * weight.element_size()
            if swap is Embedding:
                layer.compute_dtype = compute_dtype
            elif layer.bias is not None:
                layer.bias.data = layer.bias.data.to(compute_dtype)
            continue
        for name, p in layer.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != compute_dtype:
                p.data = p.data.to(compute_dtype)
        for name, b in layer.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != compute_dtype:
                setattr(layer, name, b.to(compute_dtype))
    if fp8:
        release_scratch()
    if uses_frozen_layers(module):
        _report_compute_dtype(module, compute_dtype)
    return kept


_HELD = (Linear, Conv2d, Embedding)


def is_held_in_half(module: torch.nn.Module) -> bool:
    """Whether some frozen layer of `module` holds its weight narrower than it computes (half or fp8)."""
    return any(isinstance(m, _HELD) and m.weight.dtype in NARROW for m in module.modules())


def is_held_in_fp8(module: torch.nn.Module) -> bool:
    return any(isinstance(m, _HELD) and m.weight.dtype == FP8 for m in module.modules())


def uses_frozen_layers(module: torch.nn.Module) -> bool:
    """Whether `hold_in_half` swapped any layer of `module` (half-held, or float32 Linear/Conv2d)."""
    return any(isinstance(m, _HELD) for m in module.modules())


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype `module` computes in: its parameters' dtype, leaving out the weights held in half
    precision (inputs must come in this dtype; `next(module.parameters()).dtype` would say fp16)."""
    held = {id(m.weight) for m in module.modules() if isinstance(m, _HELD) and m.weight.dtype in NARROW}
    for p in module.parameters():
        if p.is_floating_point() and id(p) not in held:
            return p.dtype
    return torch.float32 if held else next(module.parameters()).dtype
