"""Command-line flags of `gen_img.py` / `sdxl_gen_img.py`, as sd-scripts names them (spec: cli-flags.md §4).

Plain argparse, no torch: `--help` answers at once. Flags of sd-scripts features this generator does
not implement (the original ControlNet, Deep Shrink, Gradual Latent, CLIP Vision, prompter modules,
upscaler modules, regional LoRA) are still accepted by the parser so that existing command lines
parse; `check_args` turns their use into the one line `library.refused_options` keeps for each.
ControlNet-LLLite (`--control_net_lllite_models` ...) is implemented (library/generation/control.py).
"""

from __future__ import annotations

import argparse

from library.cli import apply_console_log_flags
from library.errors import UserError
from library.refused_options import refuse_set_options
from library.generation.samplers import SAMPLER_CHOICES

def _model_flags(parser: argparse.ArgumentParser, sdxl_only: bool) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--ckpt", type=str, default=None, help="model: .safetensors/.ckpt file or diffusers folder")
    g.add_argument("--vae", type=str, default=None, help="replace the model's VAE (file or folder)")
    if not sdxl_only:
        g.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected from the file anyway)")
        g.add_argument("--v1", action="store_true", help="the model is SD1.x (detected from the file anyway)")
        g.add_argument("--v2", action="store_true", help="the model is SD2.x (detected from the file anyway)")
    g.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD2 768-v models)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="sample with a zero-terminal-SNR schedule")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder of saved tokenizers (offline)")
    g.add_argument("--fp16", action="store_true", help="run in float16 (CUDA; float32 on CPU)")
    g.add_argument("--bf16", action="store_true", help="run in bfloat16")
    g.add_argument("--full_fp16", action="store_true", help="same as --fp16")
    g.add_argument("--full_bf16", action="store_true", help="same as --bf16")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA); SDPA otherwise")
    g.add_argument("--sdpa", action="store_true", help="PyTorch SDPA attention (the default)")
    g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers")
    g.add_argument("--opt_channels_last", action="store_true", help="channels-last memory format for the U-Net")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32")
    g.add_argument("--vae_batch_size", type=float, default=None, help="images per VAE call (< 1: fraction of batch)")
    g.add_argument("--vae_slices", type=int, default=None, help="decode the VAE in tiles to save memory")


def _prompt_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompts and output")
    g.add_argument("--prompt", type=str, default=None, help="prompt, may carry options: 'a cat --n dog --d 42'")
    g.add_argument("--from_file", type=str, default=None, help="prompts file: one per line, or .toml/.json")
    g.add_argument("--from_module", type=str, default=None, help="(sd-scripts prompter module; not supported)")
    g.add_argument("--prompter_module_args", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--interactive", action="store_true", help="read prompts from standard input until EOF")
    g.add_argument("--no_preview", action="store_true", help="accepted for compatibility; no preview window")
    g.add_argument("--shuffle_prompts", action="store_true", help="shuffle the prompts in each iteration")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt")
    g.add_argument("--n_iter", type=int, default=1, help="repeat all prompts this many times")
    g.add_argument("--batch_size", type=int, default=1, help="images per U-Net batch")
    g.add_argument("--seed", type=int, default=None, help="seed (one image) or seed of the seeds (several)")
    g.add_argument("--iter_same_seed", action="store_true", help="one seed for all prompts of an iteration")
    g.add_argument("--outdir", type=str, default="outputs", help="output folder")
    g.add_argument("--sequential_file_name", action="store_true", help="name images im_000001.png, ...")
    g.add_argument("--use_original_file_name", action="store_true", help="img2img: name images like their source")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=50, help="sampling steps")
    g.add_argument("--sampler", type=str, default="ddim", choices=SAMPLER_CHOICES + ("ddpm",), help="sampler")
    g.add_argument("--scale", type=float, default=7.5, help="guidance (CFG) scale")
    g.add_argument("--negative_scale", type=float, default=None,
                   help="separate guidance for the negative prompt (the empty prompt becomes the unconditional)")
    g.add_argument("--H", type=int, default=None, help="image height (default 512, SDXL 1024)")
    g.add_argument("--W", type=int, default=None, help="image width (default 512, SDXL 1024)")
    g.add_argument("--original_height", type=int, default=None, help="SDXL original-size conditioning")
    g.add_argument("--original_width", type=int, default=None, help="SDXL original-size conditioning")
    g.add_argument("--original_height_negative", type=int, default=None, help="SDXL negative original size")
    g.add_argument("--original_width_negative", type=int, default=None, help="SDXL negative original size")
    g.add_argument("--crop_top", type=int, default=None, help="SDXL crop conditioning")
    g.add_argument("--crop_left", type=int, default=None, help="SDXL crop conditioning")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="text encoder layer from the end (default: what the model family is trained with)")
    g.add_argument("--max_embeddings_multiples", type=int, default=None, help="prompt length limit = 75 × this")
    g.add_argument("--emb_normalize_mode", type=str, default="original", choices=["original", "none", "abs"],
                   help="after weighting: restore the mean (original), the mean |x| (abs) or nothing (none)")
    g.add_argument("--force_scheduler_zero_steps_offset", action="store_true", help="scheduler steps_offset 0")
    g.add_argument("--image_path", type=str, default=None, help="img2img source image or folder")
    g.add_argument("--mask_path", type=str, default=None, help="inpainting mask image or folder (white = repaint)")
    g.add_argument("--strength", type=float, default=None, help="img2img strength (default 0.8)")


