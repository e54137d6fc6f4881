"""Cache flags: sd-scripts' caching options plus `--cache_dir`, and the settings they resolve to.

`add_cache_arguments` adds the flags to a trainer's or cache tool's parser; `CacheSettings.from_args`
resolves them (`*_to_disk` and `--cache_latents_on_first_use` imply caching) and says where each
cache lives. Only the standard library is imported here, so parsers that add these flags stay
instant.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from library.caching.store import BESIDE_IMAGES, CACHE_FOLDER
from library.errors import UserError


def _add_once(parser: argparse.ArgumentParser, group, flag: str, **kwargs) -> None:
    """Add a flag unless the parser already has it (the dataset and SDXL groups define some of these)."""
    if flag not in parser._option_string_actions:
        group.add_argument(flag, **kwargs)


def add_cache_arguments(parser: argparse.ArgumentParser, support_text_encoder_caching: bool = True,
                        trainer: bool = True) -> None:
    """sd-scripts' caching flags plus `--cache_dir` (and, for trainers, `--cache_latents_on_first_use`);
    flags already on `parser` are left alone."""
    g = parser.add_argument_group("caching")
    _add_once(parser, g, "--cache_latents", action="store_true",
              help="encode every image once and keep the latents in memory (no color_aug/random_crop)")
    _add_once(parser, g, "--cache_latents_to_disk", action="store_true",
              help="cache latents on disk, reused by later runs (implies --cache_latents)")
    if trainer:
        _add_once(parser, g, "--cache_latents_on_first_use", action="store_true",
                  help="fill the latent cache during the first epoch, as batches first need each image, "
                  "instead of before the first step (implies --cache_latents); the VAE stays loaded until then")
    _add_once(parser, g, "--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    _add_once(parser, g, "--skip_cache_check", action="store_true",
              help="trust existing disk cache entries without opening them (damaged ones are still "
              "recomputed when read)")
    if support_text_encoder_caching:
        _add_once(parser, g, "--cache_text_encoder_outputs", action="store_true",
                  help="encode each caption once (text encoders frozen; no caption shuffle/dropout/wildcards)")
        _add_once(parser, g, "--cache_text_encoder_outputs_to_disk", action="store_true",
                  help="cache text encoder outputs on disk (implies --cache_text_encoder_outputs)")
    _add_once(parser, g, "--cache_dir", type=str, default=None,
              help=f"folder for disk caches (default: a {CACHE_FOLDER} folder inside each image folder)")


@dataclass(frozen=True)
class CacheSettings:
    """The caching flags of a run, resolved (`*_to_disk` implies caching)."""

    latents: bool = False
    latents_to_disk: bool = False
    text_encoder_outputs: bool = False
    text_encoder_outputs_to_disk: bool = False
    vae_batch_size: int = 1
    skip_check: bool = False
    cache_dir: Optional[str] = None
    latents_on_first_use: bool = False

    @classmethod
    def from_args(cls, args) -> "CacheSettings":
        batch = getattr(args, "vae_batch_size", 1)
        batch = 1 if batch is None else int(batch)
        if batch < 1:
            raise UserError(f"--vae_batch_size {batch}: must be at least 1")
        to_disk = bool(getattr(args, "cache_latents_to_disk", False))
        te_to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
        on_first_use = bool(getattr(args, "cache_latents_on_first_use", False))
        return cls(
            latents=to_disk or on_first_use or bool(getattr(args, "cache_latents", False)),
            latents_to_disk=to_disk,
            text_encoder_outputs=te_to_disk or bool(getattr(args, "cache_text_encoder_outputs", False)),
            text_encoder_outputs_to_disk=te_to_disk,
            vae_batch_size=batch,
            skip_check=bool(getattr(args, "skip_cache_check", False)),
            cache_dir=getattr(args, "cache_dir", None),
            latents_on_first_use=on_first_use,
        )

    def latent_location(self) -> Optional[str]:
        """`cache_dir` argument for LatentCache: None (memory), a folder, or BESIDE_IMAGES."""
        return disk_location(self.cache_dir) if self.latents_to_disk else None

    def text_encoder_location(self) -> Optional[str]:
        return disk_location(self.cache_dir) if self.text_encoder_outputs_to_disk else None


def disk_location(cache_dir: Optional[str]) -> str:
    """Where disk caches go: the given folder, else BESIDE_IMAGES."""
    return os.path.abspath(cache_dir) if cache_dir else BESIDE_IMAGES
