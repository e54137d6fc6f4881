"""The image generator behind gen_img.py, sdxl_gen_img.py and the trainers' sample images.

`GenerationEngine` runs diffusers' own pipelines (txt2img, img2img, inpaint; SD and SDXL variants)
built from models we already hold — nothing is loaded from a hub. Prompts are encoded here, by the
family's `TextConditioner`, and handed over as `prompt_embeds` (+ pooled for SDXL), so long prompts,
`(word:1.2)` weights and textual-inversion tokens behave as in sd-scripts.

Other rules:
* Every image has its own `torch.Generator` seeded with its seed, so an image depends on its seed
  and settings only, not on the batch it was made in.
* `--negative_scale` (sd-scripts' third guidance branch: uncond = empty prompt, the negative prompt
  pushed away with its own scale) works by handing the pipeline a U-Net stand-in that computes all
  three predictions and returns the finished guidance in both CFG halves, so the pipeline's own
  `u + s·(c − u)` leaves it unchanged.
* Highres fix: a first pass at a fraction of the size, upscaled (image Lanczos or latent bilinear),
  then img2img at full size with seed + 1 (sd-scripts' order).
* Latents are decoded here (in the VAE's dtype, `vae_batch_size` at a time), not by the pipeline.
* Nothing non-finite becomes an image: the text-encoder output, the latents after every sampler step
  and the decoded pixels are checked, and the first NaN/inf stops generation (`NonFiniteOutput`, one
  line naming the step and what was not finite) instead of a black image cast from NaN.

ControlNet-LLLite networks (`control_nets`) steer each image with its job's guide images
(library/generation/control.py); the highres fix's first pass is steered too, the second unless
`--highres_fix_disable_control_net`.

Loading what a command line names (model, embeddings, networks) into an engine is
library/generation/loading.py; the command-line run (prompt files, seeds, batching, file names) is
library/generation/run.py.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

import torch

from library.errors import UserError
from library.generation.samplers import make_scheduler


class NonFiniteOutput(UserError):
    """Generation produced NaN/inf (text encoder, a sampler step or the VAE); nothing is saved from it."""


@dataclass(frozen=True)
class BatchSettings:
    """Everything the images of one batch share (sd-scripts starts a new batch when any of it changes)."""

    width: int
    height: int
    steps: int = 30
    scale: float = 7.5
    negative_scale: Optional[float] = None
    strength: float = 0.8
    sampler: str = "ddim"
    original_size: Optional[tuple] = None  # SDXL (height, width); None = target size
    original_size_negative: Optional[tuple] = None  # None = original_size
    crop: tuple = (0, 0)  # SDXL (top, left)
    network_muls: Optional[tuple] = None  # per network; None = the defaults


@dataclass
class ImageJob:
    """One image to make: its prompt, seed and (img2img / inpainting) inputs."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    init_image: object = None  # PIL image at the batch size
    mask_image: object = None  # PIL image, white = repaint
    init_latents: Optional[torch.Tensor] = None  # (4, h, w): img2img from latents (highres fix)
    filename: Optional[str] = None  # --f
    source_name: Optional[str] = None  # file name of init_image (--use_original_file_name)
    number: int = 0  # position in the run (--sequential_file_name)
    guide_images: tuple = ()  # ControlNet-LLLite hints (PIL), one per control network


@dataclass(frozen=True)
class HighresFix:
    scale: float
    steps: int = 28
    strength: Optional[float] = None  # first pass (img2img) strength; None = the batch's strength
    latents_upscaling: bool = False
    disable_control_net: bool = False  # the second pass runs without ControlNet-LLLite


@contextlib.contextmanager
def _quiet_dtype_casts():
    """SDXL img2img calls vae.to(float32) (force_upcast) even when it already is; diffusers then warns
    about casting on every batch. The cast is harmless here, so that logger is muted meanwhile."""
    cast_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = cast_logger.level
    cast_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cast_logger.setLevel(level)


def _check_call_arguments(pipe, kwargs: dict) -> None:
    # pipelines take **kwargs and drop unknown names silently: a misspelt argument must not go unnoticed
    import inspect

    unknown = set(kwargs) - set(inspect.signature(pipe.__call__).parameters)
    if unknown:
        raise TypeError(f"{type(pipe).__name__} has no argument(s) {sorted(unknown)}")