def _network_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("networks and embeddings")
    g.add_argument("--network_module", type=str, default=None, nargs="*", help="network modules (networks.lora)")
    g.add_argument("--network_weights", type=str, default=None, nargs="*", help="network files, one per module")
    g.add_argument("--network_mul", type=float, default=None, nargs="*", help="multipliers, one per network")
    g.add_argument("--network_args", type=str, default=None, nargs="*", help="per network: 'k=v;k2=v2'")
    g.add_argument("--network_show_meta", action="store_true", help="print each network file's metadata")
    g.add_argument("--network_merge", action="store_true", help="merge all networks into the model weights")
    g.add_argument("--network_merge_n_models", type=int, default=None, help="merge the first N networks")
    g.add_argument("--network_pre_calc", action="store_true", help="fold networks into weights per batch")
    g.add_argument("--network_regional_mask_max_color_codes", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--textual_inversion_embeddings", type=str, default=None, nargs="*",
                   help="embedding files; the token is the file name without extension")


def _highres_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("highres fix")
    g.add_argument("--highres_fix_scale", type=float, default=None, help="enable: first pass at this size ratio")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="first pass steps")
    g.add_argument("--highres_fix_strength", type=float, default=None, help="first pass img2img strength")
    g.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first pass images")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true", help="upscale latents, not images")
    g.add_argument("--highres_fix_upscaler", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--highres_fix_upscaler_args", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="run the second pass without ControlNet-LLLite")


def _control_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ControlNet-LLLite (SDXL)")
    g.add_argument("--control_net_lllite_models", type=str, default=None, nargs="*",
                   help="ControlNet-LLLite files (ours or sd-scripts'); several steer together")
    g.add_argument("--guide_image_path", type=str, default=None, nargs="*",
                   help="hint images (files or folders): one for every model, or one per model for each image in turn")
    g.add_argument("--control_net_multipliers", type=float, default=None, nargs="*",
                   help="strength of each LLLite model (default 1.0; 0 = the base model's image)")
    g.add_argument("--control_net_ratios", type=float, default=None, nargs="*",
                   help="fraction of the sampling steps each LLLite model steers (default 1.0: all)")


def _unsupported_flags(parser: argparse.ArgumentParser) -> None:
    """sd-scripts flags kept for command-line compatibility (see `check_args`)."""
    hidden = argparse.SUPPRESS
    for name in ("--control_net_models", "--control_net_preps"):
        parser.add_argument(name, type=str, default=None, nargs="*", help=hidden)
    parser.add_argument("--control_net_weights", type=float, default=None, nargs="*", help=hidden)
    parser.add_argument("--clip_vision_strength", type=float, default=None, help=hidden)
    parser.add_argument("--ds_depth_1", type=int, default=None, help=hidden)
    parser.add_argument("--ds_timesteps_1", type=int, default=650, help=hidden)
    parser.add_argument("--ds_depth_2", type=int, default=None, help=hidden)
    parser.add_argument("--ds_timesteps_2", type=int, default=650, help=hidden)
    parser.add_argument("--ds_ratio", type=float, default=0.5, help=hidden)
    parser.add_argument("--gradual_latent_timesteps", type=int, default=None, help=hidden)
    parser.add_argument("--gradual_latent_ratio", type=float, default=0.5, help=hidden)
    parser.add_argument("--gradual_latent_ratio_step", type=float, default=0.125, help=hidden)
    parser.add_argument("--gradual_latent_every_n_steps", type=int, default=3, help=hidden)
    parser.add_argument("--gradual_latent_s_noise", type=float, default=1.0, help=hidden)
    parser.add_argument("--gradual_latent_unsharp_params", type=str, default=None, help=hidden)
    parser.add_argument("--pyramid_noise_prob", type=float, default=None, help=hidden)
    parser.add_argument("--pyramid_noise_discount_range", type=float, default=None, nargs=2, help=hidden)
    parser.add_argument("--noise_offset_prob", type=float, default=None, help=hidden)
    parser.add_argument("--noise_offset_range", type=float, default=None, nargs=2, help=hidden)


def build_parser(sdxl_only: bool = False, description: str = "") -> argparse.ArgumentParser:
    """The generator's parser; `sdxl_only` (sdxl_gen_img.py) drops --sdxl/--v1/--v2."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--console_log_level", type=str, default=None,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="log level")
    parser.add_argument("--console_log_file", type=str, default=None, help="also log to this file")
    parser.add_argument("--console_log_simple", action="store_true", help="plain log lines")
    _model_flags(parser, sdxl_only)
    _prompt_flags(parser)
    _sampling_flags(parser)
    _network_flags(parser)
    _highres_flags(parser)
    _control_flags(parser)
    _unsupported_flags(parser)
    parser.set_defaults(sdxl_only=sdxl_only)
    return parser


def check_args(args) -> None:
    """Refuse flags of features not implemented here, and obviously bad values, before loading anything."""
    refuse_set_options(args)
    apply_console_log_flags(args)
    if not args.ckpt:
        raise UserError("--ckpt is required: a local .safetensors/.ckpt file or diffusers folder")
    if sum(bool(getattr(args, f, False)) for f in ("sdxl", "v1", "v2")) > 1:
        raise UserError("--sdxl, --v1 and --v2 exclude each other; give at most one (the file tells anyway)")
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    for flag in ("W", "H"):
        value = getattr(args, flag)
        if value is not None and value < 64:
            raise UserError(f"--{flag} {value} is too small; use at least 64 (a multiple of 8)")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength {args.strength} must be between 0 and 1")
    if args.highres_fix_scale is not None and not 0.0 < args.highres_fix_scale <= 1.0:
        raise UserError(f"--highres_fix_scale {args.highres_fix_scale} must be in (0, 1]: it sizes the first pass")
    if args.mask_path and not args.image_path:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")
    modules, weights = args.network_module or [], args.network_weights or []
    if len(weights) < len(modules):
        raise UserError(f"--network_weights: {len(modules)} network modules but {len(weights)} weight files")
    if args.network_args and len(args.network_args) > len(modules):
        raise UserError("--network_args: more entries than --network_module entries")
    _check_control_args(args)


def _check_control_args(args) -> None:
    models = args.control_net_lllite_models or []
    if models and not args.guide_image_path:
        raise UserError("--control_net_lllite_models needs --guide_image_path: the hint image(s) to follow")
    if args.guide_image_path and not models:
        raise UserError("--guide_image_path: guide images are used by --control_net_lllite_models only; add the "
                        "LLLite file(s) or remove the flag")
    for flag in ("control_net_multipliers", "control_net_ratios"):
        values = getattr(args, flag) or []
        if values and not models:
            raise UserError(f"--{flag}: needs --control_net_lllite_models")
        if len(values) > len(models):
            raise UserError(f"--{flag}: {len(values)} values for {len(models)} --control_net_lllite_models file(s)")
    for ratio in args.control_net_ratios or []:
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"--control_net_ratios {ratio}: must be between 0 and 1 (the fraction of the steps)")
    if args.highres_fix_disable_control_net and not models:
        raise UserError("--highres_fix_disable_control_net: needs --control_net_lllite_models")
