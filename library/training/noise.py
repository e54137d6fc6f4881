"""The forward diffusion step of training: schedule, timesteps, noise variants, noisy latents, targets.

Follows sd-scripts' `get_noise_noisy_latents_and_timesteps` (spec/training-math.md §1) with two
differences on purpose: every random draw comes from an optional `torch.Generator` (so a step is
reproducible), and with `--zero_terminal_snr` the SNR table is taken from the rescaled schedule
(sd-scripts computes it before the rescale).

Random draws happen in this order, which matters when a generator is replayed: `make_noise` draws
the base noise, then the offset strength (only with `noise_offset_random_strength`), the offset
noise, then per multires iteration one scale factor and one noise tensor; `sample_timesteps` draws
the timesteps; `noisy_latents` draws the ip-noise strength (only with the random-strength flag) and
the ip noise.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from library.training.train_math import NUM_TRAIN_TIMESTEPS, check_timestep_range

BETA_START = 0.00085
BETA_END = 0.012


def make_noise_scheduler(zero_terminal_snr: bool = False, v_parameterization: bool = False):
    """The DDPM training schedule of SD1/SD2/SDXL (scaled_linear 0.00085→0.012, 1000 steps).

    diffusers' `rescale_betas_zero_snr` is the spec's zero-terminal-SNR rescale (shift √ᾱ so the
    last is 0, scale so the first is unchanged, convert back to betas), done before ᾱ is derived.
    """
    from diffusers import DDPMScheduler  # heavy; kept out of import time

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def snr_table(scheduler) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t) for every training timestep, float32 on the CPU.

    Read from the scheduler as it is now, so a zero-terminal-SNR schedule gives SNR 0 at t=999.
    """
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _draw_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    # A generator only produces numbers on its own device; draw there and move the result.
    return generator.device if generator is not None else torch.device(fallback)


def _randn(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    draw_on = _draw_device(generator, device)
    return torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=torch.float32).to(device)


def _uniform(generator: Optional[torch.Generator], device) -> float:
    draw_on = _draw_device(generator, device)
    return float(torch.rand((), generator=generator, device=draw_on))


def sample_timesteps(
    batch: int,
    min_timestep: Optional[int] = None,
    max_timestep: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device="cpu",
) -> torch.Tensor:
    """One timestep per sample, uniform in [min, max) (max exclusive); min ≥ max gives all t = max."""
    low, high = check_timestep_range(min_timestep, max_timestep)
    if low >= high:
        return torch.full((batch,), high, dtype=torch.long, device=device)
    draw_on = _draw_device(generator, device)
    t = torch.randint(low, high, (batch,), generator=generator, device=draw_on, dtype=torch.long)
    return t.to(device)


def _apply_noise_offset(noise, latents, generator, noise_offset, random_strength, adaptive_noise_scale):
    offset = noise_offset
    if random_strength:
        offset = offset * _uniform(generator, latents.device)  # one strength for the whole batch
    if adaptive_noise_scale is not None:
        # brighter/darker images (large |channel mean|) get a larger offset; never negative
        latent_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    b, c = latents.shape[:2]
    return noise + offset * _randn((b, c, 1, 1), generator, latents.device)


def _apply_multires_noise(noise, generator, iterations: int, discount: float):
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = 2.0 + 2.0 * _uniform(generator, noise.device)  # rather than exactly halving each level
        h_i, w_i = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = _randn((b, c, h_i, w_i), generator, noise.device)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if h_i == 1 or w_i == 1:
            break
    return noise / noise.std()  # one std over the whole batch, as sd-scripts does


def make_noise(
    latents: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    noise_offset: Optional[float] = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: Optional[float] = None,
    multires_noise_iterations: Optional[int] = None,
    multires_noise_discount: float = 0.3,
) -> torch.Tensor:
    """ε ~ N(0, I) shaped like `latents`, plus the optional offset and pyramid (multires) noise.

    Computed in float32 and returned in the latents' dtype. The offset is applied first; pyramid
    noise is added on top and the sum renormalised to unit std.
    """
    noise = _randn(latents.shape, generator, latents.device)
    if noise_offset:
        noise = _apply_noise_offset(
            noise, latents, generator, noise_offset, noise_offset_random_strength, adaptive_noise_scale
        )
    if multires_noise_iterations:
        noise = _apply_multires_noise(noise, generator, int(multires_noise_iterations), multires_noise_discount)
    return noise.to(latents.dtype)


def _with_cpu_schedule(scheduler, fn, *tensors):
    # diffusers moves alphas_cumprod to the sample's device as a side effect; put it back so the
    # scheduler stays a CPU object shared by everything (sd-scripts does the same).
    try:
        return fn(*tensors)
    finally:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.cpu()


def noisy_latents(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    ip_noise_gamma: Optional[float] = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """z_t = √ᾱ_t·z + √(1−ᾱ_t)·ε'. With `ip_noise_gamma` γ, ε' = ε + γ·N(0, I) (input perturbation):
    only the model input is perturbed; the target keeps using ε."""
    if ip_noise_gamma:
        strength = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = strength * _uniform(generator, latents.device)
        perturbation = _randn(latents.shape, generator, latents.device).to(noise.dtype)
        noise = noise + strength * perturbation
    return _with_cpu_schedule(scheduler, scheduler.add_noise, latents, noise, timesteps.to(latents.device))


def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           v_parameterization: bool) -> torch.Tensor:
    """What the U-Net must predict: ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·z with v-parameterization."""
    if not v_parameterization:
        return noise
    return _with_cpu_schedule(scheduler, scheduler.get_velocity, latents, noise, timesteps.to(latents.device))


def forward_process(scheduler, latents: torch.Tensor, settings, generator: Optional[torch.Generator] = None,
                    timesteps: Optional[torch.Tensor] = None):
    """The whole per-step forward process for a `NoiseSettings`: returns (noise, noisy_latents, timesteps).

    `noise` is the unperturbed ε, i.e. what `target` needs. `timesteps` fixes the timesteps instead
    of drawing them (validation measures the loss at set ones).
    """
    noise = make_noise(
        latents, generator,
        noise_offset=settings.noise_offset,
        noise_offset_random_strength=settings.noise_offset_random_strength,
        adaptive_noise_scale=settings.adaptive_noise_scale,
        multires_noise_iterations=settings.multires_noise_iterations,
        multires_noise_discount=settings.multires_noise_discount,
    )
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], settings.min_timestep, settings.max_timestep, generator,
                                     latents.device)
    noisy = noisy_latents(scheduler, latents, noise, timesteps, settings.ip_noise_gamma,
                          settings.ip_noise_gamma_random_strength, generator)
    return noise, noisy, timesteps
