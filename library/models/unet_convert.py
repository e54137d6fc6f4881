"""U-Net naming and configs: original LDM/SGM single-file layout <-> diffusers UNet2DConditionModel.

SD1, SD2 and SDXL U-Nets differ only in data (number of levels, which levels have attention,
transformer depth, widths), so one converter serves all three. The block structure is read from
the key names themselves; conversion is a pure renaming of state-dict keys (the tensors are the
same objects). The same (LDM module, diffusers module) prefix pairs also rename LoRA module names.

Configs are diffusers `UNet2DConditionModel` kwargs, either from the family's reference data
(`unet_config`) or inferred from the tensor shapes of a diffusers-named state dict
(`infer_unet_config`); both go through one builder so that they agree field by field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from library.errors import UserError

# LDM ResBlock child -> diffusers ResnetBlock2D child.
_RESNET_CHILDREN = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)

# Inside a spatial transformer both layouts use the same names.
_ATTENTION_REST = re.compile(
    r"(?:norm|proj_in|proj_out)\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
    r"\.(?:weight|bias)"
)
_PARAM_REST = re.compile(r"weight|bias")

_LEAF, _ATTENTION, _GROUP = "leaf", "attention", "group"


@dataclass(frozen=True)
class UNetStructure:
    """The block layout of a U-Net, enough to map every module name between the two layouts.

    down_attention[i]: down level i has transformers; up_attention[i]: up level i (diffusers order,
    deepest first) has transformers; add_embedding: SDXL-style `label_emb` / `add_embedding`.
    """

    levels: int
    layers_per_block: int
    down_attention: tuple
    up_attention: tuple
    add_embedding: bool


# ----------------------------------------------------------------------------------------------
# structure


def _layout_error(what: str) -> UserError:
    return UserError(f"U-Net state dict: {what}; expected an SD1/SD2/SDXL-style U-Net")


def structure_from_ldm(sd) -> UNetStructure:
    """Read the block layout from LDM/SGM key names (without `model.diffusion_model.`)."""
    inputs: dict[int, set] = {}
    outputs: dict[int, set] = {}
    downsample_blocks = set()
    for key in sd:
        m = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)\.", key)
        if not m:
            continue
        block, sub = int(m.group(2)), int(m.group(3))
        (inputs if m.group(1) == "input" else outputs).setdefault(block, set()).add(sub)
        if m.group(1) == "input" and key.startswith(f"input_blocks.{block}.0.op."):
            downsample_blocks.add(block)
    if not inputs or not outputs:
        raise _layout_error("no input_blocks/output_blocks keys")
    if downsample_blocks:
        # Level 0 holds `layers` resnets after conv_in, then its downsampler.
        layers = min(downsample_blocks) - 1
        levels = len(downsample_blocks) + 1
    else:
        layers = max(inputs)
        levels = 1
    step = layers + 1
    if layers < 1 or max(inputs) != levels * step - 1 or max(outputs) != levels * step - 1:
        raise _layout_error(
            f"cannot understand the block numbering ({len(inputs)} input / {len(outputs)} output blocks)")
    down_attention = tuple(1 in inputs.get(1 + i * step, set()) for i in range(levels))
    up_attention = tuple(1 in outputs.get(i * step, set()) for i in range(levels))
    add_embedding = any(k.startswith("label_emb.") for k in sd)
    return UNetStructure(levels, layers, down_attention, up_attention, add_embedding)


def structure_from_diffusers(sd) -> UNetStructure:
    """Read the block layout from diffusers key names."""
    down: dict[int, dict[str, set]] = {}
    up: dict[int, dict[str, set]] = {}
    for key in sd:
        m = re.match(r"(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.", key)
        if m:
            side = down if m.group(1) == "down" else up
            side.setdefault(int(m.group(2)), {}).setdefault(m.group(3), set()).add(int(m.group(4)))
    if not down or not up:
        raise _layout_error("no down_blocks/up_blocks keys")
    levels = max(down) + 1
    layers = len(down.get(0, {}).get("resnets", ()))
    if layers < 1 or max(up) + 1 != levels:
        raise _layout_error(f"cannot understand the block numbering ({len(down)} down / {len(up)} up blocks)")
    down_attention = tuple("attentions" in down.get(i, {}) for i in range(levels))
    up_attention = tuple("attentions" in up.get(i, {}) for i in range(levels))
    add_embedding = any(k.startswith("add_embedding.") for k in sd)
    return UNetStructure(levels, layers, down_attention, up_attention, add_embedding)


def structure_from_config(config: dict) -> UNetStructure:
    """Block layout of a diffusers UNet2DConditionModel config dict."""
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise UserError("U-Net config: per-block layers_per_block lists are not supported")
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    return UNetStructure(
        levels=len(down_types),
        layers_per_block=layers,
        down_attention=tuple("CrossAttn" in t for t in down_types),
        up_attention=tuple("CrossAttn" in t for t in up_types),
        add_embedding=config.get("addition_embed_type") == "text_time",
    )


# ----------------------------------------------------------------------------------------------
# name pairs


@lru_cache(maxsize=16)
def _pairs(structure: UNetStructure) -> tuple:
    """(ldm_prefix, diffusers_prefix, kind) for every module that has a counterpart."""
    s = structure
    step = s.layers_per_block + 1
    out = [
        ("time_embed", "time_embedding", _GROUP),
        ("time_embed.0", "time_embedding.linear_1", _LEAF),
        ("time_embed.2", "time_embedding.linear_2", _LEAF),
        ("input_blocks.0.0", "conv_in", _LEAF),
        ("out.0", "conv_norm_out", _LEAF),
        ("out.2", "conv_out", _LEAF),
        ("middle_block", "mid_block", _GROUP),
    ]
    if s.add_embedding:
        out += [
            ("label_emb.0", "add_embedding", _GROUP),
            ("label_emb.0.0", "add_embedding.linear_1", _LEAF),
            ("label_emb.0.2", "add_embedding.linear_2", _LEAF),
        ]

    def resnet(ldm: str, diff: str):
        out.append((ldm, diff, _GROUP))
        out.extend((f"{ldm}.{a}", f"{diff}.{b}", _LEAF) for a, b in _RESNET_CHILDREN)

    for i in range(s.levels):
        for j in range(s.layers_per_block):
            block = 1 + i * step + j
            resnet(f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}")
            if s.down_attention[i]:
                out.append((f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}", _ATTENTION))
        if i < s.levels - 1:
            block = (i + 1) * step
            out.append((f"input_blocks.{block}.0", f"down_blocks.{i}.downsamplers.0", _GROUP))
            out.append((f"input_blocks.{block}.0.op", f"down_blocks.{i}.downsamplers.0.conv", _LEAF))

    resnet("middle_block.0", "mid_block.resnets.0")
    out.append(("middle_block.1", "mid_block.attentions.0", _ATTENTION))
    resnet("middle_block.2", "mid_block.resnets.1")

    for i in range(s.levels):
        for j in range(step):
            block = i * step + j
            resnet(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}")
            if s.up_attention[i]:
                out.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", _ATTENTION))
        if i < s.levels - 1:
            # The upsampler is the last module of the level's last output block.
            sub = 2 if s.up_attention[i] else 1
            ldm = f"output_blocks.{i * step + s.layers_per_block}.{sub}"
            out.append((ldm, f"up_blocks.{i}.upsamplers.0", _GROUP))
            out.append((f"{ldm}.conv", f"up_blocks.{i}.upsamplers.0.conv", _LEAF))
    return tuple(out)


@lru_cache(maxsize=16)
def _key_tables(structure: UNetStructure) -> tuple[dict, dict]:
    """Prefix lookup tables for state-dict keys: ldm -> (diffusers, kind) and the reverse."""
    to_diffusers, to_ldm = {}, {}
    for ldm, diff, kind in _pairs(structure):
        if kind != _GROUP:
            to_diffusers[ldm] = (diff, kind)
            to_ldm[diff] = (ldm, kind)
    return to_diffusers, to_ldm


def module_prefix_pairs(diffusers_config_or_structure) -> list[tuple[str, str]]:
    """(ldm_module_prefix, diffusers_module_prefix) pairs for a config dict or a UNetStructure."""
    s = diffusers_config_or_structure
    if isinstance(s, dict):
        s = structure_from_config(s)
    return [(ldm, diff) for ldm, diff, _ in _pairs(s)]


def _rename_module(name: str, table: dict, sep: str, direction: str) -> str:
    parts = name.split(sep)
    for n in range(len(parts), 0, -1):
        target = table.get(sep.join(parts[:n]))
        if target is not None:
            return sep.join([target, *parts[n:]])
    raise UserError(f"U-Net module {name!r} has no {direction} counterpart")


def ldm_module_to_diffusers(name: str, pairs, sep: str = ".") -> str:
    """Rename an LDM/SGM module name (e.g. `input_blocks.4.1.proj_in`) to diffusers.

    With sep="_" it works on LoRA-style names (`input_blocks_4_1_proj_in`).
    """
    table = {ldm.replace(".", sep): diff.replace(".", sep) for ldm, diff in pairs}
    return _rename_module(name, table, sep, "diffusers")


def diffusers_module_to_ldm(name: str, pairs, sep: str = ".") -> str:
    """Rename a diffusers module name (e.g. `down_blocks.1.attentions.0.proj_in`) to LDM/SGM."""
    table = {diff.replace(".", sep): ldm.replace(".", sep) for ldm, diff in pairs}
    return _rename_module(name, table, sep, "LDM")


# ----------------------------------------------------------------------------------------------
# state dicts


def _rename_key(key: str, table: dict, direction: str) -> str:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        entry = table.get(".".join(parts[:n]))
        if entry is None:
            continue
        target, kind = entry
        rest = ".".join(parts[n:])
        pattern = _ATTENTION_REST if kind == _ATTENTION else _PARAM_REST
        if pattern.fullmatch(rest):
            return f"{target}.{rest}"
        break
    raise UserError(f"U-Net key {key!r} is not part of a known {direction} U-Net layout")


def ldm_to_diffusers(sd: dict) -> dict:
    """Rename an LDM/SGM U-Net state dict (no `model.diffusion_model.` prefix) to diffusers names."""
    to_diffusers, _ = _key_tables(structure_from_ldm(sd))
    return {_rename_key(k, to_diffusers, "LDM/SGM"): v for k, v in sd.items()}


def diffusers_to_ldm(sd: dict) -> dict:
    """Rename a diffusers U-Net state dict to LDM/SGM names (exact inverse of ldm_to_diffusers)."""
    _, to_ldm = _key_tables(structure_from_diffusers(sd))
    return {_rename_key(k, to_ldm, "diffusers"): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# configs


def _build_config(
    family,
    *,
    channels: list,
    layers: int,
    down_attention: list,
    up_attention: list,
    transformer_layers: list,
    cross_attention_dim: int,
    use_linear_projection: bool,
    in_channels: int,
    out_channels: int,
    projection_input_dim,
    time_embedding_dim,
    spec: dict,
) -> dict:
    """The single place that turns layout facts into UNet2DConditionModel kwargs."""
    if family.unet_num_heads is not None:
        heads = family.unet_num_heads  # SD1 style: one head count everywhere (int, like the real config)
    else:
        heads = [family.unet_heads(c) for c in channels]
    config = dict(
        sample_size=family.sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        block_out_channels=list(channels),
        layers_per_block=layers,
        downsample_padding=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=cross_attention_dim,
        transformer_layers_per_block=1 if all(n == 1 for n in transformer_layers) else list(transformer_layers),
        attention_head_dim=heads,
        use_linear_projection=use_linear_projection,
        # SD2 was trained with fp32 attention softmax; the data has no field for it, v2 implies it.
        upcast_attention=bool(spec.get("upcast_attention", family.v2)),
    )
    if time_embedding_dim is not None:
        config["time_embedding_dim"] = time_embedding_dim
    if projection_input_dim is not None:
        config["addition_embed_type"] = spec.get("addition_embed_type", "text_time")
        config["addition_time_embed_dim"] = spec.get("addition_time_embed_dim", 256)
        config["projection_class_embeddings_input_dim"] = projection_input_dim
    return config


def unet_config(family, size: str) -> dict:
    """Diffusers UNet2DConditionModel kwargs of the family at size "full" or "tiny"."""
    if size not in ("full", "tiny"):
        raise UserError(f"unknown model size {size!r}; expected 'full' or 'tiny'")
    spec = family.unet_full if size == "full" else family.unet_tiny
    attention = list(spec["attention_levels"])
    in_channels = spec.get("in_channels", 4)
    return _build_config(
        family,
        channels=list(spec["block_out_channels"]),
        layers=spec.get("layers_per_block", 2),
        down_attention=attention,
        up_attention=attention[::-1],
        transformer_layers=list(spec["transformer_layers"]),
        cross_attention_dim=spec["cross_attention_dim"],
        use_linear_projection=spec.get("use_linear_projection", False),
        in_channels=in_channels,
        out_channels=spec.get("out_channels", 4),
        projection_input_dim=spec.get("projection_class_embeddings_input_dim"),
        time_embedding_dim=spec.get("time_embedding_dim"),
        spec=spec,
    )


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise _layout_error(f"missing {key!r}")
    return tuple(sd[key].shape)


def _transformer_depth(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if not found or len(found) != max(found) + 1:
        raise _layout_error(f"cannot count the transformer blocks of {prefix!r}")
    return len(found)


def infer_unet_config(sd_diffusers: dict, family) -> dict:
    """Diffusers UNet2DConditionModel kwargs inferred from the shapes of a diffusers-named state dict."""
    s = structure_from_diffusers(sd_diffusers)
    diffusers_to_ldm(sd_diffusers)  # rejects keys outside the understood layout
    n = s.levels
    channels = [_shape(sd_diffusers, f"down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(n)]
    depth = [
        _transformer_depth(sd_diffusers, f"down_blocks.{i}.attentions.0") if s.down_attention[i] else 1
        for i in range(n)
    ]
    # diffusers gives up level i the depth of down level n-1-i and the mid block the deepest level's.
    for i in range(n):
        if s.up_attention[i] and _transformer_depth(sd_diffusers, f"up_blocks.{i}.attentions.0") != depth[n - 1 - i]:
            raise _layout_error(f"up_blocks.{i} transformer depth differs from down_blocks.{n - 1 - i}")
    if _transformer_depth(sd_diffusers, "mid_block.attentions.0") != depth[-1]:
        raise _layout_error("mid_block transformer depth differs from the deepest down block")
    attention_levels = [i for i in range(n) if s.down_attention[i]]
    first = f"down_blocks.{attention_levels[0]}.attentions.0" if attention_levels else "mid_block.attentions.0"
    cross_dim = _shape(sd_diffusers, f"{first}.transformer_blocks.0.attn2.to_k.weight")[1]
    proj_ndim = len(_shape(sd_diffusers, f"{first}.proj_in.weight"))
    time_dim = _shape(sd_diffusers, "time_embedding.linear_1.weight")[0]
    projection_input_dim = None
    if s.add_embedding:
        projection_input_dim = _shape(sd_diffusers, "add_embedding.linear_1.weight")[1]
    return _build_config(
        family,
        channels=channels,
        layers=s.layers_per_block,
        down_attention=list(s.down_attention),
        up_attention=list(s.up_attention),
        transformer_layers=depth,
        cross_attention_dim=cross_dim,
        use_linear_projection=proj_ndim == 2,
        in_channels=_shape(sd_diffusers, "conv_in.weight")[1],
        out_channels=_shape(sd_diffusers, "conv_out.weight")[0],
        projection_input_dim=projection_input_dim,
        time_embedding_dim=None if time_dim == 4 * channels[0] else time_dim,
        spec=family.unet_full,
    )
