"""Aspect-ratio bucketing: bucket lists, image-to-bucket assignment, resize/crop plans, epoch batches.

Everything here is geometry on integers, done with numpy so a million images are bucketed in
about a second; nothing touches pixels and nothing imports torch. Sizes are always `(width,
height)` (PIL order) except where a name says `_hw` or `top_left`.

Behaviour matches kohya-ss/sd-scripts (`make_bucket_resolutions`, `BucketManager.select_bucket`,
`trim_and_resize_if_required`) for the same sizes and flags, with two deliberate deviations:

* crop offsets are the *real* offsets of the crop inside the resized image (centre or random),
  which is what SDXL's crop conditioning means; sd-scripts' `get_crop_ltrb` letterbox numbers
  (kept here as `kohya_crop_ltrb` for reading its caches) put them on the wrong axis;
* without `--enable_bucket` every image is cover-resized to the resolution and then cropped, as
  sd-scripts does only when caching latents (its uncached path crops without resizing).

See docs/bucketing.md for the flags and the shuffle algorithm.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)

Size = tuple  # (width, height) of ints

# Rows of the (images x buckets) distance matrix processed at once: bounds the temporary to ~32 MiB.
_DISTANCE_CELLS_PER_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------
# Flags and bucket lists


def parse_resolution(value) -> Size:
    """`--resolution` as `(W, H)`: "N" or N gives (N, N), "W,H" or (W, H) gives (W, H)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (int, np.integer)):
        parts = [value]
    else:
        parts = list(value)
    try:
        sides = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"--resolution {value!r}: expected N or W,H with integers, e.g. 512 or 768,512") from None
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) <= 0:
        raise UserError(f"--resolution {value!r}: expected one or two positive integers, e.g. 512 or 768,512")
    return (sides[0], sides[1])


def adjust_min_max_bucket_reso(resolution: Size, min_reso: int, max_reso: int, steps: int) -> tuple:
    """Round min down and max up to multiples of `steps` and check the resolution lies in between.

    Same rule as sd-scripts' `adjust_min_max_bucket_reso_by_steps`, with user errors instead of asserts.
    """
    if steps <= 0:
        raise UserError(f"--bucket_reso_steps {steps}: must be a positive integer (64 is usual, 32 also works)")
    if min_reso % steps:
        adjusted = min_reso - min_reso % steps
        logger.warning("min_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d", min_reso, steps, adjusted)
        min_reso = adjusted
    if max_reso % steps:
        adjusted = max_reso + steps - max_reso % steps
        logger.warning("max_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d", max_reso, steps, adjusted)
        max_reso = adjusted
    if min(resolution) < min_reso:
        raise UserError(
            f"--min_bucket_reso {min_reso} is larger than the resolution's shorter side {min(resolution)}; "
            f"lower --min_bucket_reso or raise --resolution"
        )
    if max(resolution) > max_reso:
        raise UserError(
            f"--max_bucket_reso {max_reso} is smaller than the resolution's longer side {max(resolution)}; "
            f"raise --max_bucket_reso or lower --resolution"
        )
    return min_reso, max_reso


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list:
    """The bucket list of sd-scripts: the square bucket plus a width sweep in both orientations.

    Sorted by (width, height); no bucket has more pixels than `max_reso[0] * max_reso[1]`.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketSettings:
    """The bucketing flags of one dataset, already validated (build with `from_flags`)."""

    resolution: Size  # (W, H); max area of buckets, and the only bucket without enable_bucket
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def from_flags(
        cls,
        resolution,
        enable_bucket: bool = False,
        min_bucket_reso: Optional[int] = 256,
        max_bucket_reso: Optional[int] = 1024,
        bucket_reso_steps: Optional[int] = 64,
        bucket_no_upscale: bool = False,
    ) -> "BucketSettings":
        """Validate the CLI/TOML values (None means the default) and apply sd-scripts' rounding."""
        reso = parse_resolution(resolution)
        steps = 64 if bucket_reso_steps is None else int(bucket_reso_steps)
        lo = 256 if min_bucket_reso is None else int(min_bucket_reso)
        hi = 1024 if max_bucket_reso is None else int(max_bucket_reso)
        if enable_bucket:
            lo, hi = adjust_min_max_bucket_reso(reso, lo, hi, steps)
            if steps % 8:
                logger.warning("bucket_reso_steps %d is not a multiple of 8: buckets will not map to whole latents", steps)
        return cls(reso, bool(enable_bucket), lo, hi, steps, bool(enable_bucket and bucket_no_upscale))

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def predefined_buckets(self) -> Optional[list]:
        """The fixed bucket list, or None in no-upscale mode (buckets made per image)."""
        if not self.enable_bucket:
            return [tuple(self.resolution)]
        if self.bucket_no_upscale:
            return None
        return make_bucket_resolutions(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)


