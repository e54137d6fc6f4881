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

The command-line run (prompt files, seeds, batching, file names) is `run_from_args` at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

import torch

from library.errors import UserError
from library.samplers import make_scheduler

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


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


@dataclass(frozen=True)
class HighresFix:
    scale: float
    steps: int = 28
    strength: Optional[float] = None  # first pass (img2img) strength; None = the batch's strength
    latents_upscaling: bool = False


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
        show_progress: bool = False, conditioner=None,
    ):
        from library.text_encoding import TextConditioner

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
        from library.text_encoding import Conditioning

        parts = []
        for i in range(3 if real_uncond else 2):
            rows = slice(i * count, (i + 1) * count)
            parts.append(Conditioning(cond.context[rows], None if cond.pooled is None else cond.pooled[rows]))
        return parts[0], parts[1], parts[2] if real_uncond else None

    def _sdxl_kwargs(self, settings: BatchSettings, cond, uncond) -> dict:
        target = (settings.height, settings.width)
        original = tuple(settings.original_size or target)
        return dict(
            pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled,
            original_size=original, crops_coords_top_left=tuple(settings.crop), target_size=target,
            negative_original_size=tuple(settings.original_size_negative or original),
            negative_crops_coords_top_left=tuple(settings.crop), negative_target_size=target,
        )

    def generate(self, jobs: Sequence[ImageJob], settings: BatchSettings, output: str = "pil"):
        """Images for `jobs` (PIL list), or their latents (B, 4, h, w) with output="latent"."""
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
                      generator=_per_image_generators(jobs), output_type="latent")
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
        _check_call_arguments(pipe, kwargs)
        with self._negative_guidance(pipe, settings, empty), _quiet_dtype_casts():
            latents = pipe(**kwargs).images
        return latents if output == "latent" else self.decode(latents)

    def decode(self, latents: torch.Tensor) -> list:
        """Latents (scaled, as the U-Net sees them) → PIL images."""
        from PIL import Image

        vae = self.models.vae
        weight = next(vae.parameters())
        count = latents.shape[0]
        per_call = self.vae_batch_size or count
        per_call = max(1, int(count * per_call) if per_call < 1 else int(per_call))
        images = []
        with torch.no_grad():
            for chunk in latents.split(per_call):
                pixels = vae.decode(chunk.to(weight.device, weight.dtype) / vae.config.scaling_factor).sample
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
        return first_images, self.generate(second_jobs, settings)


# =============================================================================================
# Loading for the command line: precision, models, textual inversion, networks


def resolve_dtype(args, device: torch.device) -> torch.dtype:
    """--fp16 needs CUDA (one warning, float32 on CPU); --bf16 works everywhere."""
    if args.fp16 or args.full_fp16:
        if device.type != "cuda":
            logger.warning("--fp16 needs CUDA; generating in float32 on %s instead", device.type)
            return torch.float32
        return torch.float16
    if args.bf16 or args.full_bf16:
        return torch.bfloat16
    return torch.float32


