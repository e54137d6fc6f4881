"""VAE naming and configs: original LDM single-file layout <-> diffusers AutoencoderKL.

Keys are renamed module by module; the only tensor change is the mid-block attention, whose
q/k/v/proj_out are 1x1 convs [C, C, 1, 1] in LDM and Linear [C, C] in diffusers. That change is
done by indexing, which gives a view of the same storage, never a copy. The level count and
blocks per level are read from the keys. Configs are AutoencoderKL kwargs, from family data
(`vae_config`) or from tensor shapes (`infer_vae_config`), both built by one function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from library.errors import UserError

_RESNET_CHILDREN = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
)
_ATTENTION_CHILDREN = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
# diffusers < 0.17 attention names, accepted as input only.
_OLD_ATTENTION_CHILDREN = (("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj_attn"))
_RESHAPED = {"q", "k", "v", "proj_out"}


@dataclass(frozen=True)
class VAEStructure:
    levels: int
    layers_per_block: int  # encoder resnets per level; the decoder has one more
    mid_attention: bool


def _layout_error(what: str) -> UserError:
    return UserError(f"VAE state dict: {what}; expected an SD-style AutoencoderKL")


def _structure(sd, pattern: str, attention_prefix: str) -> VAEStructure:
    blocks: dict[int, set] = {}
    for key in sd:
        m = re.match(pattern, key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or len(blocks) != max(blocks) + 1:
        raise _layout_error("cannot find the encoder down blocks")
    layers = len(blocks[0])
    mid_attention = any(k.startswith(attention_prefix) for k in sd)
    return VAEStructure(len(blocks), layers, mid_attention)


def _ldm_structure(sd) -> VAEStructure:
    return _structure(sd, r"encoder\.down\.(\d+)\.block\.(\d+)\.", "encoder.mid.attn_1.")


def _diffusers_structure(sd) -> VAEStructure:
    return _structure(sd, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", "encoder.mid_block.attentions.0.")


@lru_cache(maxsize=8)
def _pairs(s: VAEStructure, old_attention_names: bool = False) -> tuple:
    """(ldm_module, diffusers_module, reshape) for every parameterised module."""
    out = [(name, name, False) for name in ("quant_conv", "post_quant_conv")]
    attention = _OLD_ATTENTION_CHILDREN + (("norm", "group_norm"),) if old_attention_names else _ATTENTION_CHILDREN

    def resnet(ldm: str, diff: str):
        out.extend((f"{ldm}.{a}", f"{diff}.{b}", False) for a, b in _RESNET_CHILDREN)

    for side in ("encoder", "decoder"):
        out += [(f"{side}.conv_in", f"{side}.conv_in", False), (f"{side}.conv_out", f"{side}.conv_out", False),
                (f"{side}.norm_out", f"{side}.conv_norm_out", False)]
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        if s.mid_attention:
            out.extend((f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}", a in _RESHAPED)
                       for a, b in attention)
    for i in range(s.levels):
        for j in range(s.layers_per_block):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < s.levels - 1:
            out.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", False))
        # The LDM decoder numbers its levels from the bottom, diffusers from the top.
        level = s.levels - 1 - i
        for j in range(s.layers_per_block + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i < s.levels - 1:
            out.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", False))
    return tuple(out)


def _convert(sd: dict, table: dict, reshape, source: str) -> dict:
    out = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        entry = table.get(module)
        if entry is None or param not in ("weight", "bias"):
            raise UserError(f"VAE key {key!r} is not part of a known {source} VAE layout")
        target, needs_reshape = entry
        if needs_reshape and param == "weight":
            tensor = reshape(tensor)
        out[f"{target}.{param}"] = tensor
    return out


def _conv_to_linear(t):
    return t[:, :, 0, 0] if t.ndim == 4 else t


def _linear_to_conv(t):
    return t[:, :, None, None] if t.ndim == 2 else t


def ldm_to_diffusers(sd: dict) -> dict:
    """Rename an LDM VAE state dict (no `first_stage_model.` prefix) to diffusers AutoencoderKL names."""
    table = {ldm: (diff, r) for ldm, diff, r in _pairs(_ldm_structure(sd))}
    return _convert(sd, table, _conv_to_linear, "LDM")


def diffusers_to_ldm(sd: dict) -> dict:
    """Rename a diffusers VAE state dict to LDM names; also reads diffusers < 0.17 attention names."""
    s = _diffusers_structure(sd)
    table = {diff: (ldm, r) for ldm, diff, r in _pairs(s, old_attention_names=True)}
    table.update({diff: (ldm, r) for ldm, diff, r in _pairs(s)})
    return _convert(sd, table, _linear_to_conv, "diffusers")


def _build_config(family, *, channels: list, layers: int, latent_channels: int, in_channels: int,
                  out_channels: int, mid_attention: bool, quant_conv: bool, post_quant_conv: bool) -> dict:
    config = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=list(channels),
        layers_per_block=layers,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=family.sample_size * 8,
        scaling_factor=family.latent_scale,
        # True is also what diffusers assumes for the SD1/SD2 hub configs, which omit the field.
        force_upcast=True,
    )
    if not mid_attention:
        config["mid_block_add_attention"] = False
    if not quant_conv:
        config["use_quant_conv"] = False
    if not post_quant_conv:
        config["use_post_quant_conv"] = False
    return config


def vae_config(family, size: str) -> dict:
    """Diffusers AutoencoderKL kwargs of the family at size "full" or "tiny"."""
    if size not in ("full", "tiny"):
        raise UserError(f"unknown model size {size!r}; expected 'full' or 'tiny'")
    spec = family.vae_full if size == "full" else family.vae_tiny
    return _build_config(
        family,
        channels=list(spec["block_out_channels"]),
        layers=spec.get("layers_per_block", 2),
        latent_channels=spec.get("latent_channels", 4),
        in_channels=3,
        out_channels=3,
        mid_attention=True,
        quant_conv=True,
        post_quant_conv=True,
    )


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise _layout_error(f"missing {key!r}")
    return tuple(sd[key].shape)


def infer_vae_config(sd_diffusers: dict, family) -> dict:
    """Diffusers AutoencoderKL kwargs inferred from the shapes of a diffusers-named VAE state dict."""
    s = _diffusers_structure(sd_diffusers)
    diffusers_to_ldm(sd_diffusers)  # rejects keys outside the understood layout
    channels = [_shape(sd_diffusers, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(s.levels)]
    return _build_config(
        family,
        channels=channels,
        layers=s.layers_per_block,
        latent_channels=_shape(sd_diffusers, "decoder.conv_in.weight")[1],
        in_channels=_shape(sd_diffusers, "encoder.conv_in.weight")[1],
        out_channels=_shape(sd_diffusers, "decoder.conv_out.weight")[0],
        mid_attention=s.mid_attention,
        quant_conv="quant_conv.weight" in sd_diffusers,
        post_quant_conv="post_quant_conv.weight" in sd_diffusers,
    )
