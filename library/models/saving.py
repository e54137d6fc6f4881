"""Saving a `StableDiffusionModels` bundle as a single file (ckpt / safetensors) or a diffusers folder.

Single files use the original layouts (LDM for SD1/SD2, SGM for SDXL) that AUTOMATIC1111 and
ComfyUI read, with exactly the keys the original model code saves. Diffusers folders keep the
classic `text_model.` key names every existing diffusers folder uses. Every write is atomic: a
file goes through a temp file and a rename, a folder through a temp folder swapped in at the end.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

import torch

from library.models import atomic_writes, checkpoint_io, clip_convert, detect, modelspec, safetensors_io, unet_convert, vae_convert
from library.errors import UserError
from library.models.loading import StableDiffusionModels

FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

LDM_SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def format_for_path(path: str, requested: Optional[str] = None) -> str:
    """sd-scripts' rule: a path with an extension is a single file, without one a diffusers folder."""
    if requested:
        if requested not in FORMATS:
            raise UserError(f"unknown model format {requested!r}; choose one of {', '.join(FORMATS)}")
        return requested
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    if ext:
        raise UserError(f"{path}: unknown extension {ext!r}; use .safetensors, .ckpt, or no extension for a diffusers folder")
    return "diffusers"


def ldm_schedule_buffers() -> Dict[str, torch.Tensor]:
    """The 12 DDPM schedule buffers the original SD1/SD2 LatentDiffusion saves (scaled-linear betas)."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: values[k].float() for k in LDM_SCHEDULE_KEYS}


def _cast(tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    # meta tensors stay as they are: key/shape checks of full-size layouts run without memory
    return {k: (v.detach() if v.device.type == "meta" else v.detach().cpu()) for k, v in module.state_dict().items()}


def original_state_dict(models: StableDiffusionModels) -> Dict[str, torch.Tensor]:
    """The full single-file state dict in the original layout, in the module registration order."""
    family = models.family
    sd: Dict[str, torch.Tensor] = {}
    if not family.is_sdxl and models.source_kind != "single_file":
        sd.update(ldm_schedule_buffers())  # what the original code saves; a single-file source keeps its own set
    for k, v in unet_convert.diffusers_to_ldm(_cpu_state(models.unet)).items():
        sd[detect.UNET_PREFIX + k] = v
    if models.vae is None:
        raise UserError("cannot save a single-file checkpoint without a VAE")
    for k, v in vae_convert.diffusers_to_ldm(_cpu_state(models.vae)).items():
        sd[detect.VAE_PREFIX + k] = v
    for spec, encoder in zip(family.text_encoders, models.text_encoders):
        classic = clip_convert.model_to_classic_keys(_cpu_state(encoder), encoder)
        prefix = spec.single_file_prefix
        if spec.kind == "openclip":
            extras = {k[len(prefix):]: v for k, v in models.extras.items() if k.startswith(prefix)}
            section = clip_convert.classic_to_openclip(classic, spec, extras or None)
        else:
            section = clip_convert.classic_to_clip_section(classic)  # adds position_ids, as released files have
        sd.update({prefix + k: v for k, v in section.items()})
    for k, v in models.extras.items():
        sd.setdefault(k, v)  # schedule buffers, EMA, denoiser.sigmas... from the source file
    return sd


def save_single_file(
    models: StableDiffusionModels,
    path: str,
    fmt: str,
    precision: Optional[torch.dtype] = None,
    metadata: Optional[Dict[str, str]] = None,
    epoch: int = 0,
    global_step: int = 0,
) -> None:
    sd = _cast(original_state_dict(models), precision)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        meta = modelspec.build_metadata(models.family, models.v_parameterization, title=_title(path))
        meta.update(metadata or {})
        safetensors_io.save_tensors(sd, path, meta)
    else:
        epoch += int(models.pickle_extra.get("epoch", 0) or 0)
        global_step += int(models.pickle_extra.get("global_step", 0) or 0)
        checkpoint_io.save_pickle_checkpoint({"state_dict": sd, "epoch": epoch, "global_step": global_step}, path)


def _title(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


# ---------------------------------------------------------------------------------------------
# diffusers folders


def _write_component(folder: str, stem: str, tensors: Dict[str, torch.Tensor], use_safetensors: bool) -> None:
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if use_safetensors:
        safetensors_io.save_tensors(tensors, os.path.join(folder, stem + ".safetensors"), {"format": "pt"})
    else:
        checkpoint_io.save_pickle_checkpoint(tensors, os.path.join(folder, stem + ".bin"))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def scheduler_config(models: StableDiffusionModels) -> dict:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = EulerDiscreteScheduler if models.family.is_sdxl else DDIMScheduler
    kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        prediction_type="v_prediction" if models.v_parameterization else "epsilon",
    )
    if cls is DDIMScheduler:
        kwargs.update(clip_sample=False, set_alpha_to_one=False)
    else:
        kwargs.update(timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    return dict(cls.from_config(kwargs).config)


def _model_index(models: StableDiffusionModels) -> dict:
    import diffusers

    family = models.family
    index = {
        "_class_name": family.diffusers_pipeline,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", family.diffusers_scheduler],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, (spec, encoder) in enumerate(zip(family.text_encoders, models.text_encoders)):
        suffix = "" if i == 0 else f"_{i + 1}"
        index["text_encoder" + suffix] = ["transformers", type(encoder).__name__]
        index["tokenizer" + suffix] = ["transformers", "CLIPTokenizer"]
    if family.is_sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def _text_encoder_config(encoder) -> dict:
    config = encoder.config.to_dict()
    config["architectures"] = [type(encoder).__name__]
    # transformers 4.x reads torch_dtype, 5.x dtype; write both
    dtype = next(encoder.parameters()).dtype
    config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    return config


def _write_diffusers(models: StableDiffusionModels, root: str, precision, use_safetensors: bool, tokenizers) -> None:
    from library.text.tokenizer import load_tokenizers, save_tokenizer

    family = models.family
    _write_json(os.path.join(root, "model_index.json"), _model_index(models))
    os.makedirs(os.path.join(root, "scheduler"))
    scheduler = None
    if models.source_kind == "diffusers":
        src = os.path.join(models.source, "scheduler", "scheduler_config.json")
        if os.path.isfile(src):
            with open(src, encoding="utf-8") as f:
                scheduler = json.load(f)
    _write_json(os.path.join(root, "scheduler", "scheduler_config.json"), scheduler or scheduler_config(models))

    unet_dir = os.path.join(root, "unet")
    os.makedirs(unet_dir)
    _write_json(os.path.join(unet_dir, "config.json"), _diffusers_config(models.unet))
    _write_component(unet_dir, "diffusion_pytorch_model", _cast(_cpu_state(models.unet), precision), use_safetensors)
    if models.vae is not None:
        vae_dir = os.path.join(root, "vae")
        os.makedirs(vae_dir)
        _write_json(os.path.join(vae_dir, "config.json"), _diffusers_config(models.vae))
        _write_component(vae_dir, "diffusion_pytorch_model", _cast(_cpu_state(models.vae), precision), use_safetensors)

    if tokenizers is None:
        source = models.source if models.source_kind == "diffusers" else None
        tokenizers = load_tokenizers(family, pretrained_path=source)
    for i, (spec, encoder, tokenizer) in enumerate(zip(family.text_encoders, models.text_encoders, tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        te_dir = os.path.join(root, spec.diffusers_subfolder)
        os.makedirs(te_dir)
        classic = clip_convert.model_to_classic_keys(_cpu_state(encoder), encoder)
        _write_component(te_dir, "model" if use_safetensors else "pytorch_model", _cast(classic, precision), use_safetensors)
        config = _text_encoder_config(encoder)
        if precision is not None:
            config["torch_dtype"] = config["dtype"] = str(precision).replace("torch.", "")
        _write_json(os.path.join(te_dir, "config.json"), config)
        save_tokenizer(tokenizer, os.path.join(root, "tokenizer" + suffix))


def _diffusers_config(model) -> dict:
    import diffusers

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["_class_name"] = type(model).__name__
    config["_diffusers_version"] = diffusers.__version__
    return json.loads(json.dumps(config, default=list))


def save_diffusers_folder(
    models: StableDiffusionModels,
    path: str,
    use_safetensors: bool = True,
    precision: Optional[torch.dtype] = None,
    tokenizers=None,
) -> None:
    """Write into a temp folder beside `path`, then swap it in (library/models/atomic_writes.py)."""
    path = os.path.normpath(path)
    if os.path.isfile(path):
        raise UserError(f"{path}: is a file; a diffusers model is saved as a folder (use a path without extension)")
    with atomic_writes.atomic_folder(path) as tmp:
        _write_diffusers(models, tmp, precision, use_safetensors, tokenizers)


def save_models(
    models: StableDiffusionModels,
    path: str,
    fmt: Optional[str] = None,
    precision: Optional[torch.dtype] = None,
    metadata: Optional[Dict[str, str]] = None,
    epoch: int = 0,
    global_step: int = 0,
    tokenizers=None,
) -> str:
    """Save in `fmt` (None: from the path's extension). Returns the format used."""
    fmt = format_for_path(path, fmt)
    if fmt in ("ckpt", "safetensors"):
        save_single_file(models, path, fmt, precision, metadata, epoch, global_step)
    else:
        save_diffusers_folder(models, path, fmt == "diffusers_safetensors", precision, tokenizers)
    return fmt