# --------------------------------------------------------------------------------------------
# Assignment


class Assignment(NamedTuple):
    """Where one image goes: its bucket, the cover-resized size, and bucket AR minus image AR."""

    bucket: Size
    resized: Size
    ar_error: float


@dataclass
class Assignments:
    """Assignments of many images, one row per image, as int64/float64 arrays."""

    bucket_w: np.ndarray
    bucket_h: np.ndarray
    resized_w: np.ndarray
    resized_h: np.ndarray
    ar_error: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket_w)

    def __getitem__(self, i: int) -> Assignment:
        return Assignment(
            (int(self.bucket_w[i]), int(self.bucket_h[i])),
            (int(self.resized_w[i]), int(self.resized_h[i])),
            float(self.ar_error[i]),
        )

    @property
    def valid(self) -> np.ndarray:
        """False where the bucket has a zero side (no-upscale mode, image smaller than the steps)."""
        return (self.bucket_w > 0) & (self.bucket_h > 0)

    def bucket_table(self) -> tuple:
        """(resolutions, index): the used buckets sorted by (w, h) and each image's index into them.

        This is sd-scripts' bucket numbering after `BucketManager.sort()` (only buckets that got images).
        """
        keys = (self.bucket_w << 32) | self.bucket_h
        unique, index = np.unique(keys, return_inverse=True)
        resolutions = [(int(k >> 32), int(k & 0xFFFFFFFF)) for k in unique]
        return resolutions, index.astype(np.int64)

    def mean_abs_ar_error(self) -> float:
        return float(np.mean(np.abs(self.ar_error))) if len(self) else 0.0


