"""Check a whole dataset before any model loads: every image, caption and bucket, all problems at once.

`scan_dataset` lists the images of a `ResolvedConfig` (`sources`), reads every image header
once (`image_files`; optionally decodes every file), assigns buckets per dataset (`bucketing`) and
gathers every problem into one `DatasetScan`:

* bad files, each with a reason: unreadable / corrupt / truncated / empty images, broken symbolic
  links, non-images with an image extension, decompression bombs, images no bucket can hold
  (`--bucket_no_upscale` with a side under `--bucket_reso_steps`), caption files that are not UTF-8,
  metadata keys without an image, broken or mismatched conditioning images;
* errors that no skipping can fix (a missing folder, a dataset left without images);
* notes: images without a caption (class tokens or "" are used), empty caption files, images smaller
  than their bucket (upscaled into it, as sd-scripts does; also logged as one warning), and so on.

`DatasetScan.raise_for_problems()` stops the run with one message listing the bad files, unless the
user passed `--skip_bad_images`; then the bad files are left out with one warning. The scan also
backs `--dataset_check` (every trainer) and `tools/check_dataset.py`: `library.data.check` runs
it from the flags, `library.data.report` builds and prints the report.

No torch here: the scan runs before any model is loaded and in the standalone check tool. numpy,
PIL and the image modules are imported when a scan runs, so that parsers adding the flags stay
instant.
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Sequence

from library.data.config import DatasetParams, ResolvedConfig, check_bucket_reso_steps
from library.errors import UserError

if TYPE_CHECKING:
    from library.data import bucketing
    from library.data.sources import DatasetSources, ImageEntry, SourceProblem

logger = logging.getLogger(__name__)

SKIP_FLAG = "--skip_bad_images"
FULL_CHECK_FLAG = "--full_image_check"
_LISTED = 20  # bad files named in one error / warning line
# Decoding is ~100x the cost of a header read: worth a process pool much earlier than the scan.
_MIN_FILES_FOR_DECODE_POOL = 16


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadFile:
    """A file that cannot be trained on; `image` is the training image dropped because of it
    (differs from `path` for caption files and conditioning images)."""

    path: str
    reason: str
    image: Optional[str] = None


@dataclass
class ScannedImage:
    """One usable image of a dataset: its entry, upright size and bucket assignment."""

    entry: ImageEntry
    size: tuple  # (w, h) from the header, after EXIF orientation
    bucket: tuple  # (w, h)
    resized: tuple  # (w, h) cover-resized size before the crop
    ar_error: float
    caption_tokens: Optional[int] = None  # set by `measure_caption_tokens`

    @property
    def path(self) -> str:
        return self.entry.path


@dataclass
class ScannedDataset:
    """One dataset after the scan; `train` / `validation` hold only usable images."""

    index: int
    params: DatasetParams
    settings: Optional[bucketing.BucketSettings]
    sources: DatasetSources
    train: list[ScannedImage] = field(default_factory=list)
    validation: list[ScannedImage] = field(default_factory=list)

    def images(self, split: str = "train") -> list[ScannedImage]:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
        return self.train if split == "train" else self.validation

    def bucket_counts(self, split: str = "train") -> dict[tuple, int]:
        """{(w, h): samples per epoch, repeats included}, sorted by (w, h)."""
        counts: dict[tuple, int] = {}
        for image in self.images(split):
            counts[image.bucket] = counts.get(image.bucket, 0) + image.entry.repeats
        return dict(sorted(counts.items()))

    def num_batches(self, split: str = "train") -> int:
        batch_size = self.params.batch_size
        return sum(-(-count // batch_size) for count in self.bucket_counts(split).values())

    def bucket_info(self) -> dict:
        """sd-scripts' `ss_bucket_info` value for the training split."""
        buckets = self.bucket_counts("train")
        errors = [abs(image.ar_error) for image in self.train]
        return {
            "buckets": {i: {"resolution": reso, "count": n} for i, (reso, n) in enumerate(buckets.items())},
            "mean_img_ar_error": statistics.fmean(errors) if errors else 0.0,
        }


