"""Encode the latents of a dataset into the disk cache, exactly where a training run looks them up.

    python tools/cache_latents.py --pretrained_model_name_or_path MODEL --train_data_dir DIR --resolution 512 \
        [--enable_bucket ...] [--flip_aug] [--vae_batch_size 4] [--cache_dir DIR]

Pass the training run's own command line or --config_file (as with sd-scripts' tool, every trainer
option is accepted; those that do not change the cache are named in one line and ignored): the cache
is keyed on image contents, crop, flip and VAE weights, so the run then finds every entry and
encodes nothing. Entries already cached and intact are skipped (`--skip_existing` is accepted for
compatibility; skipping is always on). Only the VAE is read from the checkpoint. With --masked_loss,
ControlNet subsets (conditioning_data_dir: loss masks, ControlNet-LLLite hints) are cached with their
conditioning images, as the masked-loss and LLLite trainers read them.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.data.flags import add_config_arguments, add_dataset_arguments  # noqa: E402
from library.caching.settings import add_cache_arguments  # noqa: E402
from library.training.train_args import add_masked_loss_arguments  # noqa: E402
from library.training.trainer_options import add_trainer_options, report_ignored  # noqa: E402

TRAINER_OPTIONS = ("config file (every other option of the trainers is accepted too, so a training command line or "
                   "config runs unchanged; those that do not change the cache are named in one line and ignored)")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Model flags shared by the cache tools (names as in sd-scripts)."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder (never downloaded)")
    g.add_argument("--v2", action="store_true", help="the model is SD2.x (detected anyway; a contradiction is an error)")
    g.add_argument("--v_parameterization", action="store_true", help="accepted for compatibility (no effect on caches)")
    g.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected anyway; a contradiction is an error)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="precision of the models while encoding; use the training run's value")
    g.add_argument("--skip_existing", action="store_true", help="accepted for compatibility: intact entries are always kept")
    g.add_argument("--max_data_loader_n_workers", type=int, default=None, help="image-decoding threads (default: up to 4)")


def add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The trainer's dataset flags, read as a training run reads them (shared by the cache tools)."""
    add_dataset_arguments(parser, support_dreambooth=True, support_caption=True, support_caption_dropout=True)
    add_config_arguments(parser)
    add_masked_loss_arguments(parser)
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="leave out unusable images with one warning, as the training run does")


def build_parser():
    """(parser, the trainer options it accepts but ignores)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--vae", type=str, default=None, help="use this VAE (file or diffusers folder) instead of the model's")
    p.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under --mixed_precision")
    add_dataset_flags(p)
    add_cache_arguments(p, support_text_encoder_caching=False, trainer=False)
    return p, add_trainer_options(p, TRAINER_OPTIONS)


def parse_tool_args(build, argv):
    """The tool's arguments from its command line and --config_file, as a trainer reads them."""
    from library.errors import UserError
    from library.training.train_args import parse_args

    parser, ignored = build()
    args = parse_args(parser, argv)
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (the training run's model)")
    report_ignored(args, parser, ignored)
    return args


def model_dtype(args, device):
    """The models' dtype for --mixed_precision on `device`, resolved as a training run resolves it
    (`device_setup.resolve_precision`: fp16 needs CUDA, bf16 a CPU with bf16 kernels)."""
    from library.models.device_setup import resolve_precision

    only = argparse.Namespace(mixed_precision=args.mixed_precision, full_fp16=False, full_bf16=False, fp8_base=False)
    return resolve_precision(only, device).weight_dtype


def vae_dtype(args, device, family=None):
    """The VAE's dtype in the training run: float32 with --no_half_vae, and for SDXL under fp16 (its VAE
    overflows in fp16), else the models' dtype."""
    import torch

    dtype = model_dtype(args, device)
    if args.no_half_vae or (dtype == torch.float16 and family is not None and family.is_sdxl):
        return torch.float32
    return dtype


def load_config(args, family):
    """The resolved dataset config, checked as a caching training run of this family checks it."""
    from library.data.config import check_bucket_reso_steps, load_dataset_config

    args.cache_latents = True  # makes the config loader refuse color_aug / random_crop
    config = load_dataset_config(args.dataset_config, args)
    check_bucket_reso_steps(config, 32 if family.is_sdxl else 64)
    return config


def detect_family(args):
    from library.caching.tools import detect_model_family

    return detect_model_family(args.pretrained_model_name_or_path, v2=True if args.v2 else None,
                               sdxl=True if args.sdxl else None)


def main(argv=None):
    args = parse_tool_args(build_parser, argv)
    import torch

    from library.caching.settings import CacheSettings, disk_location
    from library.caching.tools import collect_cache_items, latent_samples_of, load_vae_for_caching
    from library.caching.latent_cache import LatentCache

    settings = CacheSettings.from_args(args)
    family = detect_family(args)
    config = load_config(args, family)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = vae_dtype(args, device, family)
    vae = load_vae_for_caching(args.pretrained_model_name_or_path, family, args.vae, dtype)
    vae.to(device).eval()

    items = collect_cache_items(config, num_workers=max(1, min(4, os.cpu_count() or 1)), skip_bad=args.skip_bad_images)
    samples = latent_samples_of(items)
    print(f"{len(items)} images, {len(samples)} latent samples ({family.title}, VAE {dtype}, {device})")
    cache = LatentCache(vae, family, disk_location(args.cache_dir), settings.vae_batch_size,
                        skip_check=settings.skip_check, load_workers=args.max_data_loader_n_workers)
    stats = cache.ensure(samples)
    where = args.cache_dir or "a .sdtrain_cache folder in each image folder"
    print(f"latents: {stats.summary('samples')}; cache: {where}")


if __name__ == "__main__":
    run(main)
