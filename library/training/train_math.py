"""Training math entry point: the noise/loss flags, their settings objects, and the math functions.

The flags keep sd-scripts' names, defaults and meanings (spec/cli-flags.md, training-math.md).
This module imports only the standard library so argument parsers stay fast; the torch code lives
in `library.training.noise` (schedule, timesteps, noise, noisy latents, targets) and `library.training.losses`
(element-wise losses, masks, reduction, SNR weights) and is re-exported here on first use, so
`from library.training.train_math import compute_loss` works.

Trainer use, per step:
    scheduler = make_noise_scheduler(noise_cfg.zero_terminal_snr, noise_cfg.v_parameterization)
    snr = snr_table(scheduler)                       # once, after any rescale
    noise, noisy, t = forward_process(scheduler, latents, noise_cfg, generator)
    pred = unet(noisy, t, ...)
    loss = compute_loss(pred, target(scheduler, latents, noise, t, v_param), t, snr, loss_cfg,
                        mask, loss_cfg.loss_weights(is_reg))
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from typing import Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

_LAZY = {
    "library.training.noise": ("make_noise_scheduler", "snr_table", "sample_timesteps", "make_noise", "noisy_latents",
                      "target", "forward_process"),
    "library.training.losses": ("huber_c", "elementwise_loss", "reduce_loss", "apply_snr_weights", "compute_loss",
                       "latent_mask", "mask_from_conditioning_images", "SNR_FLOOR", "SNR_CLAMP"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY_NAMES))


def check_timestep_range(min_timestep: Optional[int], max_timestep: Optional[int]) -> tuple[int, int]:
    """Resolve the defaults (0 and 1000) and reject ranges that would yield a timestep outside 0…999."""
    low = 0 if min_timestep is None else int(min_timestep)
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else int(max_timestep)
    if low < 0:
        raise UserError(f"--min_timestep {low}: must be 0 or more")
    if high > NUM_TRAIN_TIMESTEPS:
        raise UserError(f"--max_timestep {high}: must be {NUM_TRAIN_TIMESTEPS} or less (it is exclusive)")
    if low >= high and not 0 <= high < NUM_TRAIN_TIMESTEPS:
        # min ≥ max means "always t = max_timestep", which needs max to be a real timestep
        raise UserError(
            f"--min_timestep {low} ≥ --max_timestep {high}: every step would use t={high}, "
            f"which must be 0…{NUM_TRAIN_TIMESTEPS - 1}; lower --max_timestep"
        )
    return low, high


@dataclass
class NoiseSettings:
    """Everything the forward process of one training step depends on."""

    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    zero_terminal_snr: bool = False
    v_parameterization: bool = False

    @classmethod
    def from_args(cls, args, **overrides) -> "NoiseSettings":
        """Read sd-scripts' flag names from any namespace (missing attributes take the defaults).

        `overrides` replace values the trainer resolved itself (e.g. a detected v_parameterization).
        """
        values = {name: getattr(args, name, default) for name, default in _defaults(cls).items()}
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise UserError("--adaptive_noise_scale needs --noise_offset (e.g. --noise_offset 0.05)")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise UserError(f"--multires_noise_iterations {self.multires_noise_iterations}: must be 0 or more")
        check_timestep_range(self.min_timestep, self.max_timestep)
        if self.zero_terminal_snr and not self.v_parameterization:
            logger.warning("--zero_terminal_snr without --v_parameterization: an ε-prediction model cannot "
                           "learn the pure-noise step well; results may be unexpected")


@dataclass
class LossSettings:
    """Everything the loss of one training step depends on."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False
    prior_loss_weight: float = 1.0

    @classmethod
    def from_args(cls, args, **overrides) -> "LossSettings":
        """Read sd-scripts' flag names from any namespace (missing attributes take the defaults).

        `overrides` replace values the trainer resolved itself (e.g. a detected v_parameterization).
        """
        values = {name: getattr(args, name, default) for name, default in _defaults(cls).items()}
        values.update(overrides)
        if values["prior_loss_weight"] is None:
            values["prior_loss_weight"] = 1.0
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise UserError(f"--huber_schedule {self.huber_schedule!r}: expected one of {', '.join(HUBER_SCHEDULES)}")
        if self.loss_type in ("huber", "smooth_l1"):
            if not self.huber_c > 0:
                raise UserError(f"--huber_c {self.huber_c}: must be greater than 0 (0.1 is the default)")
            if not self.huber_scale > 0:
                raise UserError(f"--huber_scale {self.huber_scale}: must be greater than 0 (1.0 is the default)")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise UserError(f"--min_snr_gamma {self.min_snr_gamma}: must be positive (5 is the usual value)")
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise UserError("--scale_v_pred_loss_like_noise_pred only works with --v_parameterization")
        if self.v_pred_like_loss and self.v_parameterization:
            raise UserError("--v_pred_like_loss cannot be used with --v_parameterization (drop one of them)")

    def loss_weights(self, is_reg):
        """Per-sample weights: `prior_loss_weight` for regularisation images, 1.0 for the rest."""
        import torch

        is_reg = torch.as_tensor(is_reg, dtype=torch.bool)
        return torch.where(is_reg, self.prior_loss_weight, 1.0).to(torch.float32)


