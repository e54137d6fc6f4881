"""Latent cache: VAE latents of training samples, kept in memory or on disk, keyed on content.

Every entry is named by a key, the sha256 of everything its value depends on:

* the image file's **content hash** (sha256 of its bytes; memoised per file by size, mtime, ctime
  and inode, so unchanged files are not re-read on later runs);
* the crop plan (original size, resized size, bucket, left, top), the flip flag, and whether an
  alpha mask is stored with it;
* for a ControlNet subset's image, the content hash of its conditioning image (a loss mask with
  `--masked_loss`, or a ControlNet-LLLite hint), which the entry stores resized, cropped and flipped
  like the image: editing a mask gives a new key, so a stale mask is never trained on;
* the **VAE identity**: sha256 of the names, dtypes, shapes and bytes of every encoder-side VAE
  tensor (`encoder.*`, `quant_conv.*`; the decoder does not affect latents), computed once per run;
* the storage dtype and `PIXEL_PIPELINE_VERSION` (bump it when `image_transforms` changes pixels).

A changed image, crop, flip or VAE therefore gives a new key: a cache is never stale, and an
unchanged sample is never encoded twice. Values are unscaled latents (the trainer multiplies by
`family.latent_scale`), one fixed sample `mean + std * noise` of the VAE posterior, as sd-scripts
caches `latent_dist.sample()`; the noise comes from a generator seeded by the key, so the same
key always holds the same numbers.

On disk each entry is one small safetensors file (`latents` [C,h,w], optional `alpha_mask` [H,W]
uint8, optional `conditioning` [3,H,W] uint8; metadata: format, key, image path, crop, CRC32 of the data) at
`<root>/latents/<key[:2]>/<key>.safetensors`. `<root>` is `--cache_dir`, or by default a
`.sdtrain_cache` folder inside each image's folder. Before encoding, existing entries get a header
check (format, key, tensor shapes, file size; `--skip_cache_check`: existence only); every read
verifies the CRC. A damaged entry is re-encoded with a warning, never a crash.

The entry files and stores are `library.caching.store`, the content hashes and fingerprints
`library.caching.keys`, the flags `library.caching.settings`. torch is imported lazily. docs/caches.md
describes the design and the measurements behind it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from library.data.bucketing import CropPlan
from library.caching.keys import FileHasher, cache_key, state_fingerprint
from library.caching.store import (
    CacheStats,
    CorruptEntry,
    EntryStore,
    check_entry,
    plan_fill,
    read_entry,
    safetensors_dtype,
    warn_damaged,
    write_entry,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

LATENTS_KIND = "latents"
LATENT_FORMAT = "sdtrain.latents.v1"
PIXEL_PIPELINE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Keys


def vae_identity(vae) -> str:
    """Everything about a VAE that changes its latents: encoder weights (all bytes) and compute dtype,
    tiling."""
    from library.models.frozen_weights import compute_dtype

    weights = state_fingerprint(vae, prefixes=("encoder.", "quant_conv."), dtype=compute_dtype(vae))
    tiling = bool(getattr(vae, "use_tiling", False))
    return hashlib.sha256(f"{type(vae).__name__}|{weights}|tiling={tiling}".encode()).hexdigest()


def sample_noise(key: str, shape: tuple):
    """The fixed N(0, 1) noise of one entry: a generator seeded from its key."""
    import torch

    generator = torch.Generator().manual_seed(int(key[:15], 16))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _entry(latents, mask_u8, hint_u8) -> LatentEntry:
    """An entry as stored (uint8 mask and conditioning image) → the values a batch uses."""
    from library.data.image_transforms import unit_range

    return LatentEntry(latents, None if mask_u8 is None else mask_u8.float() / 255,
                       None if hint_u8 is None else unit_range(hint_u8))


def _wait_all(futures: list) -> None:
    for future in futures:
        future.result()  # re-raises a failed write here


# ---------------------------------------------------------------------------------------------
# Latent cache


class LatentSample(NamedTuple):
    """One training sample's pixels: an image, how it is resized and cropped, flipped or not.

    alpha_mask: also store the sample's alpha mask (masked-loss training).
    conditioning: path of the sample's conditioning image, stored with the latents (same crop and flip).
    """

    path: str
    plan: CropPlan
    flip: bool = False
    alpha_mask: bool = False
    conditioning: Optional[str] = None


class LatentEntry(NamedTuple):
    latents: Any  # (C, h, w) unscaled, storage dtype
    alpha_mask: Any = None  # (H, W) float32 in [0, 1], when the sample asked for it
    conditioning: Any = None  # (3, H, W) float32 in [-1, 1], when the sample has a conditioning image


def as_latent_sample(sample) -> LatentSample:
    """Accept any descriptor with `path`, `plan`, `flip` (and optionally `alpha_mask`, `conditioning`)."""
    if isinstance(sample, LatentSample):
        return sample
    conditioning = getattr(sample, "conditioning", None)
    return LatentSample(str(sample.path), CropPlan(*sample.plan), bool(getattr(sample, "flip", False)),
                        bool(getattr(sample, "alpha_mask", False)), str(conditioning) if conditioning else None)


def with_flips(samples: Iterable[LatentSample]) -> list:
    """Each sample and its horizontally flipped twin (for flip_aug)."""
    out = []
    for s in samples:
        out += [s._replace(flip=False), s._replace(flip=True)]
    return out


class LatentCache:
    """Latents of training samples, encoded once and kept in memory or on disk.

    cache_dir: None keeps entries in memory for this run; a folder, or BESIDE_IMAGES, keeps them on
    disk for later runs too. dtype: storage dtype of the latents (default float32, as sd-scripts).
    skip_check: `ensure` only tests that entry files exist (reads still verify them).
    """

    def __init__(self, vae, family=None, cache_dir: Optional[str] = None, vae_batch_size: int = 1, dtype=None,
                 *, skip_check: bool = False, load_workers: Optional[int] = None):
        import torch

        self.vae = vae
        self.family = family
        self.batch_size = max(1, int(vae_batch_size))
        self.dtype = dtype or torch.float32
        self.skip_check = skip_check
        self.load_workers = load_workers or min(4, os.cpu_count() or 1)
        self.store = EntryStore(cache_dir, LATENTS_KIND)
        # Memory caches hash contents too (no memo across runs): the VAE costs far more than hashing,
        # and equal keys make memory and disk caches hold the very same numbers.
        self.hasher = FileHasher(None if self.store.in_memory else self.store.memo_file)
        self.vae_id = vae_identity(vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsamples = len(vae.config.block_out_channels) - 1
        self.stats = CacheStats()  # running totals over all calls
        self._warned_fallback = False
        self._reload_vae = None  # set by release_vae: brings the VAE back for a later miss

    # --- keys and paths ---------------------------------------------------------------------

    def _key(self, sample: LatentSample, content: str, conditioning: Optional[str] = None) -> str:
        plan = sample.plan
        parts = {
            "kind": LATENT_FORMAT, "pixels": PIXEL_PIPELINE_VERSION, "content": content,
            "original": [int(v) for v in plan.original_size], "resized": [int(v) for v in plan.resized_size],
            "bucket": [int(v) for v in plan.bucket], "left": int(plan.left), "top": int(plan.top),
            "flip": bool(sample.flip), "alpha": bool(sample.alpha_mask), "vae": self.vae_id, "dtype": str(self.dtype),
            # only when set, so the keys of the default resize (and the caches made with it) stay as they were
            **({"interpolation": plan.interpolation} if plan.interpolation else {}),
        }
        if conditioning is not None:  # only then: keys of samples without one stay what they were
            parts["conditioning"] = conditioning
        return cache_key(parts)

    def key(self, sample) -> str:
        return self.keys([as_latent_sample(sample)])[0]

    def keys(self, samples: Sequence[LatentSample]) -> list:
        paths = [s.path for s in samples] + [s.conditioning for s in samples if s.conditioning]
        digests = dict(zip(paths, self.hasher.digest_many(paths)))
        return [self._key(s, digests[s.path], digests[s.conditioning] if s.conditioning else None) for s in samples]

    def entry_path(self, sample) -> Optional[str]:
        """The file of a sample's entry (None for a memory cache)."""
        sample = as_latent_sample(sample)
        return None if self.store.in_memory else self.store.path_for(self.key(sample), sample.path)

    def _expected(self, sample: LatentSample) -> dict:
        bw, bh = sample.plan.bucket
        latent_dtype = safetensors_dtype(self.dtype)
        shape = (self.latent_channels, bh >> self.downsamples, bw >> self.downsamples)
        expected = {"latents": (latent_dtype, shape)}
        if sample.alpha_mask:
            expected["alpha_mask"] = ("U8", (bh, bw))
        if sample.conditioning:
            expected["conditioning"] = ("U8", (3, bh, bw))
        return expected

    # --- filling ----------------------------------------------------------------------------

    def ensure(self, samples: Iterable, *, process_index: int = 0, num_processes: int = 1) -> CacheStats:
        """Make sure every sample has a valid entry, encoding the missing and damaged ones.

        With several processes sharing a disk cache, process p handles the distinct samples whose
        index is p modulo num_processes (then synchronise before reading). Memory caches always
        encode everything they need.
        """
        start = time.perf_counter()
        samples = [as_latent_sample(s) for s in samples]
        hashed_before = self.hasher.hashed
        stats = CacheStats(requested=len(samples))
        keyed = [(key, sample.path, sample) for key, sample in zip(self.keys(samples), samples)]
        missing, damaged = plan_fill(self.store, keyed, stats, process_index, num_processes, self._check)
        warn_damaged(damaged, "latent")
        if missing:
            self._encode(missing)
        stats.encoded = len(missing)
        self.hasher.save()
        stats.hashed_files = self.hasher.hashed - hashed_before
        stats.seconds = time.perf_counter() - start
        self.stats.add(stats)
        return stats

    def _check(self, path: str, key: str, sample: LatentSample) -> Optional[str]:
        if self.skip_check:
            return None if os.path.exists(path) else "missing"
        return check_entry(path, key, LATENT_FORMAT, self._expected(sample))

    def _batches(self, missing: list) -> list:
        """Missing entries grouped by bucket (one VAE call per batch); flip twins stay together."""
        ordered = sorted(missing, key=lambda ks: (ks[1].plan.bucket, ks[1].path, ks[1].plan, ks[1].flip))
        batches, current = [], []
        for item in ordered:
            if current and (current[0][1].plan.bucket != item[1].plan.bucket or len(current) == self.batch_size):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    @property
    def can_encode(self) -> bool:
        return self.vae is not None or self._reload_vae is not None

    def _encode(self, missing: list) -> None:
        if self.vae is None and self._reload_vae is not None:
            self.vae = self._reload_vae()  # for these entries only: released again below
            try:
                self._encode(missing)
            finally:
                self.vae = None
            return
        if self.vae is None:
            raise UserError("latents are not cached and the VAE was released; run the caching step before training")
        batches = self._batches(missing)
        writes: deque = deque()  # per batch, the futures of its entry writes
        with ThreadPoolExecutor(self.load_workers) as pool:
            pending = self._submit_pixels(pool, batches[0])
            for i, batch in enumerate(batches):
                loaded = pending
                if i + 1 < len(batches):
                    pending = self._submit_pixels(pool, batches[i + 1])  # decode ahead while the VAE runs
                writes.append([pool.submit(self._put, *item) for item in self._encode_batch(batch, loaded)])
                while len(writes) > 2:  # bounds the latents waiting to be written
                    _wait_all(writes.popleft())
            while writes:
                _wait_all(writes.popleft())

    @staticmethod
    def _submit_pixels(pool: ThreadPoolExecutor, batch: list) -> dict:
        """Decode each (image, crop) and conditioning image once; flipped twins reuse the unflipped pixels."""
        from library.data.image_transforms import training_pixels_and_alpha, training_pixels_u8

        futures = {}
        for _, s in batch:
            base = (s.path, s.plan, s.alpha_mask)
            if base not in futures:
                futures[base] = pool.submit(training_pixels_and_alpha, s.path, s.plan, False, s.alpha_mask)
            if s.conditioning and (s.conditioning, s.plan) not in futures:
                futures[(s.conditioning, s.plan)] = pool.submit(training_pixels_u8, s.conditioning, s.plan, False)
        return futures

    def _encode_batch(self, batch: list, futures: dict) -> list:
        """VAE-encode one batch; returns the `_put` arguments of its entries."""
        import torch

        from library.models.frozen_weights import compute_dtype

        pixels, masks, conditionings = [], [], []
        for _, s in batch:
            image, mask = futures[(s.path, s.plan, s.alpha_mask)].result()
            pixels.append(image.flip(-1) if s.flip else image)
            masks.append(None if mask is None else (mask.flip(-1) if s.flip else mask))
            hint = futures[(s.conditioning, s.plan)].result() if s.conditioning else None
            conditionings.append(None if hint is None else (hint.flip(-1) if s.flip else hint))
        device = next(self.vae.parameters()).device
        images = torch.stack(pixels).to(device, compute_dtype(self.vae))
        if images.device.type == "cpu":
            # oneDNN's convolutions run a channels-last image about 12 % faster (SD VAE, 256 px, 2 threads)
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
            mean, std = posterior.mean.float().cpu().contiguous(), posterior.std.float().cpu().contiguous()
        entries = []
        for row, ((key, sample), mask, hint) in enumerate(zip(batch, masks, conditionings)):
            latents = mean[row] + std[row] * sample_noise(key, tuple(mean.shape[1:]))
            if not torch.isfinite(latents).all():
                raise UserError(
                    f"{sample.path}: the VAE produced NaN/inf latents (usual with a half-precision VAE); "
                    f"use --no_half_vae"
                )
            entries.append((key, sample, latents.to(self.dtype), mask, hint))
        return entries

    def _put(self, key: str, sample: LatentSample, latents, mask, hint=None) -> None:
        import torch

        mask_u8 = None if mask is None else torch.round(mask.float() * 255).to(torch.uint8)
        hint = None if hint is None else hint.contiguous()
        if self.store.in_memory:
            self.store.memory[key] = (latents, mask_u8, hint)
            return
        path = self.store.path_for(key, sample.path)
        self.store.prepare_dir(path)
        tensors = {"latents": latents}
        if mask_u8 is not None:
            tensors["alpha_mask"] = mask_u8
        if hint is not None:
            tensors["conditioning"] = hint
        plan = sample.plan
        write_entry(path, tensors, {
            "format": LATENT_FORMAT, "key": key, "image": os.path.abspath(sample.path),
            "original_size": ",".join(map(str, plan.original_size)), "crop_ltrb": ",".join(map(str, plan.crop_ltrb)),
            "flip": str(bool(sample.flip)).lower(),
        })

    # --- reading ----------------------------------------------------------------------------

    def load(self, sample) -> LatentEntry:
        """The entry of one sample; encodes it on a miss (or if damaged) when the VAE is still there."""
        sample = as_latent_sample(sample)
        key = self.key(sample)
        if self.store.in_memory:
            if key not in self.store.memory:
                self._encode_one(key, sample)
            latents, mask, hint = self.store.memory[key]
            return _entry(latents, mask, hint)
        path = self.store.path_for(key, sample.path)
        try:
            tensors = read_entry(path, key, LATENT_FORMAT, self._expected(sample))
        except FileNotFoundError:
            if not self.can_encode:
                raise UserError(f"{sample.path}: its latents are not in the cache ({path}); run the caching step "
                                f"(tools/cache_latents.py) with the same settings") from None
            self._encode_one(key, sample)
            tensors = read_entry(path, key, LATENT_FORMAT, self._expected(sample))
        except (CorruptEntry, OSError) as e:
            if not self.can_encode:
                raise UserError(f"{path}: damaged latent cache entry ({e}); delete it and cache again") from None
            logger.warning("%s: damaged latent cache entry (%s); encoding it again", path, e)
            self._encode_one(key, sample)
            tensors = read_entry(path, key, LATENT_FORMAT, self._expected(sample))
        return _entry(tensors["latents"], tensors.get("alpha_mask"), tensors.get("conditioning"))

    def _encode_one(self, key: str, sample: LatentSample) -> None:
        """A miss met while reading: encode that entry now (counted in the running `stats`)."""
        self._encode([(key, sample)])
        self.stats.encoded += 1

    def get(self, sample):
        """Unscaled latents (C, h, w) of one sample."""
        return self.load(sample).latents

    def provide(self, sample) -> Optional[dict]:
        """`latent_provider` of the training dataset: {"latents", "alpha_mask"}, or None when the sample
        is not cached (or damaged) and the VAE is released, so the dataset falls back to pixels."""
        try:
            entry = self.load(sample)
        except UserError as e:
            if self.can_encode:
                raise
            if not self._warned_fallback:  # once: a damaged cache would otherwise flood the log
                logger.warning("%s; using pixels for this and any other uncached sample", e)
                self._warned_fallback = True
            return None
        return {"latents": entry.latents, "alpha_mask": entry.alpha_mask, "conditioning": entry.conditioning}

    def __contains__(self, sample) -> bool:
        sample = as_latent_sample(sample)
        key = self.key(sample)
        if self.store.in_memory:
            return key in self.store.memory
        return check_entry(self.store.path_for(key, sample.path), key, LATENT_FORMAT, self._expected(sample)) is None

    def release_vae(self, reload: Optional[Callable[[], Any]] = None) -> None:
        """Drop the reference to the VAE (after `ensure`). A later miss (a damaged or deleted entry)
        calls `reload` for a VAE to encode it with, and drops that one again; without `reload` a miss
        raises a UserError."""
        self.vae = None
        self._reload_vae = reload
