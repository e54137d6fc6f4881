"""The `ss_*` training metadata written into network files (what A1111 and model browsers show).

Keys and value formats follow sd-scripts' train_network.py: every value is `str(v)`, nested values
are JSON. With `--no_metadata` only the minimum set the LoRA tools need is kept.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Dict

from library.training import lora_metadata
from library.models import modelspec
from library.training.train_args import modelspec_flags

VERSION = "sdtrain-0.1.0"


def _model_fields(args, run) -> Dict[str, object]:
    path = args.pretrained_model_name_or_path
    out: Dict[str, object] = {"sd_model_name": os.path.basename(os.path.normpath(path))}
    if os.path.isfile(path):
        # hashes of the base file: cheap legacy one always, full sha256 (the "new" hash) once per run
        out["sd_model_hash"] = lora_metadata.legacy_model_hash(path)
        if "new_sd_model_hash" not in run.extra:
            run.extra["new_sd_model_hash"] = lora_metadata.file_sha256(path)
        out["new_sd_model_hash"] = run.extra["new_sd_model_hash"]
    if args.vae:
        out["vae_name"] = os.path.basename(os.path.normpath(args.vae))
        if os.path.isfile(args.vae):
            out["vae_hash"] = lora_metadata.legacy_model_hash(args.vae)
            out["new_vae_hash"] = lora_metadata.file_sha256(args.vae)
    return out


def _dataset_fields(args, run) -> Dict[str, object]:
    scan = run.dataset.scan
    datasets = scan.datasets
    sources = [d.sources for d in datasets]
    tag_frequency: Dict[str, Dict[str, int]] = {}
    for s in sources:
        tag_frequency.update(s.tag_frequency)
    dataset_dirs, reg_dirs = {}, {}
    for d in datasets:
        counts: Dict[tuple, int] = {}
        for image in d.train:
            e = image.entry
            key = (e.is_reg, os.path.dirname(e.path), e.repeats)
            counts[key] = counts.get(key, 0) + 1
        for (is_reg, folder, repeats), n in counts.items():
            target = reg_dirs if is_reg else dataset_dirs
            target[os.path.basename(folder)] = {"n_repeats": repeats, "img_count": n}
    first = datasets[0].params if datasets else None
    out: Dict[str, object] = {
        "num_train_images": sum(s.num_train_images for s in sources),
        "num_reg_images": sum(s.num_reg_images for s in sources),
        "num_validation_images": sum(len(d.validation) for d in datasets),
        "tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "dataset_dirs": json.dumps(dataset_dirs, ensure_ascii=False),
        "reg_dataset_dirs": json.dumps(reg_dirs, ensure_ascii=False),
        "bucket_info": json.dumps(datasets[0].bucket_info()) if datasets else "None",
    }
    if first is not None:
        subset = first.subsets[0] if first.subsets else None
        out.update(
            batch_size_per_device=first.batch_size,
            total_batch_size=first.batch_size * run.num_processes * args.gradient_accumulation_steps,
            resolution=tuple(first.resolution) if first.resolution else None,
            enable_bucket=first.enable_bucket, min_bucket_reso=first.min_bucket_reso,
            max_bucket_reso=first.max_bucket_reso, bucket_no_upscale=first.bucket_no_upscale,
        )
        if subset is not None:
            out.update(
                color_aug=subset.color_aug, flip_aug=subset.flip_aug, random_crop=subset.random_crop,
                shuffle_caption=subset.shuffle_caption, keep_tokens=subset.keep_tokens,
                face_crop_aug_range=subset.face_crop_aug_range,
                caption_dropout_rate=subset.caption_dropout_rate,
                caption_dropout_every_n_epochs=subset.caption_dropout_every_n_epochs,
                caption_tag_dropout_rate=subset.caption_tag_dropout_rate,
            )
    return out


def training_metadata(args, run, network_module: str, network_dim, network_alpha) -> Dict[str, str]:
    """The full `ss_*` set at the start of training (per-save fields are added by `finish`)."""
    if "session_id" not in run.extra:
        run.extra["session_id"] = random.randint(0, 2**32)
    m: Dict[str, object] = {
        "session_id": run.extra["session_id"],
        "training_started_at": run.started_at,
        "output_name": args.output_name,
        "learning_rate": args.learning_rate,
        "text_encoder_lr": args.text_encoder_lr[0] if isinstance(args.text_encoder_lr, list) and args.text_encoder_lr
        else args.text_encoder_lr,
        "unet_lr": args.unet_lr,
        "num_batches_per_epoch": run.dataset.num_batches(1),
        "num_epochs": run.num_epochs,
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_train_steps": run.max_steps,
        "lr_warmup_steps": args.lr_warmup_steps,
        "lr_scheduler": args.lr_scheduler,
        "network_module": network_module,
        "network_dim": network_dim,
        "network_alpha": network_alpha,
        "network_dropout": args.network_dropout,
        "mixed_precision": args.mixed_precision,
        "full_fp16": args.full_fp16,
        "v2": run.family.v2,
        "base_model_version": lora_metadata.base_model_version(run.family, run.models.v_parameterization),
        "clip_skip": args.clip_skip,
        "max_token_length": args.max_token_length,
        "cache_latents": bool(args.cache_latents or args.cache_latents_to_disk),
        "seed": run.seed,
        "lowram": args.lowram,
        "noise_offset": args.noise_offset,
        "multires_noise_iterations": args.multires_noise_iterations,
        "multires_noise_discount": args.multires_noise_discount,
        "adaptive_noise_scale": args.adaptive_noise_scale,
        "zero_terminal_snr": args.zero_terminal_snr,
        "training_comment": args.training_comment,
        "sd_scripts_commit_hash": VERSION,
        "optimizer": run.optimizer_name + (f"({run.optimizer_args})" if run.optimizer_args else ""),
        "max_grad_norm": args.max_grad_norm,
        "prior_loss_weight": args.prior_loss_weight,
        "min_snr_gamma": args.min_snr_gamma,
        "scale_weight_norms": args.scale_weight_norms,
        "ip_noise_gamma": args.ip_noise_gamma,
        "debiased_estimation": bool(args.debiased_estimation_loss),
        "noise_offset_random_strength": args.noise_offset_random_strength,
        "ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "loss_type": args.loss_type,
        "huber_schedule": args.huber_schedule,
        "huber_scale": args.huber_scale,
        "huber_c": args.huber_c,
        "fp8_base": args.fp8_base,
        "fp8_base_unet": getattr(args, "fp8_base_unet", False),
        "validation_seed": getattr(args, "validation_seed", None),
        "validation_split": getattr(args, "validation_split", 0.0),
        "max_validation_steps": getattr(args, "max_validation_steps", None),
        "validate_every_n_epochs": getattr(args, "validate_every_n_epochs", None),
        "validate_every_n_steps": getattr(args, "validate_every_n_steps", None),
        "resize_interpolation": getattr(args, "resize_interpolation", None),
    }
    m.update(_dataset_fields(args, run))
    m.update(_model_fields(args, run))
    if args.network_args:
        m["network_args"] = lora_metadata.network_args_metadata(args.network_args)
    return {f"ss_{k}": str(v) for k, v in m.items()}


def finish(metadata: Dict[str, str], args, run, epoch: int, step: int, kind: str) -> Dict[str, str]:
    """Add the per-save fields and the modelspec keys; apply --no_metadata."""
    out = dict(metadata)
    out.update(ss_training_finished_at=str(time.time()), ss_steps=str(step), ss_epoch=str(epoch))
    if args.no_metadata:
        out = lora_metadata.minimum_metadata(out)
    resolution = run.dataset.scan.datasets[0].params.resolution if run.dataset.scan.datasets else None
    title = args.metadata_title or args.output_name or "last"
    extra = modelspec_flags(args)
    timesteps = (args.min_timestep, args.max_timestep)
    out.update(modelspec.build_metadata(
        run.family, run.models.v_parameterization, title, kind=kind,
        resolution=tuple(resolution) if resolution else None,
        timestep_range=timesteps if any(t is not None for t in timesteps) else None,
        clip_skip=args.clip_skip, extra=extra,
    ))
    return out
