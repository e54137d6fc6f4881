"""The training loss: element-wise loss, mask, per-sample reduction, prior weight, SNR weightings.

Order (spec/training-math.md §2): element-wise loss in float32 → × mask → mean over C,H,W →
× per-sample weight (`prior_loss_weight` for regularisation images) → min-SNR →
scale-v-like-ε → v-pred-like → debiased → mean over the batch. Every trainer uses this same chain;
sd-scripts' per-script gaps (no prior weight in sdxl_train/fine_tune, ignored `--v_pred_like_loss`
in train_db/fine_tune, `--huber_scale` ignored by the "snr" Huber schedule) are fixed here.

SNR values come from a table built *after* any zero-terminal-SNR rescale, so SNR can be exactly 0
at t=999. Where the spec divides by the SNR, the divisor is floored at `SNR_FLOOR` (the SNR of the
standard schedule's last step): weights of the standard schedule are unchanged and a rescaled
schedule never weights a step more than the standard schedule's noisiest one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from library.training.noise import BETA_END, BETA_START
from library.training.train_math import HUBER_SCHEDULES, LOSS_TYPES, NUM_TRAIN_TIMESTEPS

SNR_CLAMP = 1000.0  # sd-scripts' s' = min(s, 1000) for the scale-v, v-pred-like and debiased weights


def _standard_terminal_snr() -> float:
    # Same float32 arithmetic as diffusers' scaled_linear schedule.
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    last = torch.cumprod(1.0 - betas, dim=0)[-1]
    return float(last / (1.0 - last))


SNR_FLOOR = _standard_terminal_snr()  # ≈ 0.00468


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def huber_c(
    timesteps: torch.Tensor,
    snr: Optional[torch.Tensor],
    loss_type: str,
    huber_schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
) -> Optional[torch.Tensor]:
    """Per-sample Huber threshold c(t) (B,), or None for l1/l2.

    constant: hc·hs; exponential: hs·hc^(t/1000); snr: hs·((1−hc)/(1+σ_t)² + hc) with
    σ_t = √((1−ᾱ_t)/ᾱ_t) = 1/√SNR_t. `snr` is the table from `snr_table` (needed for "snr").
    """
    if loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.to(torch.float32)
    if huber_schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * t) * huber_scale
    if huber_schedule == "snr":
        if snr is None:
            raise ValueError("the 'snr' Huber schedule needs the SNR table")
        s = snr.to(t.device)[timesteps.to(t.device).long()]
        # 1/(1+σ)² rewritten as s/(√s+1)² so SNR 0 (zero terminal SNR) gives 0, not inf/inf
        inv_sq = s / (s.sqrt() + 1.0) ** 2
        return ((1.0 - huber_c) * inv_sq + huber_c) * huber_scale
    raise ValueError(f"unknown Huber schedule {huber_schedule!r}; expected one of {HUBER_SCHEDULES}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unreduced loss in float32, shaped like `pred`. `c` is the (B,) threshold for huber/smooth_l1."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if c is None:
            raise ValueError(f"loss_type {loss_type!r} needs the per-sample threshold c")
        c = _per_sample(c.to(pred.device, torch.float32), pred)
        smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2.0 * c * smooth if loss_type == "huber" else 2.0 * smooth
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def mask_from_conditioning_images(images: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) mask in [0,1] from conditioning images in [−1,1]: the red channel."""
    return images[:, 0:1].float() / 2.0 + 0.5


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A (B,H,W) or (B,1,H,W) mask resized by area averaging to the latent `size` (h, w), float32."""
    mask = mask.float()
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=tuple(size), mode="area")
    return mask


def reduce_loss(elementwise: torch.Tensor, mask: Optional[torch.Tensor] = None,
                loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,C,h,w) → (B,): × mask (resized to h,w), mean over C,h,w, × per-sample weights.

    The mean divides by the full area, not by the mask's sum, as sd-scripts does.
    """
    loss = elementwise
    if mask is not None:
        loss = loss * latent_mask(mask, loss.shape[-2:]).to(loss.device)
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * torch.as_tensor(loss_weights, dtype=loss.dtype, device=loss.device)
    return loss


def apply_snr_weights(
    loss: torch.Tensor,
    timesteps: torch.Tensor,
    snr: torch.Tensor,
    min_snr_gamma: Optional[float] = None,
    v_parameterization: bool = False,
    scale_v_pred_loss_like_noise_pred: bool = False,
    v_pred_like_loss: Optional[float] = None,
    debiased_estimation: bool = False,
) -> torch.Tensor:
    """Per-sample SNR weightings of a (B,) loss, in the spec's order (each optional; 0/None = off).

    min-SNR γ: ε `min(s,γ)/s` (computed as γ/max(s,γ), 1 for s ≤ γ incl. s = 0), v `min(s,γ)/(s+1)`;
    scale-v (v only): × s'/(s'+1); v-pred-like λ (ε only): + λ·loss·(s'+1)/s';
    debiased: ε × 1/√s', v × 1/(s'+1); s' = min(s, 1000), and in the two terms that divide by
    it (v-pred-like, ε debiased) s' is first raised to at least SNR_FLOOR.
    """
    s = snr.to(loss.device, torch.float32)[timesteps.to(loss.device).long()]
    clamped = torch.clamp(s, max=SNR_CLAMP)
    divisor = torch.clamp(clamped, min=SNR_FLOOR)  # only where the spec divides by s'
    if min_snr_gamma:
        if v_parameterization:
            loss = loss * torch.clamp(s, max=min_snr_gamma) / (s + 1.0)
        else:
            loss = loss * (min_snr_gamma / torch.clamp(s, min=min_snr_gamma))
    if scale_v_pred_loss_like_noise_pred and v_parameterization:
        loss = loss * clamped / (clamped + 1.0)
    if v_pred_like_loss and not v_parameterization:
        loss = loss + v_pred_like_loss * loss * (divisor + 1.0) / divisor
    if debiased_estimation:
        loss = loss / (clamped + 1.0) if v_parameterization else loss / divisor.sqrt()
    return loss


def compute_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    snr: torch.Tensor,
    settings,
    mask: Optional[torch.Tensor] = None,
    loss_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The scalar training loss for a `LossSettings`; `snr` is `snr_table(scheduler)`."""
    c = huber_c(timesteps, snr, settings.loss_type, settings.huber_schedule, settings.huber_c,
                settings.huber_scale)
    loss = elementwise_loss(model_pred, target, settings.loss_type, c)
    loss = reduce_loss(loss, mask, loss_weights)
    loss = apply_snr_weights(
        loss, timesteps, snr,
        min_snr_gamma=settings.min_snr_gamma,
        v_parameterization=settings.v_parameterization,
        scale_v_pred_loss_like_noise_pred=settings.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=settings.v_pred_like_loss,
        debiased_estimation=settings.debiased_estimation_loss,
    )
    return loss.mean()
