"""Sample images during training (`--sample_prompts`, `--sample_sampler`, `--sample_every_n_*`).

`sample_images` renders every prompt of the prompts file (.txt lines with `--w --h --d --s --l --n
--ss` options, `.toml`, `.json`; see library/generation/prompt_options.py) with the models being trained, as
they are: a LoRA applied by the trainer stays applied, nothing is merged or copied. Defaults are
sd-scripts': 512×512, 30 steps, scale 7.5, sizes floored to a multiple of 8 (at least 64), a random
seed when none is given. When a ControlNet-LLLite network is trained, each prompt's `--cn <image>`
(`controlnet_image` in .toml/.json files) is its guide image, through the generator's own path
(library/generation/control.py). Images are saved as

    <output_dir>/sample/[<output_name>_]<step:06d | e<epoch:06d>>_<index:02d>_<YYYYmmddHHMMSS>[_<seed>].png

with the prompt, seed and settings in the PNG text. Deviation from sd-scripts: SDXL samples use DDIM
with `clip_sample=False` like every other sampler here (sd-scripts clamps SDXL DDIM latents).

Sampling leaves training untouched: modules are switched to eval mode and back, the VAE goes back to
the device it was on, and the global RNG states (CPU and CUDA) are restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from typing import List, Mapping, Optional, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
# Training samples allow long prompts like sd-scripts' sample pipeline (3 × 75 tokens).
MAX_EMBEDDINGS_MULTIPLES = 3


def _floor_size(value) -> int:
    value = int(value)
    return max(64, value - value % 8)


@contextlib.contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]):
    modes = [(m, m.training) for m in modules if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.train(was_training)


@contextlib.contextmanager
def _on_device(module: torch.nn.Module, device):
    """Trainers may park the VAE elsewhere (e.g. on the CPU after caching latents); the pipeline runs
    every component on one device."""
    before = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(before)


@contextlib.contextmanager
def _preserved_rng():
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def sample_file_name(output_name: Optional[str], step: int, epoch: Optional[int], index: int, seed: Optional[int],
                     timestamp: str) -> str:
    """sd-scripts' sample image name (epoch-end samples are numbered by epoch, others by step)."""
    prefix = f"{output_name}_" if output_name else ""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{timestamp}{suffix}.png"


def _replace(text: Optional[str], replacements: Optional[Mapping[str, str]]) -> Optional[str]:
    for old, new in (replacements or {}).items():
        text = text.replace(old, new) if text else text
    return text


def _guide_images(prompt: dict, count: int) -> tuple:
    """The prompt's `--cn` image for each control network (none without networks or without `--cn`)."""
    path = prompt.get("controlnet_image")
    if not count or not path:
        if count:
            logger.warning("sample %d has no guide image (--cn <image>); ControlNet-LLLite stays off for it",
                           prompt["enum"])
        return ()
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the guide image given with --cn ({e})") from None
    image.filename = path
    return (image,) * count


def sample_images(
    run_like, step: int, epoch: Optional[int], prompts_file: Optional[str], sampler: Optional[str], output_dir: str,
    *, networks: Sequence[torch.nn.Module] = (), replacements: Optional[Mapping[str, str]] = None,
    control_nets: Sequence[torch.nn.Module] = (),
) -> List[str]:
    """Render the prompts of `prompts_file` with the run's current models; returns the saved paths.

    run_like: anything with `.models` (StableDiffusionModels), `.tokenizers`, `.device` and `.args`
    (`output_name`, `clip_skip`, `zero_terminal_snr` are read when present); optional `.conditioner`,
    `.precision_autocast()`, `.is_main`. networks: modules (e.g. the trained LoRA network) to hold in
    eval mode while sampling. replacements: substring replacements for prompts (textual inversion's
    `token` → `token token1 ...`). control_nets: ControlNet-LLLite networks being trained; they steer
    the prompts that name a guide image (`--cn`) and stay off for the others.
    """
    from library.generation.control import ControlNet
    from library.generation.engine import BatchSettings, GenerationEngine, ImageJob, NonFiniteOutput
    from library.generation.png_info import image_info, save_png
    from library.generation.prompt_options import load_prompt_file
    from library.generation.samplers import check_sampler

    if not prompts_file or not getattr(run_like, "is_main", True):
        return []
    if not os.path.isfile(prompts_file):
        logger.error("sample prompts file %s not found; no samples", prompts_file)
        return []
    try:
        prompts = load_prompt_file(prompts_file)
    except UserError as e:
        logger.error("no samples: %s", e)
        return []
    args, models = run_like.args, run_like.models
    default_sampler = check_sampler(sampler or "ddim", "--sample_sampler")
    engine = GenerationEngine(
        models, run_like.tokenizers, run_like.device, clip_skip=getattr(args, "clip_skip", None),
        max_embeddings_multiples=MAX_EMBEDDINGS_MULTIPLES, zero_terminal_snr=getattr(args, "zero_terminal_snr", False),
        conditioner=getattr(run_like, "conditioner", None),
        control_nets=[ControlNet(network, name=getattr(args, "output_name", None) or "lllite")
                      for network in control_nets],
    )
    folder = os.path.join(output_dir, "sample")
    os.makedirs(folder, exist_ok=True)
    autocast = run_like.precision_autocast() if hasattr(run_like, "precision_autocast") else contextlib.nullcontext()
    modules = [models.unet, models.vae, *models.text_encoders, *networks]
    saved = []
    with eval_mode(modules), _on_device(models.vae, run_like.device), _preserved_rng(), torch.no_grad(), autocast:
        for prompt in prompts:
            given_seed = (prompt.get("seeds") or [None])[0]
            seed = given_seed if given_seed is not None else random.SystemRandom().randint(0, 2**32 - 1)
            settings = BatchSettings(
                width=_floor_size(prompt.get("width", DEFAULT_SIZE)), height=_floor_size(prompt.get("height", DEFAULT_SIZE)),
                steps=int(prompt.get("sample_steps", DEFAULT_STEPS)), scale=float(prompt.get("scale", DEFAULT_SCALE)),
                sampler=check_sampler(prompt.get("sample_sampler"), "--ss") or default_sampler,
            )
            try:
                guides = _guide_images(prompt, len(control_nets))
            except UserError as e:
                logger.error("sample %d skipped: %s", prompt["enum"], e)
                continue
            job = ImageJob(prompt=_replace(prompt["prompt"], replacements),
                           negative_prompt=_replace(prompt.get("negative_prompt"), replacements) or "", seed=seed,
                           guide_images=guides)
            logger.info("sample %d: %s (seed %d, %dx%d)", prompt["enum"], job.prompt[:80], seed, settings.width,
                        settings.height)
            try:
                image = engine.generate([job], settings)[0]
            except NonFiniteOutput as e:  # a sample must not stop training, nor be saved black
                logger.error("sample %d not saved: %s", prompt["enum"], e)
                continue
            except UserError as e:  # e.g. a size ControlNet-LLLite cannot take: that sample only
                logger.error("sample %d skipped: %s", prompt["enum"], e)
                continue
            name = sample_file_name(getattr(args, "output_name", None), step, epoch, prompt["enum"], given_seed,
                                    time.strftime("%Y%m%d%H%M%S", time.localtime()))
            path = os.path.join(folder, name)
            save_png(image, path, image_info(job, settings, sdxl=models.family.is_sdxl, model=None,
                                             control_nets=engine.control_nets))
            saved.append(path)
    return saved
