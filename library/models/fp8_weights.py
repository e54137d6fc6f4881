"""Frozen weights stored in float8 (e4m3fn) with a power-of-two scale per tensor.

`--fp8_base` / `--fp8_base_unet` hold the frozen U-Net's (and text encoders') Linear and Conv2d
weights in one byte per value; `library.models.frozen_weights` upcasts them inside each op. This
module does the format: quantising a weight, and the upcast on the CPU.

Scale. sd-scripts casts the weights directly (`unet.to(torch.float8_e4m3fn)`). e4m3fn has 3
mantissa bits and normal numbers only from 2^-6 = 0.0156 up to 448; below 0.0156 the spacing is a
fixed 2^-9 = 0.00195, and many U-Net weights lie there. Measured on the full-size SD1.5 U-Net layout
with seeded weights at the usual init scale (std 1/sqrt(fan_in), rounded to fp16 first): a direct
cast leaves a relative RMS error of 8.6 % in the 1280x2560x3x3 up-block convolutions (std 0.0066;
11.8 % of their values become 0), 6.1 % at std 0.0093 and 4.2 % at 0.014, where scaling each tensor
so that its largest magnitude lands in (224, 448] leaves 2.65 % in every layer: the format's own
limit (3 mantissa bits). Over the whole U-Net: 3.7 % direct against 2.65 % scaled; heavy-tailed
weights (Student-t, 3 degrees of freedom) gave the same 2.64 %. A scale per output channel gained
nothing over one per tensor (2.65 % both): within a tensor the values span far fewer than the 15
octaves of e4m3's normal range. So each tensor gets one scale, a power of two `2**-exponent`:
multiplying by it is exact in every float format, so the held values are exactly
`fp8 * 2**-exponent` whether the compute dtype is float32, bf16 or fp16. The scale never makes a
value saturate (the largest magnitude maps to at most 448, so nothing is clamped), and a weight
holding inf or NaN is refused by name instead of being cast to 448 or NaN.

Upcast on the CPU. PyTorch converts float8 to float32 element by element (about 1.5 ns per value
on a 2-core AVX-512 machine, 7x an fp16 upcast). There are only 256 byte values, so the upcast
here is a table lookup (`index_select` of a table already scaled, in the compute dtype), two codes
at a time (a 65536-entry table of value pairs) at about 0.4 ns per value, or one at a time (0.75 ns)
where a tensor's bytes are not aligned for it; the codes are widened to int32 indices, up to 4M at
a time. On CUDA the plain `.to(dtype)` is fast and is used.
"""

from __future__ import annotations

import math
import sys
import threading

import torch

from library.errors import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; e4m3fn has no inf
# a weight whose largest magnitude is below 448 * 2**-64 (about 2e-17) is as good as zero; the bound
# keeps 2**exponent a normal float32 and bf16 number
_MAX_EXPONENT = 64
# values per lookup: few, large ops. Each op is one OpenMP parallel region, and on a machine where
# other processes hold the cores every region waits for a descheduled thread: an SDXL-size weight
# (6.5M values) took 215 ms in 256K-value chunks against 21 ms in one lookup (44 ms by `.to()`),
# where on an idle machine both took 5 ms. 4M values (16 MiB of int32 indices per thread) took 25 ms.
_CHUNK = 1 << 22


def fp8_exponent(weight: torch.Tensor, name: str = "weight") -> int:
    """The power of two `k` that puts the largest magnitude of `weight * 2**k` in (224, 448]."""
    if weight.numel():  # aminmax: no |weight| temporary the size of the weight
        low, high = torch.aminmax(weight.detach())
        amax = max(-float(low), float(high))
    else:
        amax = 0.0
    if not math.isfinite(amax):
        raise UserError(f"{name}: the model holds inf or NaN in this weight; the checkpoint is damaged "
                        "(re-download or re-save it)")
    if amax == 0.0:
        return 0
    k = math.floor(math.log2(FP8_MAX / amax))
    while amax * 2.0 ** k > FP8_MAX:  # log2 of a float may round up at an exact power of two
        k -= 1
    return max(-_MAX_EXPONENT, min(_MAX_EXPONENT, k))


class _Scratch(threading.local):
    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.float32)


_scratch = _Scratch()


