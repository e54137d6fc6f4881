"""ControlNet-LLLite in generation: control networks, their guide images, and their per-step ratio.

`load_control_nets` reads `--control_net_lllite_models` (with `--control_net_multipliers` and
`--control_net_ratios`, one value per model, default 1.0) and attaches each file to the U-Net; the
networks come from `networks/control_net_lllite.py`, loaded by module name like every network.
Several LLLite models and LoRAs can be attached together: each wraps the layer as it finds it.

Per batch, `steer` hands each control network the hint images of its jobs (`ImageJob.guide_images`:
one image per network, or one for all), resized to the batch size with Lanczos and brought to
[-1, 1], as sd-scripts does. With a ratio r < 1 a network is switched off for the steps after the
fraction r of the sampling steps (sd-scripts: off at step i when r < i / steps), through the
pipeline's step-end callback. After the batch every hint is dropped again.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

LLLITE_MODULE = "networks.control_net_lllite"
SIDE_MULTIPLE = 32  # the deepest hint embedding shrinks the image 32 times


@dataclass
class ControlNet:
    """One attached control network and how strongly and how long it steers."""

    network: object  # networks.control_net_lllite.ControlNetLLLite
    multiplier: float = 1.0
    ratio: float = 1.0
    name: str = ""

    def describe(self) -> str:
        return f"{self.name}:{self.multiplier:g}:{self.ratio:g}"


def _per_model(values: Optional[Sequence[float]], count: int, flag: str) -> List[float]:
    values = list(values or [])
    if len(values) > count:
        raise UserError(f"{flag}: {len(values)} values for {count} --control_net_lllite_models file(s); give one per file")
    return values + [1.0] * (count - len(values))


def load_control_nets(args, models, dtype: torch.dtype, device: torch.device) -> List[ControlNet]:
    """Attach every --control_net_lllite_models file to the U-Net (SDXL only)."""
    files = args.control_net_lllite_models or []
    if not files:
        return []
    if not models.family.is_sdxl:
        raise UserError(f"--control_net_lllite_models: ControlNet-LLLite works with SDXL models only; {args.ckpt} "
                        f"is a {models.family.title} model")
    module = importlib.import_module(LLLITE_MODULE)
    multipliers = _per_model(args.control_net_multipliers, len(files), "--control_net_multipliers")
    ratios = _per_model(args.control_net_ratios, len(files), "--control_net_ratios")
    nets = []
    for file, multiplier, ratio in zip(files, multipliers, ratios):
        network = module.load_lllite(file, models.unet, multiplier)
        network.to(device, dtype).eval()
        name = os.path.splitext(os.path.basename(file))[0]
        nets.append(ControlNet(network, multiplier, ratio, name))
        logger.info("ControlNet-LLLite %s: multiplier %g, ratio %g", name, multiplier, ratio)
    return nets


def guide_groups(images: list, count: int) -> List[tuple]:
    """Guide images per generated image: one image serves every network; else consecutive groups of
    `count` images, one per network (sd-scripts' grouping), used in turn."""
    if not images or count == 0:
        return []
    if len(images) == 1:
        return [tuple(images) * count]
    if len(images) % count:
        raise UserError(f"--guide_image_path: {len(images)} guide images for {count} LLLite models; give one image "
                        f"for all, or {count} per generated image (in model order)")
    return [tuple(images[i : i + count]) for i in range(0, len(images), count)]


def hint_tensor(images: Sequence, width: int, height: int, device, dtype) -> torch.Tensor:
    """PIL guide images → [B, 3, H, W] in [-1, 1] at the batch size (Lanczos, as sd-scripts)."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)) for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels.to(device=device, dtype=torch.float32).div(127.5).sub(1.0).to(dtype)


@contextlib.contextmanager
def steer(control_nets: Sequence[ControlNet], jobs: Sequence, width: int, height: int, device, kwargs: dict):
    """Set each network's hints for one pipeline call (adds the step callback to `kwargs` when a ratio
    needs it); switches every network off afterwards. Jobs without guide images run uncontrolled."""
    if not control_nets:
        yield
        return
    guided = [job.guide_images for job in jobs if job.guide_images]
    try:
        if guided and len(guided) < len(jobs):
            raise UserError("a batch mixes images with and without guide images; give every prompt one")
        if not guided:
            for control in control_nets:
                control.network.set_cond_image(None)
        else:
            if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
                raise UserError(f"ControlNet-LLLite: image size {width}x{height} must have sides that are multiples "
                                f"of {SIDE_MULTIPLE} (use --W/--H or --w/--h)")
            for j, control in enumerate(control_nets):
                weight = next(control.network.parameters())
                hints = hint_tensor([job.guide_images[j] for job in jobs], width, height, device, weight.dtype)
                control.network.set_multiplier(control.multiplier)
                with torch.no_grad():
                    control.network.set_cond_image(hints)
            if any(control.ratio < 1.0 for control in control_nets):
                kwargs["callback_on_step_end"] = _ratio_callback(control_nets)
        yield
    finally:
        for control in control_nets:
            control.network.set_cond_image(None)


def _ratio_callback(control_nets: Sequence[ControlNet]):
    def after_step(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        done = (step_index + 1) / max(1, pipe.num_timesteps)  # the fraction the next step starts at
        for control in control_nets:
            if control.ratio < done:
                control.network.set_cond_image(None)
        return callback_kwargs

    return after_step