@dataclass
class DatasetScan:
    config: ResolvedConfig
    datasets: list[ScannedDataset]
    bad_files: list[BadFile]
    errors: list[str]  # not fixable by skipping files
    missing_captions: list[str]
    notes: list[str]  # warnings worth showing in a report
    skip_bad: bool = False
    full_check: bool = False

    @property
    def ok(self) -> bool:
        """True when training can start (bad files count only without --skip_bad_images)."""
        return not self.errors and (self.skip_bad or not self.bad_files)

    def raise_for_problems(self) -> None:
        """One UserError for everything that stops training; with skip_bad one warning for the bad files."""
        listing = _listing(self.bad_files)
        if self.errors:
            extra = f"; also {len(self.bad_files)} bad file(s): {listing}" if self.bad_files else ""
            raise UserError("; ".join(self.errors) + extra)
        if not self.bad_files:
            return
        if self.skip_bad:
            logger.warning(f"{SKIP_FLAG}: leaving out {len(self.bad_files)} bad file(s): {listing}")
            return
        raise UserError(
            f"{len(self.bad_files)} bad file(s) in the dataset: {listing}. Fix or remove them, or pass {SKIP_FLAG} "
            f"to train without them (tools/check_dataset.py with the same dataset flags lists them all)"
        )


def _listing(bad_files: Sequence[BadFile]) -> str:
    shown = "; ".join(f"{bad.path}: {bad.reason}" for bad in bad_files[:_LISTED])
    more = f"; and {len(bad_files) - _LISTED} more" if len(bad_files) > _LISTED else ""
    return shown + more


# --- the scan -----------------------------------------------------------------------------------


def bucket_steps_multiple(family) -> int:
    """What bucket_reso_steps must divide into for a family (sd-scripts: 32 for SDXL, 64 for SD1/2)."""
    return 32 if family is not None and family.is_sdxl else 64


def scan_dataset(
    config: ResolvedConfig,
    family_bucket_steps: Optional[int] = None,
    skip_bad: bool = False,
    full_check: bool = False,
    *,
    num_workers: Optional[int] = None,
    max_pixels: Optional[int] = None,
) -> DatasetScan:
    """Scan every dataset of `config`; never raises for per-file problems (see `raise_for_problems`).

    family_bucket_steps: bucket_reso_steps must be a multiple of it (64 SD1/2, 32 SDXL; None = no check).
    full_check: decode every image (finds damage in the middle of files; much slower). Without it,
    only files whose end marker is missing are decoded.
    num_workers: processes for reading images (default: up to 2). max_pixels: decompression-bomb
    limit (default `image_files.DEFAULT_MAX_PIXELS`).
    """
    from library.data import sources as dataset_sources, image_files

    max_pixels = max_pixels or image_files.DEFAULT_MAX_PIXELS
    if family_bucket_steps:
        check_bucket_reso_steps(config, family_bucket_steps)
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    all_sources = dataset_sources.collect_entries(config, strict=False)

    bad: list[BadFile] = []
    errors: list[str] = []
    notes: list[str] = []
    missing_captions: list[str] = []
    datasets = []
    for params, sources in zip(config.datasets, all_sources):
        dropped = _source_problems(sources, params, bad, errors, notes)
        datasets.append((params, sources, dropped))

    image_status = _check_image_files(_paths_to_check(all_sources), full_check, workers, max_pixels)

    scanned = []
    for params, sources, dropped in datasets:
        dataset = _scan_one(params, sources, dropped, image_status, bad, errors, notes)
        scanned.append(dataset)
        kept = {image.path for image in dataset.train + dataset.validation}
        missing_captions += [path for path in dict.fromkeys(sources.missing_captions) if path in kept]

    # An image in two datasets is reported once per distinct reason; sorted so reports are stable.
    bad = sorted(dict.fromkeys(bad), key=lambda b: (b.path, b.reason))
    scan = DatasetScan(config, scanned, bad, errors, missing_captions, notes, skip_bad, full_check)
    logger.info(_summary_line(scan))
    return scan


def _summary_line(scan: DatasetScan) -> str:
    n = sum(len(d.train) + len(d.validation) for d in scan.datasets)
    return f"dataset scan: {n} usable image(s), {len(scan.bad_files)} bad file(s), {len(scan.missing_captions)} without caption"


def _source_problems(
    sources: DatasetSources, params: DatasetParams, bad: list, errors: list, notes: list
) -> set[str]:
    """File problems found while listing (captions, metadata keys); returns image paths to drop."""
    dropped: set[str] = set()
    label = f"dataset #{sources.dataset_index + 1}"
    by_kind: dict[str, list[str]] = {}
    users = _images_using_captions({p.path for p in sources.problems if p.kind == "not_utf8"}, sources, params)
    for problem in sources.problems:
        if problem.kind == "missing_dir":
            errors.append(f"{label}: {problem.message}")
        elif problem.kind == "not_utf8":
            for image in users.get(problem.path) or [problem.path]:
                dropped.add(image)
                bad.append(BadFile(problem.path, _reason(problem), image))
        elif problem.is_error:
            bad.append(BadFile(problem.path, _reason(problem)))
        else:
            by_kind.setdefault(problem.kind, []).append(problem.message)
    for messages in by_kind.values():
        more = f" (and {len(messages) - 3} more like it)" if len(messages) > 3 else ""
        notes.append(f"{label}: " + "; ".join(messages[:3]) + more)
    return dropped


