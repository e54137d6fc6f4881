"""Connect the latent and text-encoder-output caches to a training run.

With `--cache_latents` every sample's latents (and mirrored ones with flip_aug) are encoded once
before the first step, in memory or on disk (`*_to_disk`); with `--cache_text_encoder_outputs` the
same for each caption. The dataset then reads from the caches instead of decoding images or
running the text encoders. Encoders that are no longer needed move off the accelerator.
"""

from __future__ import annotations

import logging

import torch

from library.latent_cache import CacheSettings, LatentCache
from library.text_encoder_cache import TextEncoderOutputCache, check_text_encoder_caching

logger = logging.getLogger(__name__)


def _cache_latents(run, settings: CacheSettings) -> None:
    vae = run.models.vae
    vae.to(run.device)
    cache = LatentCache(vae, run.family, settings.latent_location(), settings.vae_batch_size,
                        skip_check=settings.skip_check)
    stats = cache.ensure(run.dataset.latent_cache_samples(), process_index=run.accelerator.process_index,
                         num_processes=run.num_processes)
    run.accelerator.wait_for_everyone()
    logger.info("latent cache: %s", stats)
    vae.to("cpu")  # kept for the rare miss (a damaged entry is re-encoded), off the accelerator
    run.latent_cache = cache
    run.dataset.latent_provider = cache.provide


def _cache_text(run, task, settings: CacheSettings) -> None:
    trains_te = any(task.trains_text_encoder(i) for i in range(len(run.models.text_encoders)))
    check_text_encoder_caching(run.dataset.scan.config, trains_te)
    cache = TextEncoderOutputCache(
        run.conditioner, settings.text_encoder_location(), max_token_length=run.args.max_token_length,
        clip_skip=run.args.clip_skip, weighted=bool(getattr(run.args, "weighted_captions", False)),
        skip_check=settings.skip_check,
    )
    items = {(run.dataset.caption(i, 1, 0), run.dataset.sample_path(i)) for i in range(len(run.dataset))}
    with torch.no_grad():
        stats = cache.ensure(sorted(items), process_index=run.accelerator.process_index,
                             num_processes=run.num_processes)
    run.accelerator.wait_for_everyone()
    logger.info("text encoder output cache: %s", stats)
    for encoder in run.models.text_encoders:
        encoder.to("cpu")
    run.text_cache = cache
    run.dataset.text_provider = cache.provide


def attach_caches(run, task) -> None:
    settings = CacheSettings.from_args(run.args)
    if settings.latents:
        _cache_latents(run, settings)
    if settings.text_encoder_outputs:
        _cache_text(run, task, settings)