def _defaults(cls) -> dict:
    return {name: f.default for name, f in cls.__dataclass_fields__.items()}


def add_train_math_arguments(parser: argparse.ArgumentParser) -> None:
    """The noise/timestep/loss flags of sd-scripts' training group and its custom-loss group.

    `--v_parameterization` (model group) and `--prior_loss_weight` (DreamBooth training group) are
    defined elsewhere; the settings read them from the same namespace.
    """
    g = parser.add_argument_group("noise and timesteps")
    g.add_argument("--noise_offset", type=float, default=None,
                   help="add offset noise of this strength, shared over each channel (about 0.1 is typical)")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="per batch, use a random offset strength between 0 and --noise_offset")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add |latent channel mean| × this to the noise offset (needs --noise_offset)")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="add multi-resolution (pyramid) noise with this many levels (6-10 is typical)")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="weight decay per pyramid level (only with --multires_noise_iterations)")
    g.add_argument("--ip_noise_gamma", type=float, default=None,
                   help="input-perturbation noise strength; perturbs the model input only (about 0.1)")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="per batch, use a random strength between 0 and --ip_noise_gamma")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule so the last timestep is pure noise (for v-prediction)")
    g.add_argument("--min_timestep", type=int, default=None,
                   help="smallest training timestep (0-999, default 0)")
    g.add_argument("--max_timestep", type=int, default=None,
                   help="training timesteps are below this (1-1000, default 1000)")

    g = parser.add_argument_group("loss")
    g.add_argument("--loss_type", type=str, default="l2", choices=list(LOSS_TYPES),
                   help="element-wise loss: l2 (default), l1, huber or smooth_l1")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=list(HUBER_SCHEDULES),
                   help="how the Huber threshold c varies with the timestep (huber/smooth_l1 only; default snr)")
    g.add_argument("--huber_c", type=float, default=0.1,
                   help="Huber threshold parameter (huber/smooth_l1 only; default 0.1)")
    g.add_argument("--huber_scale", type=float, default=1.0,
                   help="multiplies the Huber threshold, for every schedule (huber/smooth_l1 only; default 1.0)")
    g.add_argument("--min_snr_gamma", type=float, default=None,
                   help="min-SNR weighting with this gamma; lower is stronger (5 is recommended)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="weight a v-prediction loss like an ε-prediction loss (needs --v_parameterization)")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="add a v-prediction-like loss times this value (ε-prediction models only)")
    g.add_argument("--debiased_estimation_loss", action="store_true",
                   help="debiased-estimation weighting of the loss by timestep")