def _reason(problem: "SourceProblem") -> str:
    prefix = f"{problem.path}: "
    return problem.message[len(prefix):] if problem.message.startswith(prefix) else problem.message


def _images_using_captions(caption_paths: set[str], sources: DatasetSources, params: DatasetParams) -> dict:
    """{unreadable caption file: images whose caption lookup stops at it} (one pass over the images)."""
    from library.data.sources import caption_candidates

    users: dict[str, list[str]] = {}
    if not caption_paths:
        return users
    for entry in sources.train + sources.validation:
        subset = params.subsets[entry.subset_index]
        for candidate in caption_candidates(entry.path, subset.caption_extension):
            if os.path.isfile(candidate):
                if candidate in caption_paths and entry.path not in users.get(candidate, []):
                    users.setdefault(candidate, []).append(entry.path)
                break
    return users


def _paths_to_check(all_sources: Sequence[DatasetSources]) -> list[str]:
    paths = []
    for sources in all_sources:
        for entry in sources.train + sources.validation:
            paths.append(entry.path)
            if entry.conditioning_path:
                paths.append(entry.conditioning_path)
    return list(dict.fromkeys(paths))


@dataclass(frozen=True)
class _FileStatus:
    size: Optional[tuple]
    reason: Optional[str]


def _check_image_files(paths: list[str], full: bool, workers: int, max_pixels: int) -> dict[str, _FileStatus]:
    """Header scan of every file, then a decode of every file (full) or of the suspicious ones."""
    from library.data import image_files

    if len(paths) > 1000:
        logger.info(f"reading {len(paths)} image headers{' and decoding every image' if full else ''}...")
    infos = image_files.scan_images(paths, max_pixels, None, workers)
    status = {info.path: _FileStatus(info.size, info.reason) for info in infos}
    to_decode = [info.path for info in infos if info.ok and (full or not info.tail_ok)]
    for path, reason in zip(to_decode, _decode_all(to_decode, workers, max_pixels)):
        if reason is not None:
            status[path] = _FileStatus(None, reason)
    return status


def _verify(job) -> Optional[str]:
    from library.data import image_files

    path, max_pixels = job
    return image_files.verify_image_decodes(path, max_pixels)


def _decode_all(paths: list[str], workers: int, max_pixels: int) -> list[Optional[str]]:
    jobs = [(path, max_pixels) for path in paths]
    if workers <= 1 or len(jobs) < _MIN_FILES_FOR_DECODE_POOL:
        return [_verify(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_verify, jobs, chunksize=8))


def _bucket_settings(params: DatasetParams) -> "bucketing.BucketSettings":
    from library.data.bucketing import BucketSettings

    return BucketSettings.from_flags(
        params.resolution,
        params.enable_bucket,
        params.min_bucket_reso,
        params.max_bucket_reso,
        params.bucket_reso_steps,
        params.bucket_no_upscale,
    )


def _scan_one(
    params: DatasetParams,
    sources: DatasetSources,
    dropped: set[str],
    status: dict[str, _FileStatus],
    bad: list,
    errors: list,
    notes: list,
) -> ScannedDataset:
    label = f"dataset #{sources.dataset_index + 1}"
    if params.resolution is None:
        errors.append(f"{label}: no resolution set; add resolution = 512 (or [W, H]) to the dataset or pass --resolution")
        return ScannedDataset(sources.dataset_index, params, None, sources)
    settings = _bucket_settings(params)
    result = ScannedDataset(sources.dataset_index, params, settings, sources)
    mismatched: list[str] = []
    from library.data.bucketing import BucketAssigner

    assigner = BucketAssigner(settings)

    def usable(entries: list[ImageEntry]) -> list[tuple]:
        kept = []
        for entry in entries:
            if entry.path in dropped:
                continue
            problem = _image_problem(entry, status)
            if problem is not None:
                bad.append(problem)
                continue
            size = status[entry.path].size
            if entry.image_size is not None and tuple(entry.image_size) != tuple(size):
                mismatched.append(f"{entry.path} ({entry.image_size[0]}x{entry.image_size[1]} stored, {size[0]}x{size[1]} read)")
            kept.append((entry, size))
        return _bucketable(assigner, kept, bad)

    train = usable(sources.train)
    validation = usable(sources.validation)
    if len(train) < len(sources.train):
        train = _rebalance_reg(train, params)
    result.train = _assign(assigner, train)
    result.validation = _assign(assigner, validation)
    _note_upscaled(label, result.train + result.validation, notes)

    if mismatched:
        notes.append(f"{label}: {len(mismatched)} image(s) differ from the size stored in metadata; the real size is "
                     f"used: " + ", ".join(mismatched[:3]))
    if not any(not image.entry.is_reg for image in result.train):
        if sources.num_train_images == 0:
            errors.append(f"{label}: no training images found (see the warnings above for skipped folders or subsets)")
        else:
            errors.append(f"{label}: none of its training images is usable (all are listed as bad files)")
    return result


