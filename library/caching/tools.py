"""What the offline cache tools need besides the caches: the samples to cache and the VAE alone.

`tools/cache_latents.py`, `tools/cache_text_encoder_outputs.py` and
`finetune/prepare_buckets_latents.py` fill caches without a training run. They list every image of a
dataset config with the centre crop a training run gives it (`collect_cache_items`; sizes come from
metadata or image headers, buckets from `library.data.bucketing`), and `load_vae_for_caching` reads only
the VAE's tensors of a checkpoint. Model and image modules are imported when used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from library.data.bucketing import BucketAssigner, BucketSettings, CropPlan
from library.errors import UserError
from library.caching.latent_cache import LatentSample, with_flips

logger = logging.getLogger(__name__)

_SHOWN = 5  # unusable images named individually in an error


# ---------------------------------------------------------------------------------------------
# Samples of a dataset config, for the cache tools


@dataclass
class CacheItem:
    """One image of a dataset with the centre crop a training run gives it."""

    path: str
    plan: CropPlan
    caption: str  # raw caption (see `library.data.captions.process_caption`)
    subset: Any  # SubsetParams
    dataset_index: int = 0
    conditioning: Optional[str] = None  # ControlNet subsets: the conditioning image, cached with the latents

    def latent_samples(self) -> list:
        sample = LatentSample(self.path, self.plan, False, bool(self.subset.alpha_mask), self.conditioning)
        return with_flips([sample]) if self.subset.flip_aug else [sample]


def bucket_settings(dataset) -> BucketSettings:
    if dataset.resolution is None:
        raise UserError("no resolution set for a dataset; pass --resolution (or set resolution in the dataset config)")
    return BucketSettings.from_flags(
        dataset.resolution, dataset.enable_bucket, dataset.min_bucket_reso, dataset.max_bucket_reso,
        dataset.bucket_reso_steps, dataset.bucket_no_upscale,
    )


def image_sizes(paths: Sequence[str], num_workers: int = 2, skip_bad: bool = False) -> list:
    """(w, h) of each file from its header; one UserError lists the unusable files (with skip_bad:
    one warning, and None for each of them)."""
    from library.data.image_files import scan_images

    infos = scan_images(paths, num_workers=num_workers)
    _bad_files([f"{i.path}: {i.reason}" for i in infos if not i.ok], skip_bad)
    return [i.size if i.ok else None for i in infos]


def _bad_files(bad: list, skip_bad: bool) -> None:
    if not bad:
        return
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    listing = f"{len(bad)} unusable image(s): {'; '.join(bad[:_SHOWN])}{more}"
    if not skip_bad:
        raise UserError(listing + "; fix or remove them, or pass --skip_bad_images")
    logger.warning(f"--skip_bad_images: leaving out {listing}")


def plan_centre_crops(paths: Sequence[str], sizes: Sequence[tuple], settings: BucketSettings,
                      skip_bad: bool = False) -> list:
    """CropPlans with centre crops, as training without random_crop makes them (None for an image no
    bucket can hold, with skip_bad; else that is a UserError)."""
    assigner = BucketAssigner(settings)
    assignments = assigner.assign([s[0] for s in sizes], [s[1] for s in sizes])
    plans, bad = [], []
    for i, (path, size) in enumerate(zip(paths, sizes)):
        a = assignments[i]
        if not assignments.valid[i]:
            bad.append(f"{path}: {assigner.unbucketable_reason(size[0], size[1], a.resized)}")
            plans.append(None)
            continue
        left = (a.resized[0] - a.bucket[0]) // 2
        top = (a.resized[1] - a.bucket[1]) // 2
        plans.append(CropPlan(tuple(size), a.resized, a.bucket, left, top))
    _bad_files(bad, skip_bad)
    return plans


def collect_cache_items(config, num_workers: int = 2, skip_bad: bool = False) -> list:
    """Every image of every dataset (training and validation) with its crop plan, in config order.

    Images listed twice (repeats, several subsets) appear once per dataset/subset pair; sizes come
    from metadata when known, else from the file header. Unusable images are an error, or with
    skip_bad (--skip_bad_images, as the training run) left out with one warning.
    """
    from library.data.sources import collect_entries

    items = []
    for d, (dataset, sources) in enumerate(zip(config.datasets, collect_entries(config))):
        settings = bucket_settings(dataset)
        entries = sources.train + sources.validation
        unknown = [e.path for e in entries if e.image_size is None]
        probed = dict(zip(unknown, image_sizes(unknown, num_workers, skip_bad))) if unknown else {}
        entries = [e for e in entries if e.image_size or probed[e.path]]
        sizes = [e.image_size or probed[e.path] for e in entries]
        plans = plan_centre_crops([e.path for e in entries], sizes, settings, skip_bad)
        seen = set()
        for entry, plan in zip(entries, plans):
            identity = (entry.path, entry.subset_index)
            if plan is None or identity in seen:
                continue
            seen.add(identity)
            subset = dataset.subsets[entry.subset_index]
            plan = plan._replace(interpolation=subset.resize_interpolation or dataset.resize_interpolation)
            items.append(CacheItem(entry.path, plan, entry.caption, subset, d, entry.conditioning_path))
    return items


def latent_samples_of(items: Iterable[CacheItem]) -> list:
    """Distinct latent samples of cache items (flip twins included where flip_aug is on)."""
    return list(dict.fromkeys(s for item in items for s in item.latent_samples()))


# ---------------------------------------------------------------------------------------------
# Loading only the VAE (the cache tools need nothing else)


def detect_model_family(model_path: str, *, v2: Optional[bool] = None, sdxl: Optional[bool] = None):
    """The family of a checkpoint or diffusers folder, from its keys/configs only (checked against flags)."""
    from library.models import checkpoint_io, detect
    from library.models.loading import resolve_family

    if not os.path.exists(model_path):
        raise UserError(f"{model_path}: no such file or folder (models are never downloaded; pass a local checkpoint)")
    if os.path.isdir(model_path):
        return resolve_family(detect.detect_diffusers_folder(model_path), model_path, v2, sdxl)
    keys = list(checkpoint_io.read_keys(model_path))
    return resolve_family(detect.detect_single_file(model_path, keys), model_path, v2, sdxl)


def load_vae_for_caching(model_path: str, family, vae_path: Optional[str] = None, dtype=None):
    """The VAE of a checkpoint or diffusers folder (or `vae_path`), reading only the VAE's tensors."""
    from library.models import checkpoint_io, detect, vae_convert
    from library.models.loading import build_vae, load_vae

    if vae_path or os.path.isdir(model_path):
        return load_vae(vae_path or model_path, family, dtype)
    prefix = detect.VAE_PREFIX
    tensors = checkpoint_io.read_checkpoint(model_path, dtype=dtype, select=lambda k: k.startswith(prefix)).tensors
    if not tensors:
        raise UserError(f"{model_path}: the checkpoint has no VAE ({prefix}*); pass one with --vae")
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return build_vae(vae_convert.ldm_to_diffusers(tensors), family)