def _per_image_generators(jobs: Sequence[ImageJob]) -> List[torch.Generator]:
    # CPU generators: the same seed gives the same image on any device
    return [torch.Generator("cpu").manual_seed(int(job.seed)) for job in jobs]


class NegativeGuidanceUNet(torch.nn.Module):
    """U-Net stand-in for `--negative_scale`: guidance = u + s·(c − u) − ns·(n − u), u = empty prompt.

    The pipeline passes [negative; positive] halves; the empty-prompt third is appended here.
    """

    def __init__(self, unet, uncond_context, uncond_pooled, scale: float, negative_scale: float):
        super().__init__()
        self.unet = unet
        self.uncond_context = uncond_context
        self.uncond_pooled = uncond_pooled
        self.scale = scale
        self.negative_scale = negative_scale

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)  # config, dtype, device, add_embedding... of the real U-Net

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        half = sample.shape[0] // 2
        context = torch.cat([encoder_hidden_states, self.uncond_context.to(encoder_hidden_states)])
        if added_cond_kwargs:
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            added_cond_kwargs = dict(
                added_cond_kwargs,
                text_embeds=torch.cat([text_embeds, self.uncond_pooled.to(text_embeds)]),
                time_ids=torch.cat([time_ids, time_ids[:half]]),  # the negative side's size conditioning
            )
        kwargs["return_dict"] = False
        out = self.unet(torch.cat([sample, sample[:half]]), timestep, context, added_cond_kwargs=added_cond_kwargs,
                        **kwargs)[0]
        negative, positive, uncond = out.chunk(3)
        guided = uncond + self.scale * (positive - uncond) - self.negative_scale * (negative - uncond)
        return (torch.cat([guided, guided]),)


