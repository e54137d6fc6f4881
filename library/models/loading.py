"""Loading SD1.x / SD2.x / SDXL models from a single-file checkpoint or a diffusers folder.

Whatever the source, the result is a `StableDiffusionModels` bundle of diffusers/transformers models:
`UNet2DConditionModel`, `AutoencoderKL` and one or two CLIP text encoders. Configs are inferred from
tensor shapes, so tiny test models and real ones take the same path. Models are created on the meta
device and the checkpoint's tensors are assigned into them, each read once in the requested dtype:
no random init, no fp32 copy that is thrown away.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from library.models import checkpoint_io, clip_convert, detect, modelspec, safetensors_io, unet_convert, vae_convert
from library.errors import UserError
from library.models.families import ModelFamily, get_family

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."


@dataclass
class StableDiffusionModels:
    family: ModelFamily
    unet: torch.nn.Module
    vae: Optional[torch.nn.Module]
    text_encoders: List[torch.nn.Module]
    v_parameterization: bool = False
    # Original-layout tensors with no place in the diffusers models (schedule buffers, OpenCLIP's
    # logit_scale, SD2's unused last block...), kept under their original keys for bit-exact re-saves.
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    source: Optional[str] = None
    source_kind: str = "random"  # "single_file" | "diffusers" | "random"
    metadata: Dict[str, str] = field(default_factory=dict)
    pickle_extra: Dict[str, object] = field(default_factory=dict)  # epoch / global_step of a .ckpt source


def resolve_family(
    detected: str, path: str, v2: Optional[bool] = None, sdxl: Optional[bool] = None
) -> ModelFamily:
    """Check user flags against what the file holds; the file decides, contradictions are errors."""
    family = get_family(detected)
    if sdxl is True and not family.is_sdxl:
        raise UserError(f"{path}: is a {family.title} model, but this script needs SDXL base; use the non-SDXL script")
    if sdxl is False and family.is_sdxl:
        raise UserError(f"{path}: is an SDXL model; use the sdxl_* script for it")
    if v2 is True and family.name != "sd2":
        raise UserError(f"{path}: --v2 was given but the file is a {family.title} model; remove --v2")
    if v2 is False and family.name == "sd2" and sdxl is None:
        logger.info("%s: SD2.x model detected from its keys (no --v2 needed)", path)
    return family


def _resolve_v_param(flag: Optional[bool], family: ModelFamily, hint: Optional[bool], path: str) -> bool:
    if flag is not None:
        return flag
    if hint is not None:
        return hint
    if family.name == "sd2":
        logger.info("%s: SD2.x model without --v_parameterization: treated as 512 epsilon-prediction", path)
    return False


# ---------------------------------------------------------------------------------------------
# building models from state dicts


def _import_model_classes() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401


def build_unet(sd: Dict[str, torch.Tensor], family: ModelFamily, config: Optional[dict] = None):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = config or unet_convert.infer_unet_config(sd, family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    _assign(unet, sd, "U-Net")
    return unet


def build_vae(sd: Dict[str, torch.Tensor], family: ModelFamily, config: Optional[dict] = None):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    config = config or vae_convert.infer_vae_config(sd, family)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    _assign(vae, sd, "VAE")
    return vae


def build_text_encoder(classic_sd: Dict[str, torch.Tensor], spec, config=None):
    config = config or clip_convert.infer_clip_config(classic_sd, spec)
    model = clip_convert.build_text_encoder(config, spec, device="meta")
    clip_convert.load_into_model(model, classic_sd)
    return model


def _assign(model: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{what} weights do not match the inferred architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(sd, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------
# single-file checkpoints


def _split_prefix(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def _part_dtype(part: str, dtype: Optional[torch.dtype], part_dtypes: Optional[Dict[str, torch.dtype]]):
    """The dtype one part ("unet", "vae", "text_encoder", "text_encoder_2") is read in."""
    return (part_dtypes or {}).get(part, dtype)


def load_single_file(
    path: str,
    v2: Optional[bool] = None,
    v_parameterization: Optional[bool] = None,
    sdxl: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
    keep_ema: bool = False,
    part_dtypes: Optional[Dict[str, torch.dtype]] = None,
    zero_copy: Optional[bool] = None,
) -> StableDiffusionModels:
    keys = list(checkpoint_io.read_keys(path))
    family = resolve_family(detect.detect_single_file(path, keys), path, v2, sdxl)
    select = None if keep_ema else (lambda k: not k.startswith(EMA_PREFIX))
    prefixes = [(detect.UNET_PREFIX, "unet"), (detect.VAE_PREFIX, "vae")]
    prefixes += [(s.single_file_prefix, s.diffusers_subfolder) for s in family.text_encoders]
    dtypes = {prefix: _part_dtype(part, dtype, part_dtypes) for prefix, part in prefixes}

    def dtype_for(key: str):
        # schedule buffers, EMA and other extras keep the file's dtype, so a re-save is exact
        return next((d for prefix, d in dtypes.items() if key.startswith(prefix)), None)

    wants_cast = any(d is not None for d in dtypes.values())
    # the file is read (and converted: torch ops, the GIL released) while this thread imports the
    # model classes, which on a first load takes seconds of pure Python
    with ThreadPoolExecutor(1, thread_name_prefix="read-checkpoint") as pool:
        reading = pool.submit(checkpoint_io.read_checkpoint, path, dtype=dtype_for if wants_cast else None,
                              select=select, zero_copy=zero_copy)
        _import_model_classes()
        ckpt = reading.result()
    tensors = ckpt.tensors

    unet = build_unet(unet_convert.ldm_to_diffusers(_split_prefix(tensors, detect.UNET_PREFIX)), family)
    vae_sd = _split_prefix(tensors, detect.VAE_PREFIX)
    vae = build_vae(vae_convert.ldm_to_diffusers(vae_sd), family) if vae_sd else None
    text_encoders = []
    for spec in family.text_encoders:
        section = _split_prefix(tensors, spec.single_file_prefix)
        if not section:
            raise UserError(f"{path}: no text encoder weights under {spec.single_file_prefix}*; the checkpoint is incomplete")
        if spec.kind == "openclip":
            classic, te_extras = clip_convert.openclip_to_classic(section, spec)
            tensors.update({spec.single_file_prefix + k: v for k, v in te_extras.items()})
        else:
            classic = clip_convert.normalize_clip_keys(section)
        text_encoders.append(build_text_encoder(classic, spec))
    hint = modelspec.prediction_is_v(ckpt.metadata)
    return StableDiffusionModels(
        family=family, unet=unet, vae=vae, text_encoders=text_encoders,
        v_parameterization=_resolve_v_param(v_parameterization, family, hint, path),
        extras=tensors, source=path, source_kind="single_file", metadata=ckpt.metadata, pickle_extra=ckpt.extra,
    )


# ---------------------------------------------------------------------------------------------
# diffusers folders

_WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model", ),
    "transformers": ("model", "pytorch_model"),
}


def _find_weights(folder: str, stems: tuple, variant: Optional[str]) -> List[str]:
    """The weight file(s) of one component folder: safetensors first, then .bin; sharded via index."""
    suffixes = [f".{variant}" if variant else "", ""] if variant else [""]
    for stem in stems:
        for sfx in suffixes:
            for ext in (".safetensors", ".bin"):
                single = os.path.join(folder, stem + sfx + ext)
                if os.path.isfile(single):
                    return [single]
                index = single + ".index.json"
                if os.path.isfile(index):
                    with open(index, encoding="utf-8") as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                    return [os.path.join(folder, s) for s in shards]
    raise UserError(f"{folder}: no weights file ({stems[0]}.safetensors or .bin); the diffusers folder is incomplete")


def _read_component(folder: str, kind: str, dtype, variant: Optional[str],
                    zero_copy: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    out = {}
    for file in _find_weights(folder, _WEIGHT_NAMES[kind], variant):
        out.update(checkpoint_io.read_checkpoint(file, dtype=dtype, zero_copy=zero_copy).tensors)
    return out


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the diffusers folder is incomplete") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _clip_config_from_file(path: str):
    from transformers import CLIPTextConfig

    data = _read_config(path)
    data.pop("architectures", None)
    config = CLIPTextConfig.from_dict(data)
    # released SD2 folders say eos_token_id 2, which makes HF pool at argmax(ids) - wrong once
    # textual-inversion tokens (ids above EOS) are in a prompt
    config.bos_token_id, config.eos_token_id = clip_convert.BOS_TOKEN_ID, clip_convert.EOS_TOKEN_ID
    return config


def load_diffusers_folder(
    path: str,
    v2: Optional[bool] = None,
    v_parameterization: Optional[bool] = None,
    sdxl: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = None,
    part_dtypes: Optional[Dict[str, torch.dtype]] = None,
    zero_copy: Optional[bool] = None,
) -> StableDiffusionModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family = resolve_family(detect.detect_diffusers_folder(path), path, v2, sdxl)
    unet_cfg = UNet2DConditionModel.load_config(os.path.join(path, "unet"))
    unet_dtype = _part_dtype("unet", dtype, part_dtypes)
    unet = build_unet(_read_component(os.path.join(path, "unet"), "diffusers", unet_dtype, variant, zero_copy), family, unet_cfg)
    vae = None
    if os.path.isdir(os.path.join(path, "vae")):
        vae_cfg = AutoencoderKL.load_config(os.path.join(path, "vae"))
        vae_dtype = _part_dtype("vae", dtype, part_dtypes)
        vae = build_vae(_read_component(os.path.join(path, "vae"), "diffusers", vae_dtype, variant, zero_copy), family, vae_cfg)
    text_encoders = []
    for spec in family.text_encoders:
        folder = os.path.join(path, spec.diffusers_subfolder)
        te_dtype = _part_dtype(spec.diffusers_subfolder, dtype, part_dtypes)
        classic = clip_convert.normalize_clip_keys(_read_component(folder, "transformers", te_dtype, variant, zero_copy))
        config = _clip_config_from_file(os.path.join(folder, "config.json"))
        text_encoders.append(build_text_encoder(classic, spec, config))
    prediction = detect.diffusers_prediction_type(path)
    hint = None if prediction is None else prediction == "v_prediction"
    return StableDiffusionModels(
        family=family, unet=unet, vae=vae, text_encoders=text_encoders,
        v_parameterization=_resolve_v_param(v_parameterization, family, hint, path),
        source=path, source_kind="diffusers",
    )


# ---------------------------------------------------------------------------------------------
# entry points


def load_vae(path: str, family: ModelFamily, dtype: Optional[torch.dtype] = None, zero_copy: Optional[bool] = None):
    """`--vae`: a diffusers VAE folder (or a model folder with vae/), a diffusers VAE .bin/.safetensors
    state dict, or a single file (full checkpoint or VAE-only, LDM names)."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        cfg = AutoencoderKL.load_config(folder)
        return build_vae(_read_component(folder, "diffusers", dtype, None, zero_copy), family, cfg)
    tensors = checkpoint_io.read_checkpoint(path, dtype=dtype, zero_copy=zero_copy).tensors
    if any(k.startswith(detect.VAE_PREFIX) for k in tensors):
        tensors = _split_prefix(tensors, detect.VAE_PREFIX)
    if any(k.startswith("encoder.down_blocks.") for k in tensors):
        return build_vae(tensors, family)
    if not any(k.startswith("encoder.down.") for k in tensors):
        raise UserError(f"{path}: not a VAE (no encoder/decoder weights found); pass a VAE file or folder to --vae")
    return build_vae(vae_convert.ldm_to_diffusers(tensors), family)


