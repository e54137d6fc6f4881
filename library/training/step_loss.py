"""The loss of one micro-batch: latents, conditioning, noise, the U-Net's prediction, the loss.

Shared by the training loop (`library.training.trainer`) and validation
(`library.training.validation`); every random draw comes from the generator passed in.
"""

from __future__ import annotations

from typing import Optional

import torch

from library.errors import UserError
from library.training.run import Run, Task


def _latents(run: Run, batch: dict) -> torch.Tensor:
    from library.models.frozen_weights import compute_dtype

    if "latents" in batch:
        latents = batch["latents"].to(run.device)
    else:
        vae = run.models.vae
        if vae is None:
            raise UserError("a batch came without cached latents after the VAE was released")
        with torch.no_grad():
            images = batch["images"].to(run.device, dtype=compute_dtype(vae))
            latents = vae.encode(images).latent_dist.sample()
    return (latents * run.family.latent_scale).to(run.precision.weight_dtype)


def _conditioning(run: Run, batch: dict, task: Task):
    if "text_outputs" in batch:
        from library.text.encoding import Conditioning

        outs = batch["text_outputs"]
        context = torch.stack([o.context for o in outs]).to(run.device)
        pooled = torch.stack([o.pooled for o in outs]).to(run.device) if outs[0].pooled is not None else None
        return Conditioning(context, pooled)
    ids = [t.to(run.device) for t in batch["input_ids"]]
    weights = batch.get("input_id_weights")
    if weights is not None:
        weights = [w.to(run.device) for w in weights]
    trains_te = any(task.trains_text_encoder(i) for i in range(len(ids)))
    with torch.set_grad_enabled(trains_te), run.precision_autocast():
        return run.conditioner.encode_tokens(ids, run.args.clip_skip, weights)


def micro_step_loss(run: Run, task: Task, batch: dict, generator: torch.Generator,
                    timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss of one micro-batch; `timesteps` fixes them instead of drawing (validation)."""
    from library.training.losses import compute_loss
    from library.training.noise import forward_process, target

    latents = _latents(run, batch)
    cond = _conditioning(run, batch, task)
    noise, noisy, timesteps = forward_process(run.noise_scheduler, latents, run.noise_settings, generator, timesteps)
    kwargs = task.unet_extra_kwargs(run, batch)
    task.before_unet(run, batch)
    if run.family.is_sdxl:
        time_ids = torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(run.device), "time_ids": time_ids.to(run.device)}
    with run.precision_autocast():
        pred = run.models.unet(noisy, timesteps, cond.context, **kwargs).sample
    want = target(run.noise_scheduler, latents, noise, timesteps, run.loss_settings.v_parameterization)
    return compute_loss(pred.float(), want.float(), timesteps, run.snr, run.loss_settings, _loss_mask(run, task, batch),
                        batch["loss_weights"].to(run.device))


def _loss_mask(run: Run, task: Task, batch: dict) -> Optional[torch.Tensor]:
    """sd-scripts' rule: with --masked_loss the conditioning image's red channel, else the alpha mask
    (with --masked_loss or --alpha_mask); None: no mask. A task that feeds its conditioning images to
    the model (ControlNet-LLLite) never uses them as masks."""
    from library.training.losses import mask_from_conditioning_images

    masked = bool(getattr(run.args, "masked_loss", False))
    if masked and "conditioning_images" in batch and task.conditioning_images_are_masks:
        return mask_from_conditioning_images(batch["conditioning_images"].to(run.device))
    if "alpha_masks" in batch and (masked or getattr(run.args, "alpha_mask", False)):
        return batch["alpha_masks"].to(run.device)
    return None
