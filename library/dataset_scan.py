"""Check a whole dataset before any model loads: every image, caption and bucket, all problems at once.

`scan_dataset` lists the images of a `ResolvedConfig` (`dataset_sources`), reads every image header
once (`image_files`; optionally decodes every file), assigns buckets per dataset (`bucketing`) and
gathers every problem into one `DatasetScan`:

* bad files, each with a reason: unreadable / corrupt / truncated / empty images, non-images with an
  image extension, decompression bombs, images too small for the smallest bucket, caption files that
  are not UTF-8, metadata keys without an image, broken or mismatched conditioning images;
* errors that no skipping can fix (a missing folder, a dataset left without images);
* notes: images without a caption (class tokens or "" are used), empty caption files, and so on.

`DatasetScan.raise_for_problems()` stops the run with one message listing the bad files, unless the
user passed `--skip_bad_images`; then the bad files are left out with one warning. The scan also
backs `--dataset_check` (every trainer) and `tools/check_dataset.py`: `report()` is the JSON report
and `format_report()` its text form.

No torch here: the scan runs before any model is loaded and in the standalone check tool. Caption
token counts need a tokenizer (transformers, which does not import torch for tokenizing). numpy, PIL
and the image modules are imported when a scan runs, so that parsers adding the flags stay instant.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Sequence

from library.captions import process_caption
from library.dataset_config import (
    CONTROLNET,
    DREAMBOOTH,
    FINETUNE,
    DatasetParams,
    ResolvedConfig,
    SubsetParams,
    check_bucket_reso_steps,
)
from library.errors import UserError

if TYPE_CHECKING:
    from library import bucketing
    from library.dataset_sources import DatasetSources, ImageEntry, SourceProblem

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

    def report(self, max_token_length: Optional[int] = None) -> dict:
        """The dataset check report as a JSON-ready dict (see docs/dataset-check.md)."""
        return _build_report(self, max_token_length)


def _listing(bad_files: Sequence[BadFile]) -> str:
    shown = "; ".join(f"{bad.path}: {bad.reason}" for bad in bad_files[:_LISTED])
    more = f"; and {len(bad_files) - _LISTED} more" if len(bad_files) > _LISTED else ""
    return shown + more


# --- the scan -----------------------------------------------------------------------------------


def bucket_steps_multiple(family) -> int:
    """What bucket_reso_steps must divide into for a family (sd-scripts: 32 for SDXL, 64 for SD1/2)."""
    return 32 if family is not None and family.is_sdxl else 64


def smallest_bucket_side(settings: "bucketing.BucketSettings") -> int:
    """Images with a side shorter than this are reported as too small.

    Buckets: min_bucket_reso (no bucket side is shorter). --bucket_no_upscale: bucket_reso_steps (the
    image would get an empty bucket). No bucketing: min_bucket_reso, capped by the resolution's
    shorter side.
    """
    if settings.enable_bucket and settings.bucket_no_upscale:
        return settings.bucket_reso_steps
    if settings.enable_bucket:
        return settings.min_bucket_reso
    return min(settings.min_bucket_reso, min(settings.resolution))


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
    from library import dataset_sources, image_files

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
    from library.dataset_sources import caption_candidates

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
    from library import image_files

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
    from library import image_files

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
    from library.bucketing import BucketSettings

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
    min_side = smallest_bucket_side(settings)
    result = ScannedDataset(sources.dataset_index, params, settings, sources)
    mismatched: list[str] = []

    def usable(entries: list[ImageEntry]) -> list[tuple]:
        kept = []
        for entry in entries:
            if entry.path in dropped:
                continue
            problem = _image_problem(entry, status, min_side)
            if problem is not None:
                bad.append(problem)
                continue
            size = status[entry.path].size
            if entry.image_size is not None and tuple(entry.image_size) != tuple(size):
                mismatched.append(f"{entry.path} ({entry.image_size[0]}x{entry.image_size[1]} stored, {size[0]}x{size[1]} read)")
            kept.append((entry, size))
        return kept

    train = usable(sources.train)
    validation = usable(sources.validation)
    if len(train) < len(sources.train):
        train = _rebalance_reg(train, params)
    from library.bucketing import BucketAssigner

    assigner = BucketAssigner(settings)
    result.train = _assign(assigner, train)
    result.validation = _assign(assigner, validation)

    if mismatched:
        notes.append(f"{label}: {len(mismatched)} image(s) differ from the size stored in metadata; the real size is "
                     f"used: " + ", ".join(mismatched[:3]))
    if not any(not image.entry.is_reg for image in result.train):
        if sources.num_train_images == 0:
            errors.append(f"{label}: no training images found (see the warnings above for skipped folders or subsets)")
        else:
            errors.append(f"{label}: none of its training images is usable (all are listed as bad files)")
    return result


def _image_problem(entry: ImageEntry, status: dict[str, _FileStatus], min_side: int) -> Optional[BadFile]:
    """The bad file (the image, or its conditioning image) that keeps this image out of training."""
    image = status[entry.path]
    if image.reason is not None:
        return BadFile(entry.path, image.reason, entry.path)
    w, h = image.size
    if w < min_side or h < min_side:
        return BadFile(entry.path, f"too small: {w}x{h} has a side shorter than {min_side}, the smallest bucket side",
                       entry.path)
    if entry.conditioning_path:
        cond = status[entry.conditioning_path]
        if cond.reason is not None:
            return BadFile(entry.conditioning_path, f"conditioning image: {cond.reason}", entry.path)
        if tuple(cond.size) != tuple(image.size):
            reason = (f"conditioning image is {cond.size[0]}x{cond.size[1]} but {os.path.basename(entry.path)} is "
                      f"{w}x{h}; they must be the same size")
            return BadFile(entry.conditioning_path, reason, entry.path)
    return None


def _rebalance_reg(train: list[tuple], params: DatasetParams) -> list[tuple]:
    """Re-run reg balancing after bad images were dropped, so reg samples still match training samples."""
    from library.dataset_sources import balance_reg_entries

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


# --- captions -----------------------------------------------------------------------------------


def full_caption(entry: ImageEntry, subset: SubsetParams, index: int = 0) -> str:
    """The caption at its longest: prefix/suffix and separators applied, nothing dropped or shuffled.

    A wildcard caption is expanded once with a fixed generator (one line, one choice per group).
    """
    from library.bucketing import sample_rng

    steady = replace(
        subset,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
        shuffle_caption=False,
        token_warmup_step=0,
    )
    return process_caption(entry.caption, steady, 1, sample_rng(0, 1, index))


def measure_caption_tokens(scan: DatasetScan, tokenizer, batch: int = 1024) -> None:
    """Set `caption_tokens` (CLIP tokens without BOS/EOS) on every scanned image."""
    images, texts = [], []
    for dataset in scan.datasets:
        for image in dataset.train + dataset.validation:
            images.append(image)
            texts.append(full_caption(image.entry, dataset.params.subsets[image.entry.subset_index], len(texts)))
    for start in range(0, len(texts), batch):
        ids = tokenizer(texts[start : start + batch], add_special_tokens=False, verbose=False).input_ids
        for image, row in zip(images[start : start + batch], ids):
            image.caption_tokens = len(row)


def token_histogram(lengths: Sequence[int], max_length: int) -> list[dict]:
    """Five equal bins up to max_length plus one for longer captions: [{"range": [lo, hi], "count"}]."""
    width = max(1, max_length // 5)
    edges = [(0, width)] + [(lo + 1, min(lo + width, max_length)) for lo in range(width, max_length, width)]
    rows = [{"range": [lo, hi], "count": sum(lo <= n <= hi for n in lengths)} for lo, hi in edges]
    rows.append({"range": [max_length + 1, None], "count": sum(n > max_length for n in lengths)})
    return rows


# --- report -------------------------------------------------------------------------------------

_KIND_TITLES = {DREAMBOOTH: "DreamBooth", FINETUNE: "fine-tuning", CONTROLNET: "ControlNet"}


def _size_text(size) -> str:
    return f"{size[0]}x{size[1]}"


def _subset_source(subset: SubsetParams) -> str:
    if subset.kind == FINETUNE:
        return subset.metadata_file
    if subset.kind == CONTROLNET:
        return f"{subset.image_dir} + {subset.conditioning_data_dir}"
    return subset.image_dir


def _subsets_report(dataset: ScannedDataset) -> list[dict]:
    rows = []
    for s, subset in enumerate(dataset.params.subsets):
        images = [i for i in dataset.train if i.entry.subset_index == s]
        rows.append({
            "index": s + 1,
            "source": _subset_source(subset),
            "is_reg": subset.is_reg,
            "images": len(images),
            "num_repeats": subset.num_repeats,
            "samples": sum(i.entry.repeats for i in images),
            "validation_images": sum(1 for i in dataset.validation if i.entry.subset_index == s),
        })
    return rows


def _dataset_report(dataset: ScannedDataset) -> dict:
    params, settings = dataset.params, dataset.settings
    report = {
        "index": dataset.index + 1,
        "kind": params.kind,
        "resolution": list(params.resolution) if params.resolution else None,
        "batch_size": params.batch_size,
        "enable_bucket": params.enable_bucket,
        "bucket_no_upscale": params.bucket_no_upscale,
        "subsets": _subsets_report(dataset),
        "buckets": {_size_text(b): n for b, n in dataset.bucket_counts("train").items()},
        "validation_buckets": {_size_text(b): n for b, n in dataset.bucket_counts("validation").items()},
        "batches_per_epoch": dataset.num_batches("train"),
        "mean_ar_error": dataset.bucket_info()["mean_img_ar_error"],
    }
    if settings is not None and settings.enable_bucket:
        report["bucket_limits"] = {
            "min_bucket_reso": settings.min_bucket_reso,
            "max_bucket_reso": settings.max_bucket_reso,
            "bucket_reso_steps": settings.bucket_reso_steps,
        }
    if settings is not None:
        report["smallest_side"] = smallest_bucket_side(settings)
    return report


def _image_report(dataset: ScannedDataset, image: ScannedImage, split: str, missing: set) -> dict:
    entry = image.entry
    row = {
        "path": entry.path,
        "bucket": list(image.bucket),
        "caption": entry.caption,
        "caption_tokens": image.caption_tokens,
        "missing_caption": entry.path in missing,
        "size": list(image.size),
        "resized": list(image.resized),
        "dataset": dataset.index + 1,
        "subset": entry.subset_index + 1,
        "split": split,
        "repeats": entry.repeats,
        "is_reg": entry.is_reg,
    }
    if entry.conditioning_path:
        row["conditioning_path"] = entry.conditioning_path
    return row


def _token_report(scan: DatasetScan, max_token_length: Optional[int]) -> Optional[dict]:
    max_length = max_token_length or 75
    measured = [
        (image.caption_tokens, image.path)
        for dataset in scan.datasets
        for image in dataset.train + dataset.validation
        if image.caption_tokens is not None
    ]
    if not measured:
        return None
    lengths = [n for n, _ in measured]
    too_long = sorted(((n, p) for n, p in measured if n > max_length), reverse=True)
    return {
        "max_length": max_length,
        "histogram": token_histogram(lengths, max_length),
        "longest": max(lengths),
        "over_max": len(too_long),
        "over_max_images": [{"path": p, "tokens": n} for n, p in too_long],
    }


def _build_report(scan: DatasetScan, max_token_length: Optional[int]) -> dict:
    missing = set(scan.missing_captions)
    buckets: dict[str, int] = {}
    images = []
    for dataset in scan.datasets:
        for bucket, count in dataset.bucket_counts("train").items():
            buckets[_size_text(bucket)] = buckets.get(_size_text(bucket), 0) + count
        images += [_image_report(dataset, i, "train", missing) for i in dataset.train]
        images += [_image_report(dataset, i, "validation", missing) for i in dataset.validation]
    buckets = dict(sorted(buckets.items(), key=lambda kv: tuple(int(v) for v in kv[0].split("x"))))
    return {
        "ok": scan.ok,
        "buckets": buckets,
        "images": images,
        "bad_files": [
            {"path": b.path, "reason": b.reason, **({"image": b.image} if b.image and b.image != b.path else {})}
            for b in scan.bad_files
        ],
        "missing_captions": list(scan.missing_captions),
        "errors": list(scan.errors),
        "notes": list(scan.notes) + list(scan.config.warnings),
        "datasets": [_dataset_report(d) for d in scan.datasets],
        "token_lengths": _token_report(scan, max_token_length),
        "skip_bad_images": scan.skip_bad,
        "full_check": scan.full_check,
    }


def _bar(count: int, largest: int, width: int = 40) -> str:
    return "#" * (max(1, round(width * count / largest)) if count and largest else 0)


def _listed(paths: Sequence[str], limit: int) -> list[str]:
    lines = [f"    {p}" for p in paths[:limit]]
    if len(paths) > limit:
        lines.append(f"    ... and {len(paths) - limit} more (all of them are in the --json report)")
    return lines


def format_report(report: dict, limit: int = 50) -> str:
    """The text form of `report()`: datasets, buckets, captions, bad files, verdict."""
    lines = []
    train = [i for i in report["images"] if i["split"] == "train"]
    validation = len(report["images"]) - len(train)
    reg = sum(1 for i in train if i["is_reg"])
    lines.append(
        f"Dataset check: {len(report['datasets'])} dataset(s), {len(train)} training image(s) ({reg} regularization)"
        + (f", {validation} validation image(s)" if validation else "")
        + f", {len(report['bad_files'])} bad file(s)"
    )
    for dataset in report["datasets"]:
        lines += [""] + _format_dataset(dataset)
    tokens = report.get("token_lengths")
    if tokens:
        lines += [""] + _format_tokens(tokens, limit)
    if report["missing_captions"]:
        lines += ["", f"images without a caption ({len(report['missing_captions'])}; class tokens or an empty caption are used):"]
        lines += _listed(report["missing_captions"], limit)
    if report["notes"]:
        lines += ["", "notes:"] + [f"    {note}" for note in report["notes"]]
    if report["bad_files"]:
        lines += ["", f"bad files ({len(report['bad_files'])}):"]
        lines += [f"    {b['path']}: {b['reason']}" for b in report["bad_files"][:limit]]
        if len(report["bad_files"]) > limit:
            lines.append(f"    ... and {len(report['bad_files']) - limit} more (all of them are in the --json report)")
    if report["errors"]:
        lines += ["", "errors:"] + [f"    {e}" for e in report["errors"]]
    lines += ["", _verdict(report)]
    return "\n".join(line.rstrip() for line in lines)


def _format_dataset(dataset: dict) -> list[str]:
    reso = _size_text(dataset["resolution"]) if dataset["resolution"] else "none"
    if dataset["enable_bucket"]:
        limits = dataset["bucket_limits"]
        mode = "no upscale" if dataset["bucket_no_upscale"] else f"{limits['min_bucket_reso']}..{limits['max_bucket_reso']}"
        buckets = f"buckets on ({mode}, steps {limits['bucket_reso_steps']})"
    else:
        buckets = "buckets off"
    lines = [
        f"dataset #{dataset['index']}: {_KIND_TITLES.get(dataset['kind'], dataset['kind'])}, resolution {reso}, "
        f"batch size {dataset['batch_size']}, {buckets}"
    ]
    lines.append("  subsets:")
    for s in dataset["subsets"]:
        reg = " (reg)" if s["is_reg"] else ""
        held = f", {s['validation_images']} held out for validation" if s["validation_images"] else ""
        repeats = f"{s['num_repeats']} repeats" if not s["is_reg"] else "repeats balanced against training images"
        lines.append(f"    #{s['index']} {s['source']}{reg}: {s['images']} image(s), {repeats} -> {s['samples']} samples/epoch{held}")
    counts = dataset["buckets"]
    if counts:
        largest = max(counts.values())
        lines.append("  buckets (samples per epoch, repeats included):")
        lines += [f"    {reso:>11} {n:>7}  {_bar(n, largest)}" for reso, n in counts.items()]
    lines.append(f"  batches per epoch: {dataset['batches_per_epoch']}; mean aspect-ratio error {dataset['mean_ar_error']:.4f}")
    return lines


def _format_tokens(tokens: dict, limit: int) -> list[str]:
    largest = max(row["count"] for row in tokens["histogram"])
    lines = [f"caption length in CLIP tokens (limit {tokens['max_length']}; longest {tokens['longest']}):"]
    for row in tokens["histogram"]:
        lo, hi = row["range"]
        label = f"{lo}-{hi}" if hi is not None else f">{lo - 1}"
        lines.append(f"    {label:>9} {row['count']:>7}  {_bar(row['count'], largest)}")
    if tokens["over_max"]:
        hint = " (--max_token_length 150 or 225 allows more)" if tokens["max_length"] < 225 else ""
        lines.append(f"  {tokens['over_max']} caption(s) are longer than {tokens['max_length']} tokens and are cut{hint}:")
        shown = tokens["over_max_images"][:limit]
        lines += [f"    {row['path']} ({row['tokens']} tokens)" for row in shown]
        if tokens["over_max"] > limit:
            lines.append(f"    ... and {tokens['over_max'] - limit} more")
    return lines


def _verdict(report: dict) -> str:
    n = len(report["bad_files"])
    if report["errors"]:
        return "result: FAILED - training cannot start (see errors)"
    if n and report["skip_bad_images"]:
        return f"result: OK - {n} bad file(s) will be left out ({SKIP_FLAG})"
    if n:
        return f"result: FAILED - {n} bad file(s); fix or remove them, or pass {SKIP_FLAG} to train without them"
    return "result: OK"


# --- --dataset_check for every trainer -------------------------------------------------------------


def add_dataset_check_arguments(parser, standalone: bool = False) -> None:
    """Add `--skip_bad_images`, `--full_image_check` and (for trainers) `--dataset_check[_json]`."""
    add = parser.add_argument
    if not standalone:
        add("--dataset_check", action="store_true",
            help="scan the dataset (buckets, captions, bad files) without loading any model, print a report and exit "
                 "(status 1 when training would stop on bad files)")
        add("--dataset_check_json", type=str, default=None, metavar="PATH",
            help="with --dataset_check: also write the report as JSON to PATH")
    add(SKIP_FLAG, action="store_true",
        help="leave out unusable images (corrupt, truncated, too small, non-UTF-8 caption, ...) with one warning "
             "instead of stopping before training")
    add(FULL_CHECK_FLAG, "--full_check", dest="full_image_check", action="store_true",
        help="decode every image during the dataset scan: also finds damage in the middle of files (slower; by "
             "default only headers are read and files with a missing end marker decoded)")


def family_from_args(args, family=None):
    """The model family for the tokenizer and the bucket-steps rule: given, else --sdxl / --v2, else SD1."""
    from library.families import SD1, SD2, SDXL

    if family is not None:
        return family
    if getattr(args, "sdxl", False):
        return SDXL
    return SD2 if getattr(args, "v2", False) else SD1


def scan_from_args(args, family=None, config: Optional[ResolvedConfig] = None, **support) -> DatasetScan:
    """Load the dataset config from the parsed flags (unless given) and scan it.

    support: `load_dataset_config` keywords (support_dreambooth, support_finetuning, ...) of the trainer.
    """
    from library.dataset_config import load_dataset_config

    if config is None:
        config = load_dataset_config(getattr(args, "dataset_config", None), args, **support)
    return scan_dataset(
        config,
        bucket_steps_multiple(family_from_args(args, family)),
        skip_bad=bool(getattr(args, "skip_bad_images", False)),
        full_check=bool(getattr(args, "full_image_check", False)),
    )


def _load_counting_tokenizer(args, family):
    """The first tokenizer of the family (all CLIP tokenizers share one vocabulary), or None with a note."""
    from library.tokenizer import load_tokenizer

    pretrained = getattr(args, "pretrained_model_name_or_path", None)
    try:
        return load_tokenizer(family.text_encoders[0], pretrained, getattr(args, "tokenizer_cache_dir", None)), None
    except UserError as e:
        return None, f"caption token lengths not measured: {e}"


def run_dataset_check(
    args, family=None, config: Optional[ResolvedConfig] = None, json_path: Optional[str] = None, out=None, **support
) -> int:
    """`--dataset_check`: scan, print the report, write JSON if asked; 0 when training could start, else 1.

    In a trainer: `if args.dataset_check: return run_dataset_check(args, family)` before any model loads.
    """
    out = out or sys.stdout
    family = family_from_args(args, family)
    scan = scan_from_args(args, family, config, **support)
    tokenizer, note = _load_counting_tokenizer(args, family)
    if tokenizer is not None:
        measure_caption_tokens(scan, tokenizer)
    else:
        scan.notes.append(note)
    max_token_length = getattr(args, "max_token_length", None) or (scan.config.general.max_token_length)
    report = scan.report(max_token_length)
    print(format_report(report), file=out)
    json_path = json_path or getattr(args, "dataset_check_json", None)
    if json_path:
        write_report_json(report, json_path)
        print(f"report written to {json_path}", file=out)
    return 0 if scan.ok else 1


def write_report_json(report: dict, path: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
            f.write("\n")
    except OSError as e:
        raise UserError(f"cannot write the report to {path}: {e.strerror or e}") from None