def load_models(
    path: str,
    v2: Optional[bool] = None,
    v_parameterization: Optional[bool] = None,
    sdxl: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
    vae: Optional[str] = None,
    variant: Optional[str] = None,
    keep_ema: bool = False,
    part_dtypes: Optional[Dict[str, torch.dtype]] = None,
    zero_copy: Optional[bool] = None,
) -> StableDiffusionModels:
    """Load a model from a single-file checkpoint or a diffusers folder (family detected from the data).

    v2 / sdxl: what the user or script asserts; a contradiction with the file is a UserError.
    dtype: floating-point dtype to load into (None keeps the file's dtypes).
    part_dtypes: per-part exceptions to `dtype`, keyed "unet", "vae", "text_encoder", "text_encoder_2"
    (a trainer reads the parts it trains in float32 and the frozen ones in half precision).
    zero_copy: False reads every tensor into memory of its own instead of mapping the files
    (`--disable_mmap_load_safetensors`); None maps where that is safe (see `checkpoint_io.read_checkpoint`).
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder (models are never downloaded; pass a local checkpoint or diffusers folder)")
    if os.path.isdir(path):
        models = load_diffusers_folder(path, v2, v_parameterization, sdxl, dtype, variant, part_dtypes, zero_copy)
    else:
        models = load_single_file(path, v2, v_parameterization, sdxl, dtype, keep_ema, part_dtypes, zero_copy)
    if vae:
        models.vae = load_vae(vae, models.family, _part_dtype("vae", dtype, part_dtypes), zero_copy)
    if models.vae is None:
        raise UserError(f"{path}: the model has no VAE; pass one with --vae")
    return models


def safetensors_metadata(path: str) -> Dict[str, str]:
    return safetensors_io.read_metadata(path)
