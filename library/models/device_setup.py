"""Devices, processes, precision and attention backends, with graceful fallbacks off CUDA.

CUDA-only features asked for on a machine without them (fp16 autocast, xformers) degrade
with one warning line each and the run goes on: the same command works on a laptop and a GPU box.
So does bf16 on a CPU without bf16 kernels (`bf16_or_float32`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class Precision:
    weight_dtype: torch.dtype  # frozen base weights
    autocast_dtype: torch.dtype | None  # None: no autocast
    train_dtype: torch.dtype  # trainable weights (full_fp16/full_bf16 make them half)
    mixed_precision: str  # what is actually used: "no" | "fp16" | "bf16"


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = []
    if getattr(args, "ddp_timeout", None):
        import datetime

        kwargs.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    # Precision is handled by `resolve_precision` + autocast, so the accelerator runs in "no" mode:
    # accelerate refuses fp16 on CPU, and we want a warning there, not an error.
    return Accelerator(mixed_precision="no", gradient_accumulation_steps=1, kwargs_handlers=kwargs, cpu=not torch.cuda.is_available())


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether PyTorch has vectorised bf16 kernels for this CPU (oneDNN's: AVX512 or AMX on x86,
    BF16 on ARM). Without them bf16 products and convolutions fall to scalar code: on an AVX2 CPU
    a 320-channel 3x3 convolution at 32x32 took 2.5 s against 16 ms in float32, and a 1024x1024
    product ran at 0.8 against 105 GFLOP/s."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the check: trust the request
        return True


def bf16_or_float32(device: torch.device, flag: str, doing: str) -> torch.dtype:
    """bf16, or float32 with one warning where `device` is a CPU without bf16 kernels."""
    if device.type == "cpu" and not cpu_has_fast_bf16():
        logger.warning(
            "%s: this CPU (%s) has no bf16 kernels, so bf16 math would run 100x slower than float32; %s in float32 "
            "instead", flag, torch.backends.cpu.get_cpu_capability(), doing,
        )
        return torch.float32
    return torch.bfloat16


def resolve_precision(args, device: torch.device) -> Precision:
    wanted = args.mixed_precision or "no"
    if wanted == "bf16" and bf16_or_float32(device, "--mixed_precision bf16", "training") == torch.float32:
        wanted = "no"
        if getattr(args, "full_bf16", False):
            args.full_bf16 = False  # the warning above says it: everything is float32
    if wanted == "fp16" and device.type != "cuda":
        logger.warning("--mixed_precision fp16 needs CUDA; training in float32 on %s instead", device.type)
        wanted = "no"
    if getattr(args, "full_fp16", False) and wanted != "fp16":
        logger.warning("--full_fp16 needs --mixed_precision fp16 on CUDA; ignored")
        args.full_fp16 = False
    if getattr(args, "full_bf16", False) and wanted != "bf16":
        logger.warning("--full_bf16 needs --mixed_precision bf16; ignored")
        args.full_bf16 = False
    if wanted == "no":
        return Precision(torch.float32, None, torch.float32, "no")
    dtype = torch.float16 if wanted == "fp16" else torch.bfloat16
    train_dtype = dtype if (args.full_fp16 or args.full_bf16) else torch.float32
    return Precision(dtype, dtype, train_dtype, wanted)


def autocast(device: torch.device, precision: Precision):
    if precision.autocast_dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def set_attention(unet, args, device: torch.device) -> str:
    """SDPA by default (on CPU with short half-precision attention in float32, `library/models/cpu_attention.py`);
    xformers when asked, installed and on CUDA; otherwise one warning and SDPA."""
    if getattr(args, "xformers", False):
        if device.type == "cuda" and importlib.util.find_spec("xformers") is not None:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        reason = "it is not installed (pip install -e .[cuda])" if importlib.util.find_spec("xformers") is None else "it needs CUDA"
        logger.warning("--xformers: %s; using PyTorch SDPA attention", reason)
    elif getattr(args, "mem_eff_attn", False):
        logger.info("--mem_eff_attn: PyTorch SDPA attention already uses memory-efficient kernels")
    if device.type == "cpu":  # the same SDPA, with short half-precision attention in float32
        from library.models.cpu_attention import CpuAttnProcessor

        unet.set_attn_processor(CpuAttnProcessor())
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
