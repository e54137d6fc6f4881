"""The dataset check report: a JSON-ready dict of a `DatasetScan`, its text form, and the JSON file.

`build_report` lists the buckets with sample counts, every usable
image with its bucket, caption and token count, the bad files with their reasons, images without a
caption, errors, notes, per-dataset settings and a histogram of caption lengths in CLIP tokens
(`token_histogram`; the counts are measured by `library.data.check`). `format_report` prints it
for people, `write_report_json` saves it for tools; docs/dataset-check.md describes the fields.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional, Sequence

from library.data.scan import SKIP_FLAG
from library.data.schema import CONTROLNET, DREAMBOOTH, FINETUNE
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.config import SubsetParams
    from library.data.scan import DatasetScan, ScannedDataset, ScannedImage


# --- caption lengths ----------------------------------------------------------------------------


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
    images = dataset.train + dataset.validation
    report["upscaled_images"] = len({image.path for image in images
                                     if image.resized[0] > image.size[0] or image.resized[1] > image.size[1]})
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


def build_report(scan: DatasetScan, max_token_length: Optional[int]) -> dict:
    """The report of a scan as a JSON-ready dict (see docs/dataset-check.md)."""
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


# --- JSON file ----------------------------------------------------------------------------------


def write_report_json(report: dict, path: str) -> None:
    """Save `report` as indented UTF-8 JSON; an unwritable path is a UserError."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
            f.write("\n")
    except OSError as e:
        raise UserError(f"cannot write the report to {path}: {e.strerror or e}") from None
