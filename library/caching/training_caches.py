"""Connect the latent and text-encoder-output caches to a training run.

With `--cache_latents` every sample's latents (and mirrored ones with flip_aug) are encoded once
before the first step, in memory or on disk (`*_to_disk`); with `--cache_latents_on_first_use`, as
the first epoch's batches need them (the rest right after that epoch). With
`--cache_text_encoder_outputs` the same for each caption, before the first step. The dataset then
reads from the caches instead of decoding images or running the text encoders. Encoders that are
no longer needed move off the accelerator; the VAE is released altogether when nothing else needs
it (no sample images, a task that does not save it), and read from the model file again only if a
cache entry goes missing later.
"""

from __future__ import annotations

import logging

import torch

from library.caching.settings import CacheSettings
from library.caching.latent_cache import LatentCache
from library.caching.text_encoder_cache import TextEncoderOutputCache, check_text_encoder_caching

logger = logging.getLogger(__name__)


def _datasets(run) -> list:
    """The training dataset and, with --validation_split, the held-out one."""
    held_out = run.extra.get("validation_dataset")
    return [run.dataset] + ([held_out] if held_out is not None else [])


def _cache_latents(run, task, settings: CacheSettings) -> None:
    vae = run.models.vae
    vae.to(run.device)
    cache = LatentCache(vae, run.family, settings.latent_location(), settings.vae_batch_size,
                        skip_check=settings.skip_check)
    run.latent_cache = cache
    for dataset in _datasets(run):
        dataset.latent_provider = cache.provide
    if settings.latents_on_first_use:
        # batches encode their own misses (`LatentCache.provide`) in the main process, where the
        # entries must land; `finish_latent_cache` completes the cache after the first epoch
        run.extra["latents_pending"] = True
        logger.info("latent cache: filled as batches first need each image (--cache_latents_on_first_use)")
        return
    _fill_latent_cache(run, task)


def _fill_latent_cache(run, task) -> None:
    """Encode every latent not cached yet; then the VAE leaves the accelerator, or memory altogether."""
    cache = run.latent_cache
    samples = [sample for dataset in _datasets(run) for sample in dataset.latent_cache_samples()]
    stats = cache.ensure(samples, process_index=run.accelerator.process_index, num_processes=run.num_processes)
    run.accelerator.wait_for_everyone()
    logger.info("latent cache: %s", stats)
    run.models.vae.to("cpu")  # kept for the rare miss (a damaged entry is re-encoded), off the accelerator
    if not task.needs_vae_after_caching(run.args):
        _release_vae(run, cache)


def latents_pending(run) -> bool:
    """Whether batches may still encode latents (--cache_latents_on_first_use before its first
    epoch ends): then they must be loaded in the main process."""
    return bool(run.extra.get("latents_pending"))


def finish_latent_cache(run, task) -> None:
    """After the first epoch of --cache_latents_on_first_use: encode what no batch asked for (the
    flipped twins, samples other processes drew) and let the VAE go as after up-front caching."""
    if latents_pending(run):
        run.extra["latents_pending"] = False
        _fill_latent_cache(run, task)


def _release_vae(run, cache: LatentCache) -> None:
    """Every latent is cached: give the VAE's memory back; a later miss reads it from the file again."""
    from library.models.frozen_weights import compute_dtype, hold_in_half, uses_frozen_layers
    from library.models.loading import load_vae

    vae = run.models.vae
    dtype = compute_dtype(vae)
    held = uses_frozen_layers(vae)  # then read it in the file's dtype and hold it alike
    source = run.args.vae or run.args.pretrained_model_name_or_path
    family, device = run.family, run.device

    def reload():
        logger.warning("a latent cache entry is missing: reading the VAE from %s again to encode it", source)
        again = load_vae(source, family, None if held else dtype)
        again.requires_grad_(False)
        if held:
            hold_in_half(again, dtype)
        return again.eval().to(device)

    cache.release_vae(reload)
    run.models.vae = None


def _cache_text(run, task, settings: CacheSettings) -> None:
    trains_te = any(task.trains_text_encoder(i) for i in range(len(run.models.text_encoders)))
    check_text_encoder_caching(run.dataset.scan.config, trains_te)
    cache = TextEncoderOutputCache(
        run.conditioner, settings.text_encoder_location(), max_token_length=run.args.max_token_length,
        clip_skip=run.args.clip_skip, weighted=bool(getattr(run.args, "weighted_captions", False)),
        skip_check=settings.skip_check,
    )
    datasets = _datasets(run)
    items = {(d.caption(i, 1, 0), d.sample_path(i)) for d in datasets for i in range(len(d))}
    with torch.no_grad():
        stats = cache.ensure(sorted(items), process_index=run.accelerator.process_index,
                             num_processes=run.num_processes)
    run.accelerator.wait_for_everyone()
    logger.info("text encoder output cache: %s", stats)
    for encoder in run.models.text_encoders:
        encoder.to("cpu")
    run.text_cache = cache
    for dataset in datasets:
        dataset.text_provider = cache.provide


def attach_caches(run, task) -> None:
    settings = CacheSettings.from_args(run.args)
    if settings.latents:
        _cache_latents(run, task, settings)
    if settings.text_encoder_outputs:
        _cache_text(run, task, settings)