class GenerationEngine:
    """Generates batches of images from loaded models (see the module docstring)."""

    def __init__(
        self, models, tokenizers, device, *, clip_skip: Optional[int] = None, max_embeddings_multiples: int = 1,
        emb_normalize_mode: str = "original", zero_terminal_snr: bool = False, zero_steps_offset: bool = False,
        vae_batch_size: Optional[float] = None, networks: Sequence = (), network_default_muls: Sequence = (),
        network_pre_calc: bool = False, prompt_expander: Optional[Callable[[str], str]] = None,
        show_progress: bool = False, conditioner=None, control_nets: Sequence = (),
    ):
        from library.text.encoding import TextConditioner

        self.models = models
        self.family = models.family
        self.tokenizers = list(tokenizers)
        self.device = torch.device(device)
        self.conditioner = conditioner or TextConditioner(self.family, self.tokenizers, models.text_encoders)
        self.clip_skip = clip_skip
        self.max_embeddings_multiples = max_embeddings_multiples
        self.emb_normalize_mode = emb_normalize_mode
        self.zero_terminal_snr = zero_terminal_snr
        self.zero_steps_offset = zero_steps_offset
        self.vae_batch_size = vae_batch_size
        self.networks = list(networks)
        self.network_default_muls = list(network_default_muls) or [1.0] * len(self.networks)
        self.network_pre_calc = network_pre_calc
        self.expand_prompt = prompt_expander or (lambda text: text)
        self.show_progress = show_progress
        self.control_nets = list(control_nets)  # library.generation.control.ControlNet
        self._pipelines = {}

    # --- pipelines ----------------------------------------------------------------------------

    def _pipeline(self, kind: str):
        """The diffusers pipeline of this family for "txt2img" / "img2img" / "inpaint", made once."""
        if kind not in self._pipelines:
            import diffusers

            prefix = "StableDiffusionXL" if self.family.is_sdxl else "StableDiffusion"
            suffix = {"txt2img": "Pipeline", "img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}[kind]
            m = self.models
            parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=self.tokenizers[0], unet=m.unet,
                         scheduler=make_scheduler("ddim"))
            if self.family.is_sdxl:
                parts.update(text_encoder_2=m.text_encoders[1], tokenizer_2=self.tokenizers[1], add_watermarker=False)
            else:
                parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe = getattr(diffusers, prefix + suffix)(**parts)
            pipe.set_progress_bar_config(disable=not self.show_progress, leave=False)
            self._pipelines[kind] = pipe
        return self._pipelines[kind]

    @contextlib.contextmanager
    def _negative_guidance(self, pipe, settings: BatchSettings, uncond):
        if settings.negative_scale is None or settings.scale <= 1.0:
            yield
            return
        original = pipe.unet
        pipe.unet = NegativeGuidanceUNet(original, uncond.context, uncond.pooled, settings.scale,
                                         settings.negative_scale)
        try:
            yield
        finally:
            pipe.unet = original

    # --- one batch ----------------------------------------------------------------------------

    def _set_network_multipliers(self, muls: Optional[Sequence[float]]) -> None:
        if not self.networks:
            return
        muls = list(muls or self.network_default_muls)
        muls += [muls[-1]] * (len(self.networks) - len(muls))  # --am 0.5 applies to every network
        for network, mul in zip(self.networks, muls):
            network.set_multiplier(mul)
        if self.network_pre_calc:
            for network in self.networks:
                network.restore_weights()
            for network in self.networks:
                network.pre_calculation()

    def encode(self, prompts: Sequence[str], negatives: Sequence[str], real_uncond: bool = False):
        """(positive, negative, empty-prompt or None) conditionings, all with the same token length."""
        texts = [self.expand_prompt(t) for t in list(prompts) + list(negatives)]
        count = len(prompts)
        if real_uncond:
            texts += [""] * count
        with torch.no_grad():
            cond = self.conditioner.encode_weighted(texts, self.max_embeddings_multiples, self.clip_skip,
                                                    self.emb_normalize_mode)
        from library.text.encoding import Conditioning

        self._check_finite_conditioning(cond.context, texts)
        parts = []
        for i in range(3 if real_uncond else 2):
            rows = slice(i * count, (i + 1) * count)
            parts.append(Conditioning(cond.context[rows], None if cond.pooled is None else cond.pooled[rows]))
        return parts[0], parts[1], parts[2] if real_uncond else None

    def _hint(self) -> str:
        hints = []
        if self.networks:
            hints.append("check the network files and --network_mul")
        dtype = next(self.models.unet.parameters()).dtype
        if dtype == torch.float16:
            hints.append("float16 may overflow: try --bf16 or float32 (and --no_half_vae)")
        return "; " + ", ".join(hints) if hints else ""

    def _check_finite_conditioning(self, context: torch.Tensor, texts: Sequence[str]) -> None:
        finite = torch.isfinite(context).flatten(1).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise NonFiniteOutput(
                f"generation stopped before step 1: the text encoder's output for the prompt {texts[row]!r} is not "
                f"finite (NaN/inf); no image was saved{self._hint()}")

    def _step_check(self, pipe, step: int, timestep, tensors: dict) -> dict:
        # the pipelines' callback_on_step_end: called with the latents after every sampler step
        latents = tensors.get("latents")
        if latents is not None and not bool(torch.isfinite(latents).all()):
            raise NonFiniteOutput(
                f"generation stopped at step {step + 1} of {pipe.num_timesteps}: the latents are not finite "
                f"(NaN/inf in the U-Net's prediction); no image was saved{self._hint()}")
        return tensors

    def _sdxl_kwargs(self, settings: BatchSettings, cond, uncond) -> dict:
        target = (settings.height, settings.width)
        original = tuple(settings.original_size or target)
        return dict(
            pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled,
            original_size=original, crops_coords_top_left=tuple(settings.crop), target_size=target,
            negative_original_size=tuple(settings.original_size_negative or original),
            negative_crops_coords_top_left=tuple(settings.crop), negative_target_size=target,
        )

    def generate(self, jobs: Sequence[ImageJob], settings: BatchSettings, output: str = "pil", control: bool = True):
        """Images for `jobs` (PIL list), or their latents (B, 4, h, w) with output="latent".
        control=False: without the control networks (highres fix's second pass when asked)."""
        from library.generation.control import steer

        self._set_network_multipliers(settings.network_muls)
        negative_scale = settings.negative_scale is not None and settings.scale > 1.0
        cond, uncond, empty = self.encode([j.prompt for j in jobs], [j.negative_prompt for j in jobs], negative_scale)
        if jobs[0].mask_image is not None:
            kind = "inpaint"
        elif jobs[0].init_image is not None or jobs[0].init_latents is not None:
            kind = "img2img"
        else:
            kind = "txt2img"
        pipe = self._pipeline(kind)
        pipe.scheduler = make_scheduler(settings.sampler, self.models.v_parameterization, self.zero_terminal_snr,
                                        self.zero_steps_offset)
        kwargs = dict(prompt_embeds=cond.context, negative_prompt_embeds=uncond.context,
                      num_inference_steps=settings.steps, guidance_scale=settings.scale,
                      generator=_per_image_generators(jobs), output_type="latent",
                      callback_on_step_end=self._step_check)
        if kind != "img2img":
            kwargs.update(height=settings.height, width=settings.width)
        if kind != "txt2img":
            kwargs["strength"] = settings.strength
            if jobs[0].init_latents is not None:
                kwargs["image"] = torch.stack([j.init_latents for j in jobs]).to(self.device, cond.context.dtype)
            else:
                kwargs["image"] = [j.init_image for j in jobs]
        if kind == "inpaint":
            kwargs["mask_image"] = [j.mask_image for j in jobs]
        if self.family.is_sdxl:
            kwargs.update(self._sdxl_kwargs(settings, cond, uncond))
        with steer(self.control_nets if control else [], jobs, settings.width, settings.height, self.device, kwargs):
            _check_call_arguments(pipe, kwargs)
            with self._negative_guidance(pipe, settings, empty), _quiet_dtype_casts():
                latents = pipe(**kwargs).images
        return latents if output == "latent" else self.decode(latents)

    def decode(self, latents: torch.Tensor) -> list:
        """Latents (scaled, as the U-Net sees them) → PIL images."""
        from PIL import Image

        from library.models.frozen_weights import compute_dtype

        vae = self.models.vae
        device, dtype = next(vae.parameters()).device, compute_dtype(vae)
        count = latents.shape[0]
        per_call = self.vae_batch_size or count
        per_call = max(1, int(count * per_call) if per_call < 1 else int(per_call))
        if not bool(torch.isfinite(latents).all()):
            raise NonFiniteOutput(f"generation stopped before decoding: the latents are not finite (NaN/inf); "
                                  f"no image was saved{self._hint()}")
        images = []
        with torch.no_grad():
            for chunk in latents.split(per_call):
                pixels = vae.decode(chunk.to(device, dtype) / vae.config.scaling_factor).sample
                if not bool(torch.isfinite(pixels).all()):
                    raise NonFiniteOutput(
                        "generation stopped after the last step: the VAE decoded non-finite pixels (NaN/inf) from "
                        f"finite latents; no image was saved{self._hint()}")
                pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
                images += [Image.fromarray((p * 255).round().astype("uint8")) for p in pixels]
        return images

    # --- highres fix --------------------------------------------------------------------------

    def generate_highres(self, jobs: Sequence[ImageJob], settings: BatchSettings, fix: HighresFix):
        """(first pass images or None, final images). First pass size is rounded down to a multiple of 32."""
        from PIL import Image

        def scaled(value):
            return None if value is None else int(value * fix.scale + 0.5)

        width, height = max(64, scaled(settings.width) // 32 * 32), max(64, scaled(settings.height) // 32 * 32)
        first = replace(
            settings, width=width, height=height, steps=fix.steps,
            strength=settings.strength if fix.strength is None else fix.strength,
            original_size=tuple(scaled(v) for v in settings.original_size) if settings.original_size else None,
            original_size_negative=(tuple(scaled(v) for v in settings.original_size_negative)
                                    if settings.original_size_negative else None),
            crop=tuple(scaled(v) for v in settings.crop),
        )
        first_jobs = [replace(j, init_image=j.init_image.resize((width, height), Image.LANCZOS) if j.init_image
                              else None, mask_image=j.mask_image.resize((width, height), Image.LANCZOS)
                              if j.mask_image else None) for j in jobs]
        latents = self.generate(first_jobs, first, output="latent")
        first_images = None
        if fix.latents_upscaling:
            upscaled = torch.nn.functional.interpolate(
                latents.float(), (settings.height // 8, settings.width // 8), mode="bilinear").to(latents.dtype)
            second_jobs = [replace(j, seed=j.seed + 1, init_image=None, mask_image=None, init_latents=u)
                           for j, u in zip(jobs, upscaled)]
        else:
            first_images = self.decode(latents)
            second_jobs = [replace(j, seed=j.seed + 1, mask_image=None, init_latents=None,
                                   init_image=im.resize((settings.width, settings.height), Image.LANCZOS))
                           for j, im in zip(jobs, first_images)]
        return first_images, self.generate(second_jobs, settings, control=not fix.disable_control_net)
