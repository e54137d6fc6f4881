"""Sampler names (`--sampler`, `--sample_sampler`, `--ss`) → diffusers schedulers.

The names and classes are sd-scripts' (spec: cli-flags.md §4, model-formats.md §7): `k_*` names are
aliases of the plain ones, `dpmsolver` / `dpmsolver++` select the multistep solver's algorithm. Every
scheduler gets the training betas (scaled_linear 0.00085→0.012, 1000 steps), `clip_sample=False`
(sd-scripts' SDXL training samples keep DDIM's `clip_sample=True`, which clamps latents to [-1, 1];
we don't) and `steps_offset=1` (0 with `--force_scheduler_zero_steps_offset`; the singlestep DPM
solver has no such option).

`--zero_terminal_snr` uses diffusers' `rescale_betas_zero_snr` where the class has it; the other
classes get the same rescaled betas directly, with the last ᾱ raised to 2⁻²⁴ (what diffusers does
for its own k-diffusion schedulers) so that their sigma stays finite.

Importing this module is cheap: diffusers is imported only when a scheduler is built.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

from library.errors import UserError

BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000

# name → (diffusers class name, extra init kwargs)
_SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # PLMS only, as Stable Diffusion's released scheduler config has it; the default Runge-Kutta warm-up
    # of sd-scripts' bare PNDMScheduler fails below 4 steps
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers' default final sigma ("zero") is refused for the first-order-form algorithm
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # diffusers switches this on itself (with a warning) for its default final sigma
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}

# The choices sd-scripts offers (ddpm is accepted too: its training sampler list knows it).
SAMPLER_CHOICES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
ALL_SAMPLERS = SAMPLER_CHOICES + ("ddpm",)


def canonical_name(name: str) -> str:
    """`k_euler_a` → `euler_a`; an unknown name is a UserError listing the choices."""
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_CHOICES)}")
    return key


def zero_terminal_snr_betas():
    """Training betas rescaled to zero terminal SNR, with the last ᾱ kept at 2⁻²⁴ (finite sigma)."""
    import torch

    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas_cumprod[-1] = 2.0**-24
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1.0 - alphas_cumprod / previous).float().tolist()


def make_scheduler(
    name: str,
    v_parameterization: bool = False,
    zero_terminal_snr: bool = False,
    zero_steps_offset: bool = False,
):
    """A fresh diffusers scheduler for sampler `name` (see the module docstring for its settings)."""
    import diffusers

    class_name, extra = _SAMPLERS[canonical_name(name)]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
        beta_schedule="scaled_linear", **extra,
    )
    if v_parameterization:
        kwargs["prediction_type"] = "v_prediction"
    if "steps_offset" in accepted:
        kwargs["steps_offset"] = 0 if zero_steps_offset else 1
    if "clip_sample" in accepted:
        kwargs["clip_sample"] = False
    if zero_terminal_snr:
        if "rescale_betas_zero_snr" in accepted:
            kwargs["rescale_betas_zero_snr"] = True
        else:
            kwargs["trained_betas"] = zero_terminal_snr_betas()
    with warnings.catch_warnings():
        # diffusers announces the eventual removal of algorithm_type "dpmsolver"; it is still sd-scripts' option
        warnings.simplefilter("ignore", FutureWarning)
        return cls(**kwargs)


def check_sampler(name: Optional[str], flag: str = "--sampler") -> Optional[str]:
    """Validate a sampler name given by the user (returned as written, lower case); None passes through."""
    if name is None:
        return None
    try:
        canonical_name(name)
        return name.strip().lower()
    except UserError:
        raise UserError(f"{flag} {name!r} is not a sampler; choose one of {', '.join(SAMPLER_CHOICES)}") from None
