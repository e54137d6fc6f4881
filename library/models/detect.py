"""Which model family a file or folder holds, told from its keys (or a diffusers folder's configs).

Also recognises the files users commonly pass by mistake (a LoRA, an embedding, a VAE, a
ControlNet-LLLite) and says what they are and where they belong. The 512-eps / 768-v split of SD2
is not visible in weights; it comes from `--v_parameterization` or a diffusers scheduler config.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable

from library.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _prefix_summary(keys: Iterable[str], limit: int = 6) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    parts = [f"{p}.* ({n})" for p, n in counts.most_common(limit)]
    return ", ".join(parts) if parts else "no tensors"


def classify_keys(keys: Iterable[str]) -> str:
    """'sd1' | 'sd2' | 'sdxl' for checkpoints, or 'lora' | 'embedding' | 'lllite' | 'vae' | 'unknown'."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k for k in keys):
        return "lora"
    if any(k.startswith("lllite_") for k in keys):
        return "lllite"
    if set(keys) & {"emb_params", "clip_l", "clip_g", "string_to_param.*"} or has("string_to_param"):
        return "embedding"
    if has("encoder.down.") or has("decoder.up.") or has("encoder.down_blocks.") or has(VAE_PREFIX):
        if not has(UNET_PREFIX):
            return "vae"
    if has(UNET_PREFIX):
        # a U-Net without text encoders: tell SDXL (label_emb) from SD1/SD2 by the cross-attention width
        return "unet-only"
    return "unknown"


_MISPLACED = {
    "lora": "this is a LoRA file, not a model checkpoint; pass it with --network_weights",
    "embedding": "this is a textual-inversion embedding, not a model checkpoint; pass it with --textual_inversion_embeddings",
    "lllite": "this is a ControlNet-LLLite file, not a model checkpoint; pass it with --control_net_lllite_models",
    "vae": "this is a VAE-only file, not a full model checkpoint; pass it with --vae",
    "unet-only": "this file holds a U-Net but no text encoders; a full single-file checkpoint is needed",
}


def detect_single_file(path: str, keys: Iterable[str]) -> str:
    """Family name of a single-file checkpoint, or a UserError saying what the file is instead."""
    keys = list(keys)
    kind = classify_keys(keys)
    if kind in ("sd1", "sd2", "sdxl"):
        if not any(k.startswith(UNET_PREFIX) for k in keys):
            raise UserError(f"{path}: has text encoder keys but no U-Net ({UNET_PREFIX}*); the checkpoint is incomplete")
        return kind
    if kind in _MISPLACED:
        raise UserError(f"{path}: {_MISPLACED[kind]}")
    raise UserError(
        f"{path}: unknown checkpoint layout (found {_prefix_summary(keys)}); "
        "expected an SD1.x, SD2.x or SDXL single-file checkpoint or a diffusers folder"
    )


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isfile(os.path.join(path, "unet", "config.json"))
    )


def detect_diffusers_folder(path: str) -> str:
    if not is_diffusers_folder(path):
        raise UserError(
            f"{path}: not a diffusers model folder (no model_index.json or unet/config.json); "
            "pass a single-file checkpoint or a diffusers folder"
        )
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        return "sdxl"
    config = _read_json(os.path.join(path, "unet", "config.json"))
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD2's OpenCLIP-derived encoder uses gelu, SD1's CLIP-L quick_gelu; this also tells tiny models apart
    te_config = os.path.join(path, "text_encoder", "config.json")
    if os.path.isfile(te_config):
        return "sd2" if _read_json(te_config).get("hidden_act") == "gelu" else "sd1"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None


def diffusers_prediction_type(path: str) -> str | None:
    """'v_prediction' / 'epsilon' from a diffusers folder's scheduler config, if present."""
    cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("prediction_type")
    except (OSError, json.JSONDecodeError):
        return None