class BucketAssigner:
    """Assigns image sizes to buckets exactly as sd-scripts' `BucketManager.select_bucket`."""

    def __init__(self, settings: BucketSettings):
        self.settings = settings
        self.buckets = settings.predefined_buckets()  # None in no-upscale mode
        if self.buckets is not None:
            self._bw = np.array([b[0] for b in self.buckets], dtype=np.int64)
            self._bh = np.array([b[1] for b in self.buckets], dtype=np.int64)
            self._bucket_ar = self._bw / self._bh
            keys = (self._bw << 32) | self._bh
            self._key_order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._key_order]

    def select(self, width: int, height: int, name: str = "image") -> Assignment:
        """One image; raises UserError when no bucket can hold it (no-upscale, side < steps)."""
        result = self.assign([width], [height])
        if not result.valid[0]:
            raise UserError(f"{name}: {self.unbucketable_reason(width, height, result[0].resized)}")
        return result[0]

    def assign(self, widths: Sequence[int], heights: Sequence[int]) -> Assignments:
        """Many images at once (vectorised); check `.valid` for images too small to bucket."""
        w = np.asarray(widths, dtype=np.int64).reshape(-1)
        h = np.asarray(heights, dtype=np.int64).reshape(-1)
        if w.shape != h.shape:
            raise ValueError("widths and heights differ in length")
        if len(w) and (w.min() <= 0 or h.min() <= 0):
            raise ValueError("image sides must be positive")
        if self.buckets is None:
            return self._assign_no_upscale(w, h)
        return self._assign_predefined(w, h)

    def unbucketable_reason(self, width: int, height: int, resized: Size) -> str:
        """Why --bucket_no_upscale finds no bucket for a width x height image (resized: its assignment's)."""
        steps = self.settings.bucket_reso_steps
        if tuple(resized) == (width, height):
            why = f"--bucket_no_upscale keeps its size {width}x{height}, and a side under --bucket_reso_steps {steps}"
        else:
            rw, rh = self.settings.resolution
            why = (f"--bucket_no_upscale shrinks {width}x{height} to the area of --resolution {rw},{rh}, leaving a side "
                   f"under --bucket_reso_steps {steps}")
        return (f"no bucket can hold it: {why} gives an empty bucket; raise --resolution, lower "
                f"--bucket_reso_steps or drop --bucket_no_upscale")

    def _nearest_bucket(self, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Index of the exact-size bucket if any, else of the least |bucket AR - image AR| (first on ties)."""
        n = len(w)
        index = np.empty(n, dtype=np.int64)
        chunk = max(1, _DISTANCE_CELLS_PER_CHUNK // len(self.buckets))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            ar = w[start:stop] / h[start:stop]
            # Same float operation as sd-scripts (bucket_ar - ar, abs, argmin) so ties resolve identically.
            index[start:stop] = np.abs(self._bucket_ar[None, :] - ar[:, None]).argmin(axis=1)
        keys = (w << 32) | h
        pos = np.searchsorted(self._sorted_keys, keys)
        pos = np.minimum(pos, len(self._sorted_keys) - 1)
        exact = self._sorted_keys[pos] == keys
        index[exact] = self._key_order[pos[exact]]
        return index

    def _assign_predefined(self, w: np.ndarray, h: np.ndarray) -> Assignments:
        index = self._nearest_bucket(w, h)
        bw, bh = self._bw[index], self._bh[index]
        ar = w / h
        # Cover scale: match the side that leaves the other one at least as large as the bucket.
        scale = np.where(ar > bw / bh, bh / h, bw / w)
        rw = np.floor(w * scale + 0.5).astype(np.int64)
        rh = np.floor(h * scale + 0.5).astype(np.int64)
        return Assignments(bw, bh, rw, rh, bw / bh - ar)

    def _assign_no_upscale(self, w: np.ndarray, h: np.ndarray) -> Assignments:
        steps = self.settings.bucket_reso_steps
        max_area = self.settings.max_area
        ar = w / h

        def round_to_steps(x):
            x = np.floor(x + 0.5).astype(np.int64)
            return x - x % steps

        with np.errstate(divide="ignore", invalid="ignore"):
            fit_w = np.sqrt(max_area * ar)
            fit_h = max_area / fit_w
            w1 = round_to_steps(fit_w)
            h1 = round_to_steps(w1 / ar)
            err1 = np.abs(w1 / h1 - ar)
            h2 = round_to_steps(fit_h)
            w2 = round_to_steps(h2 * ar)
            err2 = np.abs(w2 / h2 - ar)
        by_width = err1 < err2  # NaN (zero-size candidate) compares False, as in sd-scripts' tie rule
        shrunk_w = np.where(by_width, w1, np.floor(h2 * ar + 0.5).astype(np.int64))
        shrunk_h = np.where(by_width, np.floor(w1 / ar + 0.5).astype(np.int64), h2)
        too_big = w * h > max_area
        rw = np.where(too_big, shrunk_w, w)
        rh = np.where(too_big, shrunk_h, h)
        bw = rw - rw % steps
        bh = rh - rh % steps
        with np.errstate(divide="ignore", invalid="ignore"):
            ar_error = bw / bh - ar
        return Assignments(bw, bh, rw, rh, ar_error)


def bucket_info(assignments: Assignments, repeats: Sequence[int]) -> dict:
    """sd-scripts' `bucket_info` metadata: per used bucket its resolution and count with repeats.

    `mean_img_ar_error` is the mean |AR error| over images (without repeats).
    """
    resolutions, index = assignments.bucket_table()
    counts = np.bincount(index, weights=np.asarray(repeats, dtype=np.int64), minlength=len(resolutions))
    buckets = {i: {"resolution": reso, "count": int(c)} for i, (reso, c) in enumerate(zip(resolutions, counts)) if c > 0}
    return {"buckets": buckets, "mean_img_ar_error": assignments.mean_abs_ar_error()}


# --------------------------------------------------------------------------------------------
# Resize and crop


class CropPlan(NamedTuple):
    """How one image becomes a training sample: resize to `resized`, then crop `bucket` at (left, top).

    Offsets are real pixel offsets inside the resized image. `interpolation` is the subset's
    `resize_interpolation` (None: area when shrinking, Lanczos when enlarging).
    """

    original_size: Size  # (w, h) as loaded, after EXIF orientation
    resized_size: Size
    bucket: Size
    left: int
    top: int
    interpolation: Optional[str] = None

    @property
    def crop_ltrb(self) -> tuple:
        """(left, top, right, bottom) of the crop in resized-image pixels (right/bottom exclusive)."""
        return (self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1])

    def flipped_left(self) -> int:
        """Crop left of the horizontally flipped sample, measured in the flipped resized image."""
        return self.resized_size[0] - self.left - self.bucket[0]

    def sdxl_size_conditioning(self, flipped: bool = False) -> tuple:
        """The six SDXL `time_ids` numbers for this sample (see `sdxl_size_conditioning`)."""
        left = self.flipped_left() if flipped else self.left
        return sdxl_size_conditioning(self.original_size, (self.top, left), self.bucket)


def plan_crop(original_size: Size, resized_size: Size, bucket: Size, rng: Optional[random.Random] = None) -> CropPlan:
    """Crop offsets for a resized image: centred (`rng` None) or `rng.randint(0, excess)` per axis.

    Like sd-scripts, width is drawn before height and an axis without excess draws nothing, so the
    same generator state gives the same offsets as its random crop.
    """
    rw, rh = resized_size
    bw, bh = bucket
    if rw < bw or rh < bh:
        raise ValueError(f"resized size {resized_size} is smaller than bucket {bucket}")
    left = _crop_start(rw - bw, rng)
    top = _crop_start(rh - bh, rng)
    return CropPlan(tuple(original_size), tuple(resized_size), tuple(bucket), left, top)


def _crop_start(excess: int, rng: Optional[random.Random]) -> int:
    if excess <= 0:
        return 0
    return rng.randint(0, excess) if rng is not None else excess // 2


def plan_crop_for(original_size: Size, assignment: Assignment, rng: Optional[random.Random] = None) -> CropPlan:
    """`plan_crop` for an `Assignment` of the same image."""
    return plan_crop(original_size, assignment.resized, assignment.bucket, rng)


def centre_crops(assignments: Assignments) -> tuple:
    """(left, top) arrays of the centre crops of all assignments."""
    return (assignments.resized_w - assignments.bucket_w) // 2, (assignments.resized_h - assignments.bucket_h) // 2


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator for one sample's random choices, a pure function of (seed, epoch, entry index).

    Seeding from a string is deterministic across runs and platforms (CPython hashes it with
    SHA-512), so a resumed run crops exactly as the original would have.
    """
    return random.Random(f"sdtrain:{seed}:{epoch}:{index}")


def sdxl_size_conditioning(original_size: Size, crop_top_left: tuple, target_size: Size) -> tuple:
    """SDXL's six size numbers in `time_ids` order: (orig h, orig w, crop top, crop left, target h, target w).

    `original_size` and `target_size` are (w, h) like every size in this module; `crop_top_left`
    is (top, left) as its name says.
    """
    ow, oh = original_size
    top, left = crop_top_left
    tw, th = target_size
    return (int(oh), int(ow), int(top), int(left), int(th), int(tw))


def kohya_crop_ltrb(bucket: Size, image_size: Size) -> tuple:
    """sd-scripts' `get_crop_ltrb` (letterbox placement, floats): only for reading or comparing its caches.

    Training here uses the real crop offsets (`CropPlan.crop_ltrb`) instead.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        fit_w, fit_h = bucket[1] * image_ar, bucket[1]
    else:
        fit_w, fit_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - fit_w) // 2
    top = (bucket[1] - fit_h) // 2
    return (left, top, left + fit_w, top + fit_h)


# --------------------------------------------------------------------------------------------
# Batches


class Batch(NamedTuple):
    bucket_index: int  # into the `resolutions` list the batches were made with
    resolution: Size
    items: list  # image indices (repeats appear as duplicates)


class EpochBatches:
    """The batches of one epoch in training order; `len()` and `[k]` are cheap for millions of entries."""

    def __init__(self, resolutions: list, items: np.ndarray, starts: np.ndarray, lengths: np.ndarray, buckets: np.ndarray):
        self.resolutions = resolutions
        self._items = items
        self._starts = starts
        self._lengths = lengths
        self._buckets = buckets

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, k: int) -> Batch:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        start = int(self._starts[k])
        bucket = int(self._buckets[k])
        items = self._items[start : start + int(self._lengths[k])].tolist()
        return Batch(bucket, self.resolutions[bucket], items)

    def __iter__(self) -> Iterator[Batch]:
        for k in range(len(self)):
            yield self[k]


def _entries(bucket_index: np.ndarray, repeats: Sequence[int]) -> tuple:
    """Image index and bucket of every entry: image i appears `repeats[i]` times, in image order."""
    repeats = np.asarray(repeats, dtype=np.int64).reshape(-1)
    if len(repeats) != len(bucket_index):
        raise ValueError("repeats and bucket_index differ in length")
    if len(repeats) and repeats.min() < 0:
        raise ValueError("repeats must be >= 0")
    items = np.repeat(np.arange(len(repeats), dtype=np.int64), repeats)
    return items, bucket_index[items]


def count_batches(bucket_index: Sequence[int], repeats: Sequence[int], batch_size: int) -> int:
    """Batches per epoch: sum over buckets of ceil(entries / batch_size) (independent of the shuffle)."""
    bucket_index = np.asarray(bucket_index, dtype=np.int64).reshape(-1)
    _, entry_bucket = _entries(bucket_index, repeats)
    counts = np.bincount(entry_bucket) if len(entry_bucket) else np.zeros(0, dtype=np.int64)
    return int(np.sum(-(-counts // batch_size)))


def make_epoch_batches(
    resolutions: list, bucket_index: Sequence[int], repeats: Sequence[int], batch_size: int, seed: int, epoch: int
) -> EpochBatches:
    """The shuffled batch list of one epoch, a pure function of its arguments.

    Algorithm (exact, so a resumed run can skip to any batch):
    1. entries = image i repeated `repeats[i]` times, in image order;
    2. `rng = numpy.random.default_rng(seed + epoch)` (PCG64 seeded through SeedSequence);
    3. `keys = rng.random(len(entries))`; entries are ordered by (bucket index, key) with a stable
       sort, i.e. each bucket's entries are randomly permuted and buckets follow index order;
    4. each bucket is cut into consecutive batches of `batch_size` (its last batch may be short),
       so no batch mixes buckets;
    5. the batch list is reordered by `rng.permutation(number_of_batches)`.
    The training loop must iterate the result in order (no extra DataLoader shuffle).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if seed + epoch < 0:
        raise ValueError("seed + epoch must be >= 0")
    bucket_index = np.asarray(bucket_index, dtype=np.int64).reshape(-1)
    items, entry_bucket = _entries(bucket_index, repeats)
    rng = np.random.default_rng(seed + epoch)
    keys = rng.random(len(items))
    order = np.lexsort((keys, entry_bucket))
    items = items[order]
    entry_bucket = entry_bucket[order]

    counts = np.bincount(entry_bucket, minlength=len(resolutions)) if len(items) else np.zeros(len(resolutions), np.int64)
    bucket_starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else np.zeros(0, np.int64)
    per_bucket = -(-counts // batch_size)
    batch_bucket = np.repeat(np.arange(len(counts), dtype=np.int64), per_bucket)
    first_batch = np.concatenate(([0], np.cumsum(per_bucket)[:-1])) if len(per_bucket) else np.zeros(0, np.int64)
    batch_no = np.arange(len(batch_bucket), dtype=np.int64) - first_batch[batch_bucket]
    starts = bucket_starts[batch_bucket] + batch_no * batch_size
    ends = np.minimum(starts + batch_size, bucket_starts[batch_bucket] + counts[batch_bucket])

    perm = rng.permutation(len(starts))
    return EpochBatches(list(resolutions), items, starts[perm], (ends - starts)[perm], batch_bucket[perm])
