"""Which modules of a model get LoRA adapters, what they are called in files, and their U-Net block.

Names follow sd-scripts exactly (see shared spec lora-format.md §1): `<prefix>_<module path>` with
dots turned into underscores, where the path is the *classic* one every LoRA file uses:
* text encoders: `text_model.encoder.layers.N...` - transformers 5 flattened `CLIPTextModel`
  (no `text_model.` level), so it is put back; `CLIPTextModelWithProjection` still has it.
* SD1/SD2 U-Net: diffusers module paths as they are.
* SDXL U-Net: SGM paths (`input_blocks.4.1...`), renamed from our diffusers U-Net through
  `library.models.unet_convert`'s module prefix pairs.
Block indices (§4) are derived from these names, as sd-scripts does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from library.models import unet_convert
from library.models.network_targets import PREFIX_TE, PREFIX_UNET, text_encoder_prefixes  # noqa: F401

PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"

TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# Older diffusers wrapped these layers in LoRA-compatible subclasses; they behave like the base ones.
LINEAR_CLASSES = ("Linear", "LoRACompatibleLinear")
CONV_CLASSES = ("Conv2d", "LoRACompatibleConv")

NUM_BLOCKS_SD = 25  # conv_in(0), 11 down, mid(12), 12 up
NUM_BLOCKS_SDXL = 23  # time/label embeddings(0), 9 input, 3 middle, 9 output, out(22)

_TE_ROOT = "text_model."


@dataclass
class Target:
    """One Linear/Conv2d to wrap. `in_conv_block`: found inside a ResNet/Down/Upsample block."""

    lora_name: str
    module: torch.nn.Module
    is_text_encoder: bool
    in_conv_block: bool

    @property
    def is_conv(self) -> bool:
        return type(self.module).__name__ in CONV_CLASSES

    @property
    def is_kxk_conv(self) -> bool:
        """A conv that is not 1x1: these use conv_dim/conv_alpha."""
        return self.is_conv and tuple(self.module.kernel_size) != (1, 1)


def is_sdxl_unet(unet) -> bool:
    """SDXL is recognised by its config (added text/time embedding), not by the class."""
    config = getattr(unet, "config", None) or {}
    return config.get("addition_embed_type") == "text_time"


def classic_te_path(path: str) -> str:
    return path if path.startswith(_TE_ROOT) else _TE_ROOT + path


def unet_renamer(unet) -> Callable[[str], str]:
    """diffusers module path -> the path LoRA files use (SGM for SDXL, unchanged otherwise)."""
    if not is_sdxl_unet(unet):
        return lambda path: path
    table = {diff: ldm for ldm, diff in unet_convert.module_prefix_pairs(dict(unet.config))}

    def rename(path: str) -> str:
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            target = table.get(".".join(parts[:n]))
            if target is not None:
                return ".".join([target, *parts[n:]])
        return path

    return rename


def _wrappable(module: torch.nn.Module) -> bool:
    return type(module).__name__ in LINEAR_CLASSES + CONV_CLASSES


def find_targets(root: torch.nn.Module, prefix: str, target_classes: Sequence[str],
                 rename: Callable[[str], str], is_text_encoder: bool) -> Iterator[Target]:
    """Every Linear/Conv2d child of a module whose class name is in `target_classes`."""
    conv_block_classes = set(UNET_CONV_TARGETS)
    for name, module in root.named_modules():
        cls = type(module).__name__
        if cls not in target_classes:
            continue
        for child_name, child in module.named_modules():
            if not child_name or not _wrappable(child):
                continue
            path = f"{name}.{child_name}" if name else child_name
            lora_name = f"{prefix}_{rename(path).replace('.', '_')}"
            yield Target(lora_name, child, is_text_encoder, cls in conv_block_classes)


def text_encoder_targets(text_encoders: Sequence[torch.nn.Module], is_sdxl: bool) -> List[List[Target]]:
    """Targets per text encoder, in the order given."""
    prefixes = text_encoder_prefixes(len(text_encoders), is_sdxl)
    return [list(find_targets(te, prefix, TE_TARGETS, classic_te_path, True))
            for te, prefix in zip(text_encoders, prefixes)]


def unet_targets(unet: torch.nn.Module, include_conv_blocks: bool) -> List[Target]:
    classes = UNET_TARGETS + (UNET_CONV_TARGETS if include_conv_blocks else ())
    return list(find_targets(unet, PREFIX_UNET, classes, unet_renamer(unet), False))


# ----------------------------------------------------------------------------------------------
# loading files with other U-Net naming

_DIFFUSERS_UNET = re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_")


def sdxl_diffusers_to_sgm(weights_sd: dict, unet) -> dict:
    """Rename the U-Net keys of an SDXL LoRA written with diffusers block names to SGM names."""
    if not any(_DIFFUSERS_UNET.match(k) for k in weights_sd):
        return weights_sd
    pairs = unet_convert.module_prefix_pairs(dict(unet.config))
    out = {}
    for key, value in weights_sd.items():
        if _DIFFUSERS_UNET.match(key):
            module, dot, rest = key.partition(".")
            body = module[len(PREFIX_UNET) + 1:]
            key = f"{PREFIX_UNET}_{unet_convert.diffusers_module_to_ldm(body, pairs, sep='_')}{dot}{rest}"
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# block indices

_UPDOWN = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")


def block_index(lora_name: str, is_sdxl: bool) -> int:
    """Index of the U-Net block a module belongs to (SD 0..24, SDXL 0..22); -1 if none."""
    if not lora_name.startswith(PREFIX_UNET + "_"):
        return -1
    if is_sdxl:
        name = lora_name[len(PREFIX_UNET) + 1:]
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        for start, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(start):
                return base + int(name[len(start):].split("_")[0])
        return NUM_BLOCKS_SDXL - 1 if name.startswith("out_") else -1
    m = _UPDOWN.search(lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("downsamplers", "upsamplers") else j)
        return 1 + idx if side == "down" else 13 + idx
    if lora_name.startswith(PREFIX_UNET + "_mid_block_"):
        return 12
    return -1


def num_blocks(is_sdxl: bool) -> int:
    return NUM_BLOCKS_SDXL if is_sdxl else NUM_BLOCKS_SD


def te_index(lora_name: str) -> Optional[int]:
    """0 for `lora_te`/`lora_te1`, 1 for `lora_te2`, None for U-Net names."""
    if lora_name.startswith(PREFIX_TE2 + "_"):
        return 1
    if lora_name.startswith((PREFIX_TE1 + "_", PREFIX_TE + "_")):
        return 0
    return None