def _read_embedding(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: embedding file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise many kinds for a bad file
        raise UserError(f"{path}: cannot read the embedding ({type(e).__name__}); save it as .safetensors") from None
    if isinstance(data, dict) and "string_to_param" in data:  # AUTOMATIC1111 format
        data = data["string_to_param"]
        data = getattr(data, "_parameters", data)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not an embedding file (expected a dict of tensors)")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def embedding_vectors(path: str, family, text_encoders) -> List[torch.Tensor]:
    """The vectors of an embedding file, one (N, width) tensor per text encoder; checked against the model."""
    data = _read_embedding(path)
    if family.is_sdxl:
        if "clip_l" not in data or "clip_g" not in data:
            raise UserError(f"{path}: not an SDXL embedding (needs clip_l and clip_g tensors, has {sorted(data)}); "
                            f"use an embedding made for SDXL")
        vectors = [data["clip_l"], data["clip_g"]]
    else:
        if "clip_l" in data or "clip_g" in data:
            raise UserError(f"{path}: is an SDXL embedding (clip_l/clip_g) but the model is {family.title}")
        if not data:
            raise UserError(f"{path}: holds no tensors")
        vectors = [next(iter(data.values()))]
    vectors = [v.unsqueeze(0) if v.ndim == 1 else v for v in vectors]
    for vector, encoder in zip(vectors, text_encoders):
        width = encoder.get_input_embeddings().weight.shape[1]
        if vector.ndim != 2 or vector.shape[1] != width:
            raise UserError(f"{path}: vectors of shape {list(vector.shape)} do not fit this {family.title} model "
                            f"(its text encoder takes {width}-wide vectors); use an embedding made for this model")
    if len({v.shape[0] for v in vectors}) > 1:
        raise UserError(f"{path}: clip_l and clip_g have different vector counts")
    return vectors


def load_textual_inversion(paths: Sequence[str], family, tokenizers, text_encoders) -> Callable[[str], str]:
    """Add each file's tokens (`stem`, `stem1`...) and vectors; returns the prompt expander.

    A multi-vector embedding is used by writing its first token: the expander turns `stem` into
    `stem stem1 stem2...`, matching tokens longest-first as the tokenizer does.
    """
    added: List[tuple] = []  # (token strings, vectors per encoder)
    for path in paths:
        vectors = embedding_vectors(path, family, text_encoders)
        stem = os.path.splitext(os.path.basename(path))[0]
        strings = [stem] + [f"{stem}{i}" for i in range(1, vectors[0].shape[0])]
        for tokenizer in tokenizers:
            if tokenizer.add_tokens(strings) != len(strings):
                raise UserError(f"{path}: the token {stem!r} (the file name) is already in the tokenizer; rename the file")
        added.append((strings, vectors))
        logger.info("textual inversion: %s → %d vector(s)", stem, len(strings))
    for tokenizer, encoder, index in zip(tokenizers, text_encoders, range(len(text_encoders))):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for strings, vectors in added:
                ids = tokenizer.convert_tokens_to_ids(strings)
                weight[ids] = vectors[index].to(weight.device, weight.dtype)
    return _token_expander(added)


def _token_expander(added) -> Callable[[str], str]:
    expansions = {strings[0].lower(): " ".join(strings) for strings, _ in added if len(strings) > 1}
    if not expansions:
        return lambda text: text
    every = sorted({s for strings, _ in added for s in strings}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in every), re.IGNORECASE)
    return lambda text: pattern.sub(lambda m: expansions.get(m.group(0).lower(), m.group(0)), text)


def _network_kwargs(text: Optional[str]) -> dict:
    kwargs = {}
    for item in (text or "").split(";"):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"--network_args {text!r}: expected key=value items separated by ';'")
            kwargs[key.strip()] = value.strip()
    return kwargs


def load_networks(args, models, dtype: torch.dtype, device: torch.device):
    """Create, load and apply (or merge) every --network_module; returns (applied networks, multipliers)."""
    modules = args.network_module or []
    merge_count = len(modules) if args.network_merge else (args.network_merge_n_models or 0)
    networks, muls = [], []
    for i, (name, path) in enumerate(zip(modules, args.network_weights or [])):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"--network_module {name}: cannot import it ({e})") from None
        if not os.path.isfile(path):
            raise UserError(f"{path}: network weights file not found")
        mul = args.network_mul[i] if args.network_mul and i < len(args.network_mul) else 1.0
        kwargs = _network_kwargs(args.network_args[i] if args.network_args and i < len(args.network_args) else None)
        if args.network_show_meta and path.endswith(".safetensors"):
            from library.safetensors_io import read_metadata

            logger.info("metadata of %s: %s", path, read_metadata(path))
        encoders = list(models.text_encoders)
        try:
            network, weights = module.create_network_from_weights(mul, path, models.vae, encoders, models.unet,
                                                                  for_inference=True, **kwargs)
        except UserError as e:  # name the file: the plugin's message may not
            raise UserError(str(e) if path in str(e) else f"{path}: {e}") from None
        _check_network_fits(network, weights, path, models.family)
        try:
            if i < merge_count and network.is_mergeable():
                network.merge_to(encoders, models.unet, weights, dtype, device)
                logger.info("merged %s (multiplier %s)", path, mul)
                continue
            network.apply_to(encoders, models.unet)
            network.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # tensor shapes of another model size
            raise UserError(f"{path}: does not fit this {models.family.title} model ({str(e).strip().splitlines()[0]})") from None
        network.to(device, dtype).eval()
        if args.network_pre_calc:
            network.backup_weights()
        networks.append(network)
        muls.append(mul)
    return networks, muls