def _image_problem(entry: ImageEntry, status: dict[str, _FileStatus]) -> Optional[BadFile]:
    """The bad file (the image, or its conditioning image) that keeps this image out of training."""
    image = status[entry.path]
    if image.reason is not None:
        return BadFile(entry.path, image.reason, entry.path)
    w, h = image.size
    if entry.conditioning_path:
        cond = status[entry.conditioning_path]
        if cond.reason is not None:
            return BadFile(entry.conditioning_path, f"conditioning image: {cond.reason}", entry.path)
        if tuple(cond.size) != tuple(image.size):
            reason = (f"conditioning image is {cond.size[0]}x{cond.size[1]} but {os.path.basename(entry.path)} is "
                      f"{w}x{h}; they must be the same size")
            return BadFile(entry.conditioning_path, reason, entry.path)
    return None


def _bucketable(assigner: "bucketing.BucketAssigner", items: list[tuple], bad: list) -> list[tuple]:
    """The images some bucket can hold; the others become bad files naming the settings.

    Only --bucket_no_upscale can leave an image without a bucket: its buckets are the image's own
    size (shrunk to the resolution's area when larger) floored to --bucket_reso_steps, so a side
    under one step leaves an empty bucket. Every other mode cover-scales the image into a bucket."""
    if not items:
        return items
    assignments = assigner.assign([size[0] for _, size in items], [size[1] for _, size in items])
    valid = assignments.valid
    if valid.all():
        return items
    kept = []
    for i, (entry, size) in enumerate(items):
        if valid[i]:
            kept.append((entry, size))
            continue
        reason = assigner.unbucketable_reason(size[0], size[1], assignments[i].resized)
        bad.append(BadFile(entry.path, reason, entry.path))
    return kept


def _note_upscaled(label: str, images: list[ScannedImage], notes: list) -> None:
    """One warning (and report note) listing the images enlarged into their bucket."""
    upscaled = list({image.path: image for image in images
                     if image.resized[0] > image.size[0] or image.resized[1] > image.size[1]}.values())
    if not upscaled:
        return
    shown = ", ".join(f"{os.path.basename(image.path)} {image.size[0]}x{image.size[1]} -> "
                      f"{image.resized[0]}x{image.resized[1]}" for image in upscaled[:_LISTED])
    more = f" and {len(upscaled) - _LISTED} more" if len(upscaled) > _LISTED else ""
    note = (f"{label}: {len(upscaled)} image(s) smaller than their bucket are upscaled into it, as sd-scripts does "
            f"(--bucket_no_upscale keeps small images at their size): {shown}{more}")
    logger.warning(note)
    notes.append(note)


def _rebalance_reg(train: list[tuple], params: DatasetParams) -> list[tuple]:
    """Re-run reg balancing after bad images were dropped, so reg samples still match training samples."""
    from library.data.sources import balance_reg_entries

    regular = [(e, s) for e, s in train if not e.is_reg]
    reg = [(e, s) for e, s in train if e.is_reg]
    if not reg:
        return train
    target = sum(e.repeats for e, _ in regular)
    sizes = {e.path: s for e, s in reg}
    fresh = [replace(e, repeats=params.subsets[e.subset_index].num_repeats) for e, _ in reg]
    return regular + [(e, sizes[e.path]) for e in balance_reg_entries(fresh, target)]


def _assign(assigner: "bucketing.BucketAssigner", items: list[tuple]) -> list[ScannedImage]:
    if not items:
        return []
    widths = [size[0] for _, size in items]
    heights = [size[1] for _, size in items]
    assignments = assigner.assign(widths, heights)
    return [
        ScannedImage(entry, tuple(size), a.bucket, a.resized, a.ar_error)
        for (entry, size), a in zip(items, (assignments[i] for i in range(len(items))))
    ]
