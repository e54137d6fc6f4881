"""Seeded random models of every family, at tiny or full size.

Tiny models keep the real key structure (same blocks, layers and names) with small widths; they
are the embedded default model of the demo and of the tests. Full-size ones serve the benchmarks.
Models are built on the meta device and filled tensor by tensor from a seeded generator, so a
full-size SDXL never exists twice in memory and the same seed gives the same weights everywhere.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from library.models import clip_convert, unet_convert, vae_convert
from library.models.families import ModelFamily
from library.models.loading import StableDiffusionModels

SIZES = ("tiny", "full")


def _fill(module: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype) -> None:
    """Materialise meta parameters with values of the usual init scales."""
    for name, param in list(module.named_parameters()):
        shape = param.shape
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = torch.randn(shape, generator=generator) * 0.02
        elif param.ndim == 1 or "norm" in name:
            value = 1.0 + 0.02 * torch.randn(shape, generator=generator)
        elif param.ndim == 0:
            value = torch.tensor(math.log(100.0))
        else:
            fan_in = max(1, param[0].numel())
            std = 0.02 if "embedding" in name else 1.0 / math.sqrt(fan_in)
            value = torch.randn(shape, generator=generator) * std
        _set(module, name, torch.nn.Parameter(value.to(dtype), requires_grad=param.requires_grad))


def _set(module: torch.nn.Module, name: str, value) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    setattr(owner, leaf, value)


def build_random_models(
    family: ModelFamily, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
    v_parameterization: Optional[bool] = None,
) -> StableDiffusionModels:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    generator = torch.Generator().manual_seed(seed)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_convert.unet_config(family, size))
        vae = AutoencoderKL.from_config(vae_convert.vae_config(family, size))
    _fill(unet, generator, dtype)
    _fill(vae, generator, dtype)
    text_encoders = []
    for spec in family.text_encoders:
        encoder = clip_convert.build_text_encoder(clip_convert.clip_config(spec, size), spec, device="meta")
        _fill(encoder, generator, dtype)
        clip_convert.materialise_position_ids(encoder)  # a non-persistent buffer, still on meta
        text_encoders.append(encoder)
    for model in [unet, vae] + text_encoders:
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{type(model).__name__}: tensors left on the meta device: {left[:3]}")
    if v_parameterization is None:
        v_parameterization = family.name == "sd2"
    return StableDiffusionModels(
        family=family, unet=unet.eval(), vae=vae.eval(), text_encoders=[t.eval() for t in text_encoders],
        v_parameterization=v_parameterization, source_kind="random",
    )
