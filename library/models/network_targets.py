"""Which layer weight a LoRA/LyCORIS module name addresses, in a single-file checkpoint or in loaded models.

Network files name a layer `<prefix>_<module path>` with the path's dots turned into underscores
(shared spec lora-format.md §1): `lora_te_` / `lora_te1_` / `lora_te2_` + the classic HF CLIP path
(`text_model.encoder.layers.0.self_attn.q_proj`), `lora_unet_` + the U-Net path, which is the
diffusers path for SD1/SD2 files and the SGM path (`input_blocks.4.1...`) for SDXL files. Both U-Net
spellings are accepted for every family (diffusers-named SDXL files exist), since the two
vocabularies never collide. Every Linear and Conv2d weight gets a name, not only the ones
sd-scripts' LoRA wraps: LyCORIS presets also adapt `conv_in`, the time embedding and so on.

In a single file the weights sit under the original layouts' keys; for OpenCLIP text towers (SD2,
SDXL's second encoder) q, k and v are thirds of one packed `in_proj_weight`, so a target can be a
row range of a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from library.models import clip_convert, detect, unet_convert
from library.models.families import ModelFamily, get_family

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"


def text_encoder_prefixes(count: int, is_sdxl: bool) -> List[str]:
    """`lora_te` for the one encoder of SD1/SD2, `lora_te1`, `lora_te2` for SDXL's two."""
    if count == 1 and not is_sdxl:
        return [PREFIX_TE]
    return [f"{PREFIX_TE}{i + 1}" for i in range(count)]


def lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


@dataclass(frozen=True)
class FileTarget:
    """A layer weight inside a checkpoint file: `key`, or its q/k/v third `part` (0/1/2) of a packed
    OpenCLIP attention tensor; `shape` is the addressed weight's (the third's) shape."""

    key: str
    shape: Tuple[int, ...]
    part: Optional[int] = None
    bias_key: Optional[str] = None

    def rows(self, packed_rows: int) -> slice:
        third = packed_rows // 3
        return slice(self.part * third, (self.part + 1) * third)


def _is_layer_weight(key: str, shape: Sequence[int]) -> bool:
    return key.endswith("weight") and len(shape) in (2, 4)


def _module(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _unet_file_targets(shapes: Dict[str, tuple], out: Dict[str, FileTarget]) -> None:
    prefix = detect.UNET_PREFIX
    ldm = {k[len(prefix):]: k for k in shapes if k.startswith(prefix)}
    to_diffusers = unet_convert.ldm_to_diffusers(ldm)  # diffusers key -> file key
    for diffusers_key, key in to_diffusers.items():
        if not _is_layer_weight(key, shapes[key]):
            continue
        module = _module(diffusers_key)
        bias = key[: -len("weight")] + "bias"
        target = FileTarget(key, tuple(shapes[key]), None, bias if bias in shapes else None)
        out[lora_name(PREFIX_UNET, module)] = target
        out[lora_name(PREFIX_UNET, _module(key[len(prefix):]))] = target  # the SGM/LDM spelling


def _te_file_targets(shapes: Dict[str, tuple], spec, prefix: str, out: Dict[str, FileTarget]) -> None:
    section = {k[len(spec.single_file_prefix):]: k for k in shapes if k.startswith(spec.single_file_prefix)}
    if spec.kind == "openclip":
        sources = clip_convert.openclip_classic_sources(section)  # classic -> (openclip key, part)
    else:
        sources = {classic: (key, None) for classic, key in clip_convert.normalize_clip_keys({k: k for k in section}).items()}
    for classic, (key, part) in sources.items():
        file_key = section[key]
        shape = tuple(shapes[file_key])
        if part is not None:
            shape = (shape[0] // 3, *shape[1:])
        if not (classic.endswith(".weight") and len(shape) in (2, 4)):
            continue
        bias = sources.get(classic[: -len("weight")] + "bias")
        bias_key = section[bias[0]] if bias else None
        out[lora_name(prefix, _module(classic))] = FileTarget(file_key, shape, part, bias_key)


def checkpoint_family(path: str, keys) -> ModelFamily:
    """The family of a single-file checkpoint from its keys (a UserError saying what else it is)."""
    return get_family(detect.detect_single_file(path, keys))


def checkpoint_targets(path: str, shapes: Dict[str, tuple]) -> Tuple[ModelFamily, Dict[str, FileTarget]]:
    """(family, {module name: FileTarget}) for a single-file checkpoint given its key -> shape map."""
    family = checkpoint_family(path, shapes)
    out: Dict[str, FileTarget] = {}
    _unet_file_targets(shapes, out)
    prefixes = text_encoder_prefixes(len(family.text_encoders), family.is_sdxl)
    for spec, prefix in zip(family.text_encoders, prefixes):
        _te_file_targets(shapes, spec, prefix, out)
    return family, out


# ----------------------------------------------------------------------------------------------
# loaded models


def _is_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def model_targets(text_encoders: Sequence[torch.nn.Module], unet: Optional[torch.nn.Module]
                  ) -> Dict[str, torch.nn.Module]:
    """{module name: the Linear/Conv2d it addresses} for a diffusers U-Net and transformers CLIP
    text encoders (any transformers version: the names use the classic `text_model.` path)."""
    out: Dict[str, torch.nn.Module] = {}
    config = dict(getattr(unet, "config", None) or {})
    is_sdxl = config.get("addition_embed_type") == "text_time"
    if unet is not None:
        pairs = unet_convert.module_prefix_pairs(config)
        for path, module in unet.named_modules():
            if path and _is_layer(module):
                out[lora_name(PREFIX_UNET, path)] = module
                ldm = unet_convert.diffusers_module_to_ldm(path, pairs)
                out[lora_name(PREFIX_UNET, ldm)] = module
    encoders = [te for te in text_encoders if te is not None]
    for encoder, prefix in zip(encoders, text_encoder_prefixes(len(encoders), is_sdxl)):
        paths = {f"{path}.weight": module for path, module in encoder.named_modules() if path and _is_layer(module)}
        for classic, module in clip_convert.model_to_classic_keys(paths, encoder).items():
            out[lora_name(prefix, _module(classic))] = module
    return out