def _check_network_fits(network, weights: dict, path: str, family) -> None:
    unmatched = getattr(network, "unmatched_modules", None)
    total = {k.partition(".")[0] for k in weights if k.endswith("lora_down.weight")}
    if unmatched is not None and total and len(unmatched) == len(total):
        raise UserError(f"{path}: none of its {len(total)} modules match this {family.title} model "
                        "(made for another model family?)")


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # diffusers warns on every .to(dtype) call, so cast only when the dtype really changes
    module.to(device).eval()
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def build_engine(args, sdxl: Optional[bool] = None) -> GenerationEngine:
    """Load the model, tokenizers, embeddings and networks named by the command line."""
    from types import SimpleNamespace

    from library.device_setup import set_attention
    from library.model_loading import load_models
    from library.tokenizer import load_tokenizers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args, device)
    models = load_models(args.ckpt, v2=True if getattr(args, "v2", False) else None,
                         v_parameterization=True if args.v_parameterization else None,
                         sdxl=True if getattr(args, "sdxl", False) else sdxl, dtype=dtype, vae=args.vae)
    family = models.family
    if getattr(args, "v1", False) and family.name != "sd1":
        raise UserError(f"{args.ckpt}: --v1 was given but the file is a {family.title} model; remove --v1")
    tokenizers = load_tokenizers(family, args.ckpt, args.tokenizer_cache_dir)
    expander = None
    if args.textual_inversion_embeddings:
        expander = load_textual_inversion(args.textual_inversion_embeddings, family, tokenizers, models.text_encoders)
    vae_dtype = torch.float32 if args.no_half_vae or (dtype == torch.float16 and family.is_sdxl) else dtype
    for module, wanted in [(models.unet, dtype), (models.vae, vae_dtype)] + [(te, dtype) for te in models.text_encoders]:
        _place(module, device, wanted)
    set_attention(models.unet, SimpleNamespace(xformers=args.xformers or args.diffusers_xformers), device)
    if args.opt_channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if args.vae_slices:
        models.vae.enable_tiling()
    networks, muls = load_networks(args, models, dtype, device)
    return GenerationEngine(
        models, tokenizers, device, clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples or 1,
        emb_normalize_mode=args.emb_normalize_mode, zero_terminal_snr=args.zero_terminal_snr,
        zero_steps_offset=args.force_scheduler_zero_steps_offset, vae_batch_size=args.vae_batch_size,
        networks=networks, network_default_muls=muls, network_pre_calc=args.network_pre_calc,
        prompt_expander=expander, show_progress=True,
    )


# =============================================================================================
# The command-line run: prompts → per-image (settings, job) → batches → PNG files


def load_images(path: Optional[str], what: str) -> list:
    """An image file, or the images of a folder (sorted); each keeps its path in `.filename`."""
    from PIL import Image

    if not path:
        return []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"{path}: {what} not found")
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder given as {what}")
    images = []
    for file in files:
        try:
            image = Image.open(file)
            image.load()
        except OSError as e:
            raise UserError(f"{file}: cannot read the image ({e})") from None
        image.filename = file
        images.append(image)
    return images


