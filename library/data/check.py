"""`--dataset_check` for every trainer and `tools/check_dataset.py`: scan from the flags, report, exit.

`add_dataset_check_arguments` adds `--dataset_check[_json]`, `--skip_bad_images` and
`--full_image_check`; `scan_from_args` loads the dataset config from the parsed flags and scans it
(what every trainer does before loading a model); `run_dataset_check` also measures caption lengths
with the family's tokenizer (`measure_caption_tokens`), prints the report and writes its JSON.
No torch: the tokenizer comes from transformers, which does not import torch for tokenizing.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

from library.data.captions import process_caption
from library.data.report import build_report, format_report, write_report_json
from library.data.scan import FULL_CHECK_FLAG, SKIP_FLAG, DatasetScan, bucket_steps_multiple, scan_dataset
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.config import ResolvedConfig, SubsetParams
    from library.data.sources import ImageEntry


# --- captions -----------------------------------------------------------------------------------


def full_caption(entry: ImageEntry, subset: SubsetParams, index: int = 0) -> str:
    """The caption at its longest: prefix/suffix and separators applied, nothing dropped or shuffled.

    A wildcard caption is expanded once with a fixed generator (one line, one choice per group).
    """
    from library.data.bucketing import sample_rng

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
    from library.models.families import SD1, SD2, SDXL

    if family is not None:
        return family
    if getattr(args, "sdxl", False):
        return SDXL
    return SD2 if getattr(args, "v2", False) else SD1


def scan_from_args(args, family=None, config: Optional[ResolvedConfig] = None, **support) -> DatasetScan:
    """Load the dataset config from the parsed flags (unless given) and scan it.

    support: `load_dataset_config` keywords (support_dreambooth, support_finetuning, ...) of the trainer.
    """
    from library.data.config import load_dataset_config

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
    from library.text.tokenizer import load_tokenizer

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
    report = build_report(scan, max_token_length)
    print(format_report(report), file=out)
    json_path = json_path or getattr(args, "dataset_check_json", None)
    if json_path:
        write_report_json(report, json_path)
        print(f"report written to {json_path}", file=out)
    return 0 if scan.ok else 1