def quantize(weight: torch.Tensor, name: str = "weight") -> tuple:
    """(`weight * 2**k` rounded to the nearest float8_e4m3fn, `k`): the held weight is the first
    times `2**-k`. Rounds to nearest (ties to even), as PyTorch's cast does; the clamp only guards
    the bound, which the scale already keeps.

    The float32 intermediate lives in one reused buffer per thread (on the CPU): quantising a model
    allocates only the fp8 tensors it keeps. A fresh temporary per weight, of every size from a bias
    to a 13M-value projection, left the allocator's arenas fragmented, and the trainer's resident
    memory after quantising SDXL varied from 4.2 to 7.3 GiB between runs for 3.2 GiB of weights
    (4.2 GiB every time with the buffer)."""
    k = fp8_exponent(weight, name)
    weight = weight.detach()
    if weight.device.type != "cpu":
        scaled = weight.to(torch.float32) * 2.0 ** k
    else:
        if _scratch.buffer.numel() < weight.numel():
            _scratch.buffer = torch.empty(weight.numel(), dtype=torch.float32)
        scaled = _scratch.buffer[:weight.numel()].view(weight.shape)
        scaled.copy_(weight).mul_(2.0 ** k)
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8), k


def release_scratch() -> None:
    """Free this thread's quantisation buffer (after a model is quantised)."""
    _scratch.buffer = torch.empty(0, dtype=torch.float32)


def dequantize(weight: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor `weight * 2**-exponent` in `dtype` (float8 or any other floating weight)."""
    out = weight.to(dtype)
    return out.mul_(2.0 ** -exponent) if exponent else out


_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).to(torch.float32)
_tables: dict = {}  # (dtype, exponent) -> the 256 values of the byte codes, scaled, in dtype
_pair_tables: dict = {}  # (dtype, exponent) -> the 65536 values of two byte codes, as packed bits
_PACKED = {2: (torch.int16, torch.int32, 0xFFFF), 4: (torch.int32, torch.int64, 0xFFFFFFFF)}


def _table(dtype: torch.dtype, exponent: int) -> torch.Tensor:
    table = _tables.get((dtype, exponent))
    if table is None:
        table = _tables[(dtype, exponent)] = (_CODES * 2.0 ** -exponent).to(dtype)
    return table


def _pair_table(dtype: torch.dtype, exponent: int) -> torch.Tensor:
    """Entry `lo | hi << 8` holds the values of the codes lo and hi side by side, as one integer
    twice the width of `dtype` (little-endian: lo first in memory)."""
    table = _pair_tables.get((dtype, exponent))
    if table is None:
        bits, packed, mask = _PACKED[dtype.itemsize]
        one = _table(dtype, exponent).view(bits).to(packed) & mask
        width = 8 * dtype.itemsize
        table = _pair_tables[(dtype, exponent)] = (one.view(1, 256) | (one.view(256, 1) << width)).reshape(-1)
    return table


class _Indices(threading.local):
    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.int32)  # grown to the largest lookup, at most _CHUNK


_indices = _Indices()


def _lookup(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = table[codes[i]] for integer `codes`, widened to int32 indices up to _CHUNK at a time."""
    if _indices.buffer.numel() < min(codes.numel(), _CHUNK):
        _indices.buffer = torch.empty(min(codes.numel(), _CHUNK), dtype=torch.int32)
    index = _indices.buffer
    for start in range(0, codes.numel(), _CHUNK):
        stop = min(start + _CHUNK, codes.numel())
        n = stop - start
        index[:n].copy_(codes[start:stop])
        torch.index_select(table, 0, index[:n], out=out[start:stop])


def upcast_cpu_into(out: torch.Tensor, weight: torch.Tensor, exponent: int) -> torch.Tensor:
    """Write `weight * 2**-exponent` (a contiguous float8 CPU tensor) into `out` (contiguous, same
    number of values, any float dtype) by table lookup; returns `out`.

    Two codes per lookup where the memory allows it: the byte pairs read as 16-bit indices into a
    65536-entry table of value pairs (256 KiB for 2-byte dtypes, 512 KiB for float32, in cache),
    about 1.7-1.9x faster than a lookup per value on a 2-core AVX-512 machine (0.38 against
    0.67-0.78 ns per value to bf16)."""
    codes = weight.view(torch.uint8).reshape(-1)
    flat = out.view(-1)
    n = codes.numel()
    pairs = n // 2
    packed = _PACKED.get(out.dtype.itemsize)
    if (packed and pairs and sys.byteorder == "little" and codes.data_ptr() % 2 == 0
            and flat.data_ptr() % (2 * out.dtype.itemsize) == 0):
        _lookup(_pair_table(out.dtype, exponent), codes[:2 * pairs].view(torch.uint16),
                flat[:2 * pairs].view(packed[1]))
        if n % 2:
            _lookup(_table(out.dtype, exponent), codes[-1:], flat[-1:])
        return out
    _lookup(_table(out.dtype, exponent), codes, flat)
    return out
