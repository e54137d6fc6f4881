"""The training dataset: from a `DatasetScan` to batches of pixels (or cached latents), captions and ids.

`TrainDataset` holds no state that changes while training. Which images form the batches of an epoch
is a pure function of (seed, epoch) (`epoch_batches`, via `bucketing.make_epoch_batches`), and every
random choice made for one sample (flip, random crop, face-crop zoom, colour augmentation, caption
shuffle/dropout/wildcards) comes from generators seeded by (seed, epoch, global step, image, position
in the batch). Two instances with the same seed therefore produce identical batches, and a resumed run
reproduces the interrupted one exactly.

Per-sample pipeline (`load_batch`):
1. flip (subset `flip_aug`, 50 %), crop plan (centre crop of the bucket assignment; random crop with
   `random_crop`; face-centred crop with `face_crop_aug_range` when bucketing is off);
2. latents from `latent_provider(SampleDescriptor)` if one is given and it has them, else pixels via
   `image_transforms` (resize, crop, flip; colour augmentation in between when asked); a ControlNet
   subset's conditioning image (loss mask or LLLite hint) comes with the cached latents, or takes
   the same resize, crop and flip as its image (`conditioning_images`, [-1, 1]);
3. the caption through `captions.process_caption`, tokenized per tokenizer (`text_encoding.tokenize`);
   `text_provider(SampleDescriptor, caption)` may supply cached text-encoder outputs.

sd-scripts rules kept: `random_crop`, `color_aug` (and face crops, which are random) cannot be used with
cached latents; with `flip_aug` a latent cache must hold the flipped latents too (the descriptor says
which one is wanted); text-encoder outputs cannot be cached when captions change between steps.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from library.data import bucketing, image_files, image_transforms
from library.text import encoding as text_encoding
from library.data.bucketing import CropPlan
from library.data.captions import process_caption
from library.data.config import SubsetParams
from library.data.scan import DatasetScan, ScannedImage
from library.errors import UserError

# sd-scripts' colour augmentation: applied with this probability, hue shift or gamma half the time each.
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0  # in OpenCV hue units (0..180 for a full turn)
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class SampleDescriptor:
    """Everything that decides the pixels of one sample; what a latent cache keys on.

    path: the image file. plan: resize to `plan.resized_size`, crop `plan.bucket` at
    (`plan.left`, `plan.top`); `plan.original_size` is the upright size of the file. flip: the crop is
    mirrored horizontally afterwards. alpha_mask: the subset trains with the alpha channel as mask.
    conditioning: the image's conditioning image (ControlNet subsets: a loss mask with --masked_loss,
    or a ControlNet-LLLite hint), resized, cropped and flipped with it.
    Equal descriptors always give identical pixels (`image_transforms.training_pixels`).
    """

    path: str
    plan: CropPlan
    flip: bool = False
    alpha_mask: bool = False
    conditioning: Optional[str] = None

    @property
    def latent_size_hw(self) -> tuple:
        return (self.plan.bucket[1] // 8, self.plan.bucket[0] // 8)


# latent_provider(sample) -> None | latents (C, h, w)
#     | {"latents": (C, h, w), "alpha_mask": (H, W) or None, "conditioning": (3, H, W) in [-1, 1] or None}
LatentProvider = Callable[[SampleDescriptor], Any]
# text_provider(sample, caption) -> None | cached text-encoder outputs (any object, passed through)
TextProvider = Callable[[SampleDescriptor, str], Any]


@dataclass
class _Sample:
    image: ScannedImage
    subset: SubsetParams
    dataset_index: int
    settings: bucketing.BucketSettings
    centre: CropPlan
    face: Optional[tuple]  # (cx, cy, w, h) parsed from a face-crop file name

    @property
    def path(self) -> str:
        return self.image.entry.path


def face_info_from_name(path: str) -> Optional[tuple]:
    """(cx, cy, w, h) from `name_cx_cy_w_h.ext`, or None when the name carries no face position."""
    tokens = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if cx > 0 else None


def face_crop_plan(
    original_size: tuple, target: tuple, face: tuple, aug_range: tuple, random_crop: bool, rng: random.Random
) -> CropPlan:
    """sd-scripts' face-centred crop (`crop_target`, bucketing off) as a `CropPlan`.

    Zoom so the face is between 1/hi and 1/lo of the shorter target side (never above 1, never below
    the scale that covers the target: sd-scripts fails on smaller images instead), centre the crop on
    the face, jitter it (random_crop: widely; else a little when the range is not a single value),
    clamp inside the image. Draws happen in sd-scripts' order (scale, then height, then width).
    """
    iw, ih = original_size
    tw, th = target
    if (iw, ih) == (tw, th):
        return CropPlan(tuple(original_size), tuple(original_size), tuple(target), 0, 0)
    cx, cy, fw, fh = face
    lo, hi = aug_range
    face_size = max(fw, fh)
    short = min(tw, th)
    cover = max(th / ih, tw / iw)
    min_scale = min(1.0, max(cover, short / (face_size * hi)))
    max_scale = min(1.0, max(min_scale, short / (face_size * lo)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    scale = max(scale, cover)
    nw, nh = max(tw, int(iw * scale + 0.5)), max(th, int(ih * scale + 0.5))
    offsets = []
    for target_size, length, face_pos in ((th, nh, int(cy * scale + 0.5)), (tw, nw, int(cx * scale + 0.5))):
        p = face_pos - target_size // 2
        if random_crop:
            spread = max(length - face_pos, face_pos)
            p += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif lo != hi and face_size > short // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(p, length - target_size)))
    top, left = offsets
    return CropPlan(tuple(original_size), (nw, nh), tuple(target), left, top)


def color_augment(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' `color_aug`: with p=0.33 a hue shift of up to ±8/180 turn or a gamma in 0.95..1.05.

    Deviation: gamma acts on 0..1 values. sd-scripts raises raw 0..255 values to the power, which
    darkens or saturates whole images (255**0.95 = 193) instead of a slight gamma change.
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return rgb
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        hsv = np.array(Image.fromarray(rgb).convert("HSV"))
        # PIL's hue wheel has 256 steps where OpenCV's has 180.
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(shift * 256 / 180)) % 256
        return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = rng.uniform(*GAMMA_RANGE)
    return np.clip(np.rint(255.0 * (rgb / 255.0) ** gamma), 0, 255).astype(np.uint8)


def _to_unit_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def latent_cache_blockers(scan: DatasetScan) -> list[str]:
    """Subset settings that change pixels every step, which cached latents cannot follow."""
    blockers = []
    for dataset in scan.datasets:
        for s, subset in enumerate(dataset.params.subsets, 1):
            where = f"(dataset #{dataset.index + 1}, subset #{s})"
            for key in ("color_aug", "random_crop"):
                if getattr(subset, key):
                    blockers.append(f"{key} {where}")
            if subset.face_crop_aug_range is not None and not dataset.params.enable_bucket:
                blockers.append(f"face_crop_aug_range {where}")
    return blockers


class _MergedEpochBatches(bucketing.EpochBatches):
    """The batches of several datasets: each dataset's own shuffled batches, interleaved at random.

    Item and bucket numbers are global (offset per dataset), so a batch never mixes datasets.
    """

    def __init__(self, resolutions: list, parts: list, item_offsets: list, bucket_offsets: list, rng: np.random.Generator):
        self.resolutions = resolutions
        self._parts = parts
        self._item_offsets = item_offsets
        self._bucket_offsets = bucket_offsets
        part_of = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
        index_in = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
        order = rng.permutation(len(part_of))
        self._part_of = part_of[order]
        self._index_in = index_in[order]

    def __len__(self) -> int:
        return len(self._part_of)

    def __getitem__(self, k: int) -> bucketing.Batch:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        part = int(self._part_of[k])
        batch = self._parts[part][int(self._index_in[k])]
        offset = self._item_offsets[part]
        return bucketing.Batch(batch.bucket_index + self._bucket_offsets[part], batch.resolution,
                               [i + offset for i in batch.items])


class TrainDataset:
    """Batches of one split of a scanned dataset, for a model family and its tokenizers.

    seed: the run's seed (sd-scripts draws one at random when --seed is unset; the trainer decides).
    max_token_length: None/75, 150 or 225. max_train_steps: for token warm-up given as a fraction.
    weighted_captions: tokenize `(word:1.2)` weights (adds `input_id_weights`). replacements: Textual
    Inversion caption replacements (`captions.apply_replacements`). cache_latents: latents will be
    supplied by `latent_provider`; refuses subsets whose pixels change per step.
    """

    def __init__(
        self,
        scan: DatasetScan,
        family,
        tokenizers: Optional[Sequence] = None,
        *,
        seed: int = 0,
        max_token_length: Optional[int] = None,
        max_train_steps: int = 0,
        split: str = "train",
        weighted_captions: bool = False,
        replacements: Optional[Mapping] = None,
        cache_latents: bool = False,
        latent_provider: Optional[LatentProvider] = None,
        text_provider: Optional[TextProvider] = None,
    ):
        if not scan.ok:
            scan.raise_for_problems()
        if seed < 0:
            raise UserError(f"--seed {seed}: must be 0 or more")
        text_encoding.chunk_count(max_token_length)  # rejects unsupported lengths now, not at the first batch
        self.scan = scan
        self.family = family
        self.tokenizers = list(tokenizers or [])
        self.seed = int(seed)
        self.max_token_length = max_token_length
        self.max_train_steps = int(max_train_steps or 0)
        self.split = split
        self.weighted_captions = weighted_captions
        self.replacements = replacements
        self.latent_provider = latent_provider
        self.text_provider = text_provider
        if cache_latents or latent_provider is not None:
            self._refuse(latent_cache_blockers(scan), "latents cannot be cached", "--cache_latents")
        if text_provider is not None:
            self._refuse(scan.config.text_encoder_cache_blockers(), "text-encoder outputs cannot be cached",
                         "--cache_text_encoder_outputs")
        self._build(split)

    @classmethod
    def from_args(cls, scan: DatasetScan, family, tokenizers, args, **overrides) -> "TrainDataset":
        """Build with the trainer's flags (--seed, --max_token_length, --max_train_steps, ...)."""
        options = dict(
            seed=getattr(args, "seed", None) or 0,
            max_token_length=getattr(args, "max_token_length", None),
            max_train_steps=getattr(args, "max_train_steps", 0) or 0,
            weighted_captions=bool(getattr(args, "weighted_captions", False)),
            cache_latents=bool(getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)),
        )
        options.update(overrides)
        return cls(scan, family, tokenizers, **options)

    @staticmethod
    def _refuse(blockers: list[str], what: str, flag: str) -> None:
        if blockers:
            raise UserError(f"{what}: these settings change every step: {', '.join(blockers)}; turn them off or drop {flag}")

    def _build(self, split: str) -> None:
        self._samples: list[_Sample] = []
        self._parts = []  # per dataset: (resolutions, local bucket index array, repeats array, batch size)
        self.resolutions: list[tuple] = []
        for dataset in self.scan.datasets:
            images = dataset.images(split)
            if not images:
                continue
            resolutions = sorted({image.bucket for image in images})
            local = {reso: i for i, reso in enumerate(resolutions)}
            for image in images:
                subset = dataset.params.subsets[image.entry.subset_index]
                centre = bucketing.plan_crop(image.size, image.resized, image.bucket)._replace(
                    interpolation=subset.resize_interpolation or dataset.params.resize_interpolation)
                face = face_info_from_name(image.path) if subset.face_crop_aug_range and not dataset.params.enable_bucket else None
                self._samples.append(_Sample(image, subset, dataset.index, dataset.settings, centre, face))
            bucket_index = np.array([local[image.bucket] for image in images], dtype=np.int64)
            repeats = np.array([image.entry.repeats for image in images], dtype=np.int64)
            self._parts.append((resolutions, bucket_index, repeats, dataset.params.batch_size))
            self.resolutions += resolutions

    # --- batches --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of distinct images (repeats not counted)."""
        return len(self._samples)

    def num_batches(self, epoch: int = 1) -> int:
        """Batches per epoch (the same for every epoch)."""
        return sum(bucketing.count_batches(b, r, size) for _, b, r, size in self._parts)

    def epoch_batches(self, epoch: int) -> bucketing.EpochBatches:
        """The batches of `epoch` (1-based) in training order; a pure function of (seed, epoch)."""
        parts = []
        for d, (resolutions, bucket_index, repeats, batch_size) in enumerate(self._parts):
            # Datasets get distinct seeds so their shuffles are not the same random stream.
            parts.append(bucketing.make_epoch_batches(resolutions, bucket_index, repeats, batch_size,
                                                      self.seed + d * 1_000_003, epoch))
        if len(parts) == 1:
            return parts[0]
        item_offsets = list(np.cumsum([0] + [len(b) for _, b, _, _ in self._parts[:-1]]))
        bucket_offsets = list(np.cumsum([0] + [len(r) for r, _, _, _ in self._parts[:-1]]))
        rng = np.random.default_rng([self.seed, epoch, len(parts)])
        return _MergedEpochBatches(self.resolutions, parts, [int(o) for o in item_offsets],
                                   [int(o) for o in bucket_offsets], rng)

    def sample_path(self, index: int) -> str:
        return self._samples[index].path

    # --- samples --------------------------------------------------------------------------------

    def _rng(self, epoch: int, global_step: int, index: int, position: int, purpose: str) -> random.Random:
        # One generator per purpose, so turning an augmentation on does not change the captions.
        return bucketing.sample_rng(self.seed, epoch, f"{global_step}:{index}:{position}:{purpose}")

    def _plan(self, sample: _Sample, rng: random.Random) -> CropPlan:
        interpolation = sample.centre.interpolation  # the subset's resize_interpolation, for every crop
        if sample.face is not None:
            return face_crop_plan(sample.image.size, sample.settings.resolution, sample.face,
                                  sample.subset.face_crop_aug_range, sample.subset.random_crop, rng
                                  )._replace(interpolation=interpolation)
        if sample.subset.random_crop:
            return bucketing.plan_crop(sample.image.size, sample.image.resized, sample.image.bucket, rng
                                       )._replace(interpolation=interpolation)
        return sample.centre

    def _draw(self, index: int, epoch: int, global_step: int, position: int) -> tuple:
        """(descriptor, generator): flip first, then the crop; colour augmentation continues the stream."""
        sample = self._samples[index]
        rng = self._rng(epoch, global_step, index, position, "image")
        flip = bool(sample.subset.flip_aug and rng.random() < 0.5)
        return SampleDescriptor(sample.path, self._plan(sample, rng), flip, sample.subset.alpha_mask,
                                sample.image.entry.conditioning_path), rng

    def describe(self, index: int, epoch: int, global_step: int, position: int = 0) -> SampleDescriptor:
        """The descriptor (file, crop plan, flip) that `load_batch` uses for image `index` at that place."""
        return self._draw(index, epoch, global_step, position)[0]

    def latent_cache_samples(self) -> list[SampleDescriptor]:
        """What a latent cache must hold: every image's centre crop, plus its mirror image with flip_aug."""
        descriptors = []
        for sample in self._samples:
            flips = (False, True) if sample.subset.flip_aug else (False,)
            descriptors += [SampleDescriptor(sample.path, sample.centre, flip, sample.subset.alpha_mask,
                                             sample.image.entry.conditioning_path) for flip in flips]
        return list(dict.fromkeys(descriptors))

    def _pixels(self, sample: _Sample, descriptor: SampleDescriptor, rng: random.Random):
        """(pixels (3, H, W) in [-1, 1], alpha mask (H, W) or None)."""
        path, plan, flip = descriptor.path, descriptor.plan, descriptor.flip
        if not sample.subset.color_aug:
            return image_transforms.training_pixels_and_alpha(path, plan, flip, descriptor.alpha_mask)
        if descriptor.alpha_mask:
            rgb, alpha = image_files.load_image_with_alpha(path)
        else:
            rgb, alpha = image_files.load_image_rgb(path), None
        pixels = _to_unit_tensor(color_augment(image_transforms.crop_resized(rgb, plan, flip), rng))
        return pixels, self._mask(alpha, plan, flip, pixels.shape[1:]) if descriptor.alpha_mask else None

    @staticmethod
    def _mask(alpha: Optional[np.ndarray], plan: CropPlan, flip: bool, shape_hw) -> torch.Tensor:
        if alpha is None:
            return torch.ones(tuple(shape_hw), dtype=torch.float32)
        return torch.from_numpy(image_transforms.crop_resized(alpha, plan, flip)).float().div_(255.0)

    def _alpha_only(self, descriptor: SampleDescriptor) -> torch.Tensor:
        _, alpha = image_files.load_image_with_alpha(descriptor.path)
        plan = descriptor.plan
        return self._mask(alpha, plan, descriptor.flip, (plan.bucket[1], plan.bucket[0]))

    def _cached_latents(self, descriptors: list[SampleDescriptor]) -> Optional[list]:
        """Provider results for every sample, or None when any is missing (the batch then uses pixels)."""
        if self.latent_provider is None:
            return None
        results = []
        for descriptor in descriptors:
            found = self.latent_provider(descriptor)
            if found is None:
                return None
            if not isinstance(found, Mapping):
                found = {"latents": found}
            results.append(found)
        return results

    def caption(self, index: int, epoch: int, global_step: int, position: int = 0) -> str:
        """The processed caption `load_batch` gives image `index` at that place."""
        sample = self._samples[index]
        rng = self._rng(epoch, global_step, index, position, "caption")
        return process_caption(sample.image.entry.caption, sample.subset, epoch, rng, current_step=global_step,
                               max_train_steps=self.max_train_steps, replacements=self.replacements)

    def load_batch(self, batch: bucketing.Batch, epoch: int, global_step: int) -> dict:
        """Everything one training step needs for `batch` (from `epoch_batches(epoch)`).

        global_step: the optimizer step this batch trains at (token warm-up; also seeds the per-sample
        randomness, so compute it from the batch number instead of sharing a counter with workers).
        """
        samples = [self._samples[i] for i in batch.items]
        draws = [self._draw(index, epoch, global_step, position) for position, index in enumerate(batch.items)]
        descriptors, image_rngs = [d for d, _ in draws], [rng for _, rng in draws]
        captions = [self.caption(i, epoch, global_step, p) for p, i in enumerate(batch.items)]

        out: dict[str, Any] = {"image_paths": [s.path for s in samples], "captions": captions, "samples": descriptors}
        out.update(self._image_part(samples, descriptors, image_rngs))
        out.update(self._size_conditioning(descriptors))
        out.update(self._text_part(captions, descriptors))
        out["loss_weights"] = torch.tensor([s.image.entry.loss_weight for s in samples], dtype=torch.float32)
        out["network_multipliers"] = torch.tensor([s.image.entry.network_multiplier for s in samples], dtype=torch.float32)
        out["flipped"] = [d.flip for d in descriptors]
        out["custom_attributes"] = [dict(s.subset.custom_attributes) for s in samples]
        out["bucket"] = tuple(batch.resolution)
        return out

    def _image_part(self, samples: list[_Sample], descriptors: list[SampleDescriptor], rngs: list) -> dict:
        cached = self._cached_latents(descriptors)
        want_masks = any(d.alpha_mask for d in descriptors)
        masks = []
        if any(d.conditioning for d in descriptors):
            # a batch never mixes datasets, and in a ControlNet dataset every image has one
            stored = [c.get("conditioning") for c in cached] if cached is not None else [None] * len(descriptors)
            part = {"conditioning_images": torch.stack([
                torch.as_tensor(c).float() if c is not None
                else image_transforms.training_pixels(d.conditioning, d.plan, d.flip)
                for c, d in zip(stored, descriptors)])}
        else:
            part = {}
        if cached is not None:
            part["latents"] = torch.stack([torch.as_tensor(c["latents"]).float() for c in cached])
            for c, d in zip(cached, descriptors):
                if not d.alpha_mask:
                    masks.append(None)
                elif c.get("alpha_mask") is not None:
                    masks.append(torch.as_tensor(c["alpha_mask"]).float())
                else:  # the cache has no mask: read it from the file
                    masks.append(self._alpha_only(d))
        else:
            pixels = [self._pixels(s, d, rng) for s, d, rng in zip(samples, descriptors, rngs)]
            part["images"] = torch.stack([p for p, _ in pixels])
            masks = [m for _, m in pixels]
        if want_masks:
            bw, bh = descriptors[0].plan.bucket
            part["alpha_masks"] = torch.stack([m if m is not None else torch.ones((bh, bw)) for m in masks])
        return part

    @staticmethod
    def _size_conditioning(descriptors: list[SampleDescriptor]) -> dict:
        rows = torch.tensor([d.plan.sdxl_size_conditioning(d.flip) for d in descriptors], dtype=torch.int64)
        return {"original_sizes_hw": rows[:, 0:2], "crop_top_lefts": rows[:, 2:4], "target_sizes_hw": rows[:, 4:6]}

    def _text_part(self, captions: list[str], descriptors: list[SampleDescriptor]) -> dict:
        part: dict[str, Any] = {}
        if self.text_provider is not None:
            outputs = [self.text_provider(d, c) for d, c in zip(descriptors, captions)]
            if all(o is not None for o in outputs):
                part["text_outputs"] = outputs
        if not self.tokenizers:
            return part
        if self.weighted_captions:
            pairs = [text_encoding.tokenize_weighted(t, captions, self.max_token_length) for t in self.tokenizers]
            part["input_ids"] = [ids for ids, _ in pairs]
            part["input_id_weights"] = [weights for _, weights in pairs]
        else:
            part["input_ids"] = [text_encoding.tokenize(t, captions, self.max_token_length) for t in self.tokenizers]
        return part

    # --- torch ----------------------------------------------------------------------------------

    def epoch_view(self, epoch: int, first_global_step: int = 0, gradient_accumulation_steps: int = 1,
                   start_batch: int = 0) -> "EpochView":
        """A torch Dataset of this epoch's batches for `DataLoader(view, batch_size=None, shuffle=False)`."""
        return EpochView(self, epoch, first_global_step, gradient_accumulation_steps, start_batch)


class EpochView(torch.utils.data.Dataset):
    """Batch k of an epoch as dataset item k - start_batch; the global step of batch k is
    `first_global_step + k // gradient_accumulation_steps` (first_global_step = step at batch 0)."""

    def __init__(self, dataset: TrainDataset, epoch: int, first_global_step: int = 0,
                 gradient_accumulation_steps: int = 1, start_batch: int = 0):
        self.dataset = dataset
        self.epoch = epoch
        self.first_global_step = first_global_step
        self.accumulation = max(1, gradient_accumulation_steps)
        self.start_batch = start_batch
        self.batches = dataset.epoch_batches(epoch)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start_batch)

    def __getitem__(self, i: int) -> dict:
        k = i + self.start_batch
        step = self.first_global_step + k // self.accumulation
        return self.dataset.load_batch(self.batches[k], self.epoch, step)