class CommandLineRun:
    """One gen_img run: turns prompt dicts into jobs, batches them, saves the images."""

    def __init__(self, args, engine: GenerationEngine, images: list, masks: list, seeds):
        self.args, self.engine, self.images, self.masks, self.seeds = args, engine, images, masks, seeds
        self.number = 0
        self.batch: List[ImageJob] = []
        self.settings: Optional[BatchSettings] = None
        self.fix = (HighresFix(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                               args.highres_fix_latents_upscaling) if args.highres_fix_scale else None)
        self.model_name = os.path.splitext(os.path.basename(os.path.normpath(args.ckpt)))[0]

    def add_entry(self, entry: dict, iteration_seed: Optional[int]) -> None:
        """Queue the images of one prompt; the batch is flushed when settings change or it is full."""
        from PIL import Image

        from library.prompt_options import dynamic_prompt, image_settings

        for k in range(self.args.images_per_prompt):
            seed = self.seeds.seed_for(entry.get("seeds") or [], k, iteration_seed)
            image = self.images[self.number % len(self.images)] if self.images else None
            mask = self.masks[self.number % len(self.masks)] if self.masks else None
            settings = BatchSettings(**image_settings(entry, self.args, self.engine.family.is_sdxl,
                                                      image.size if image else None))
            size = (settings.width, settings.height)
            name = entry.get("filename")
            if name and self.args.images_per_prompt > 1:
                name = "{0}_{2}{1}".format(*os.path.splitext(name), k)
            job = ImageJob(
                prompt=dynamic_prompt(entry["prompt"], seed), negative_prompt=entry.get("negative_prompt") or "",
                seed=seed, init_image=image.convert("RGB").resize(size, Image.LANCZOS) if image else None,
                mask_image=mask.convert("L").resize(size, Image.LANCZOS) if mask else None,
                filename=name, source_name=getattr(image, "filename", None), number=self.number,
            )
            if self.batch and (settings != self.settings or len(self.batch) >= self.args.batch_size):
                self.flush()
            self.batch.append(job)
            self.settings = settings
            self.number += 1

    def flush(self) -> None:
        if not self.batch:
            return
        jobs, settings, self.batch = self.batch, self.settings, []
        logger.info("generating %d image(s): %s", len(jobs), jobs[0].prompt[:80])
        if not self.fix:
            self._save(jobs, self.engine.generate(jobs, settings), settings, "")
            return
        first, final = self.engine.generate_highres(jobs, settings, self.fix)
        if first is not None and self.args.highres_fix_save_1st:
            width, height = first[0].size
            self._save(jobs, first, replace(settings, width=width, height=height, steps=self.fix.steps), "0")
        self._save(jobs, final, settings, "1")

    def _networks_text(self, settings: BatchSettings) -> Optional[str]:
        if not self.engine.networks:
            return None
        muls = settings.network_muls or self.engine.network_default_muls
        files = self.args.network_weights[-len(self.engine.networks):]  # merged ones come first
        return ", ".join(f"{os.path.splitext(os.path.basename(f))[0]}:{m}" for f, m in zip(files, muls))

    def _save(self, jobs: Sequence[ImageJob], images: list, settings: BatchSettings, hires_prefix: str) -> None:
        from library.png_info import first_available, image_info, output_name, save_png

        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        for i, (job, image) in enumerate(zip(jobs, images)):
            original = job.source_name if self.args.use_original_file_name else None
            name = output_name(stamp, job.seed, i, job.number + 1, sequential=self.args.sequential_file_name,
                               hires_prefix=hires_prefix, original=original, explicit=job.filename)
            path = os.path.join(self.args.outdir, first_available(self.args.outdir, name))
            info = image_info(job, settings, sdxl=self.engine.family.is_sdxl, model=self.model_name,
                              clip_skip=self.args.clip_skip, hires=self.fix, networks=self._networks_text(settings))
            save_png(image, path, info)
            logger.info("saved %s", path)


def run_from_args(args, sdxl: Optional[bool] = None) -> int:
    """gen_img.py / sdxl_gen_img.py after argument parsing: returns the exit status."""
    from library.gen_args import check_args
    from library.prompt_options import SeedPlan, iter_prompt_entries

    check_args(args)
    images = load_images(args.image_path, "--image_path")
    masks = load_images(args.mask_path, "--mask_path")
    entries = iter_prompt_entries(args, images)
    iterations = 1 if args.interactive else args.n_iter
    if not args.interactive:
        entries = list(entries)
    single = not args.interactive and iterations * len(entries) * args.images_per_prompt == 1
    engine = build_engine(args, sdxl)
    os.makedirs(args.outdir, exist_ok=True)
    seeds = SeedPlan(args.seed, single)
    run = CommandLineRun(args, engine, images, masks, seeds)
    for _ in range(iterations):
        iteration_seed = seeds.iteration_seed(args.iter_same_seed)
        order = entries
        if args.shuffle_prompts and not args.interactive:
            order = list(entries)
            seeds.random.shuffle(order)
        for entry in order:
            run.add_entry(entry, iteration_seed)
            if args.interactive:
                run.flush()  # show each answer before reading the next prompt
    run.flush()
    return 0
