"""Dataset settings from the command line: sd-scripts' dataset flags and what they mean.

`add_dataset_arguments` / `add_config_arguments` add the flags (names, defaults and help as in
sd-scripts). After parsing, `command_line_layer` turns their values into the command-line level of
the fallback chain (checked like config values, `--resolution 768,512` parsed), and without
`--dataset_config` `config_from_command_line` builds the raw config the flags describe:
`--train_data_dir` with `<repeats>_<class tokens>` sub-folders, `--reg_data_dir`, `--in_json`, or
the ControlNet pair of folders. `library.data.config` resolves either into dataset params.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from library.data.schema import (
    ARG_TO_KEY,
    ASCENDABLE_KEYS,
    CHECKS,
    COMMAND_LINE_ONLY_KEYS,
    CONTROLNET,
    DATASET_KEYS,
    DISTINCT_KEYS,
    DREAMBOOTH,
    DROPOUT_KEYS,
    FINETUNE,
    RESIZE_INTERPOLATIONS,
    SUBSET_COMMON_KEYS,
    InvalidValue,
    Layer,
    Support,
    show_value,
)
from library.errors import UserError
from library.refused_options import refuse_set_options

# sd-scripts' --resize_interpolation has no "box"; config files accept it.
CLI_RESIZE_INTERPOLATIONS = tuple(i for i in RESIZE_INTERPOLATIONS if i != "box")

FOLDER_NAMING_RULE = "'<repeats>_<class tokens>' (e.g. '10_sks dog')"


# --- command-line flags -----------------------------------------------------------------------------


def add_dataset_arguments(
    parser: argparse.ArgumentParser,
    support_dreambooth: bool = True,
    support_caption: bool = True,
    support_caption_dropout: bool = True,
) -> None:
    """Add sd-scripts' dataset flags (names, defaults and help as in `train_util.add_dataset_arguments`)."""
    add = parser.add_argument
    add("--train_data_dir", type=str, default=None,
        help="directory for train images (DreamBooth: parent of '<repeats>_<class tokens>' folders)")
    add("--cache_info", action="store_true",
        help="cache meta information (caption and image size) for faster dataset loading. only available for DreamBooth")
    add("--shuffle_caption", action="store_true", help="shuffle separated caption")
    add("--caption_separator", type=str, default=",", help="separator for caption")
    add("--caption_extension", type=str, default=".caption", help="extension of caption files")
    add("--caption_extention", type=str, default=None,
        help="extension of caption files (backward compatibility)")
    add("--keep_tokens", type=int, default=0,
        help="keep heading N tokens when shuffling caption tokens (token means comma separated strings)")
    add("--keep_tokens_separator", type=str, default="",
        help="A custom separator to divide the caption into fixed and flexible parts. Tokens before this separator "
        "will not be shuffled. If not specified, '--keep_tokens' will be used to determine the fixed number of tokens.")
    add("--secondary_separator", type=str, default=None,
        help="a secondary separator for caption. This separator is replaced to caption_separator after "
        "dropping/shuffling caption")
    add("--enable_wildcard", action="store_true",
        help="enable wildcard for caption (e.g. '{image|picture|rendition}')")
    add("--caption_prefix", type=str, default=None, help="prefix for caption text")
    add("--caption_suffix", type=str, default=None, help="suffix for caption text")
    add("--color_aug", action="store_true", help="enable weak color augmentation")
    add("--flip_aug", action="store_true", help="enable horizontal flip augmentation")
    add("--face_crop_aug_range", type=str, default=None,
        help="enable face-centered crop augmentation and its range (e.g. 2.0,4.0)")
    add("--random_crop", action="store_true",
        help="enable random crop (for style training in face-centered crop augmentation)")
    add("--debug_dataset", action="store_true",
        help="write the batches the run would train on (images after resize/crop/flip, captions, masks) to "
        "<output_dir>/debug_dataset-<time>/ and exit without training")
    add("--resolution", type=str, default=None, help="resolution in training ('size' or 'width,height')")
    add("--cache_latents", action="store_true",
        help="cache latents to main memory to reduce VRAM usage (augmentations must be disabled)")
    add("--vae_batch_size", type=int, default=1, help="batch size for caching latents")
    add("--cache_latents_to_disk", action="store_true",
        help="cache latents to disk to reduce VRAM usage (augmentations must be disabled)")
    add("--skip_cache_check", action="store_true",
        help="skip the content validation of cache (latent and text encoder output). Cache file existence check "
        "is always performed, and cache processing is performed if the file does not exist")
    add("--enable_bucket", action="store_true", help="enable buckets for multi aspect ratio training")
    add("--min_bucket_reso", type=int, default=256,
        help="minimum resolution for buckets, must be divisible by bucket_reso_steps")
    add("--max_bucket_reso", type=int, default=1024,
        help="maximum resolution for buckets, must be divisible by bucket_reso_steps")
    add("--bucket_reso_steps", type=int, default=64,
        help="steps of resolution for buckets, divisible by 8 is recommended")
    add("--bucket_no_upscale", action="store_true", help="make bucket for each image without upscaling")
    add("--resize_interpolation", type=str, default=None, choices=list(CLI_RESIZE_INTERPOLATIONS),
        help="Resize interpolation when required. Default: area when shrinking, lanczos when enlarging. "
        "Options: " + ", ".join(CLI_RESIZE_INTERPOLATIONS))
    add("--token_warmup_min", type=int, default=1,
        help="start learning at N tags (token means comma separated strings)")
    add("--token_warmup_step", type=float, default=0,
        help="tag length reaches maximum on N steps (or N*max_train_steps if N<1)")
    add("--alpha_mask", action="store_true", help="use alpha channel as mask for training")
    add("--validation_seed", type=int, default=None,
        help="seed of the train/validation split (default: the trainer's --seed; tools/check_dataset.py: random)")
    add("--validation_split", type=float, default=0.0,
        help="fraction of each subset's images held out for validation (0 to 1)")
    add("--dataset_class", type=str, default=None,
        help="sd-scripts' user dataset class; refused (docs/refused-options.md): use --dataset_config")

    if support_caption_dropout:
        add("--caption_dropout_rate", type=float, default=0.0, help="Rate out dropout caption(0.0~1.0)")
        add("--caption_dropout_every_n_epochs", type=int, default=0, help="Dropout all captions every N epochs")
        add("--caption_tag_dropout_rate", type=float, default=0.0,
            help="Rate out dropout comma separated tokens(0.0~1.0)")
    if support_dreambooth:
        add("--reg_data_dir", type=str, default=None, help="directory for regularization images")
    if support_caption:
        add("--in_json", type=str, default=None, help="json metadata for dataset")
        add("--dataset_repeats", type=int, default=1, help="repeat dataset when training with captions")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--dataset_config` (sd-scripts' `config_util.add_config_arguments`)."""
    parser.add_argument("--dataset_config", type=Path, default=None, help="config file for detail settings")


# --- the command-line layer of the fallback chain ---------------------------------------------------


def command_line_layer(args: Optional[argparse.Namespace], support: Support) -> Layer:
    """Dataset-relevant command-line values, converted and checked; None values are left out."""
    if args is None:
        return {}
    refuse_set_options(args)  # --dataset_class, for every script that takes the dataset flags
    values = dict(vars(args))
    if values.get("caption_extention") is not None:
        values["caption_extension"] = values["caption_extention"]
    known = set(DATASET_KEYS) | set(SUBSET_COMMON_KEYS) | set(COMMAND_LINE_ONLY_KEYS)
    for kind in (DREAMBOOTH, FINETUNE, CONTROLNET):
        known |= set(ASCENDABLE_KEYS[kind]) | set(DISTINCT_KEYS[kind])
    if support.dropout:
        known |= set(DROPOUT_KEYS)

    layer: Layer = {}
    for name, value in values.items():
        key = ARG_TO_KEY.get(name, name)
        if key not in known or value is None:
            continue
        flag = f"--{name}"
        value = _parse_command_line_value(key, value, flag)
        try:
            layer[key] = (CHECKS[key](value), flag)
        except InvalidValue as e:
            raise UserError(f"{flag} {show_value(value)}: {e}") from None
    return layer


def _parse_command_line_value(key: str, value, flag: str):
    """Turn the string forms of --resolution / --face_crop_aug_range into config values."""
    if key not in ("resolution", "face_crop_aug_range") or not isinstance(value, str):
        return value
    parse = int if key == "resolution" else float
    try:
        parts = [parse(part) for part in value.split(",")]
    except ValueError:
        example = "512 or 768,512" if key == "resolution" else "2.0,4.0"
        raise UserError(f"{flag} {value!r}: expected numbers separated by a comma, e.g. {example}") from None
    if key == "resolution" and len(parts) == 1:
        return parts[0]
    if len(parts) != 2:
        raise UserError(f"{flag} {value!r}: expected one or two numbers separated by a comma")
    return parts


# --- configs built from the command line ----------------------------------------------------------------


def parse_dreambooth_folder_name(name: str) -> Optional[tuple[int, str]]:
    """`10_sks dog` -> (10, "sks dog"); `3_my_cat` -> (3, "my_cat"); None when the name has no leading count."""
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest


def scan_dreambooth_parent(parent: str, is_reg: bool) -> tuple[list[dict], list[str]]:
    """Subset tables for each `<repeats>_<class tokens>` sub-folder of `parent`, sorted by name,
    and the names of the sub-folders skipped because their name does not follow the rule."""
    subsets, skipped = [], []
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        parsed = parse_dreambooth_folder_name(entry.name)
        if parsed is None or parsed[0] < 1:
            skipped.append(entry.name)
            continue
        repeats, class_tokens = parsed
        subsets.append({"image_dir": entry.path, "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
    return subsets, skipped


def config_from_command_line(args, support: Support, warnings: list[str]) -> dict:
    """The config sd-scripts builds when no --dataset_config is given."""
    train_dir = getattr(args, "train_data_dir", None)
    in_json = getattr(args, "in_json", None) if support.finetuning else None

    if support.controlnet and not (support.dreambooth or support.finetuning):
        cond_dir = getattr(args, "conditioning_data_dir", None)
        if not train_dir or not cond_dir:
            raise UserError("--train_data_dir and --conditioning_data_dir are required (or pass --dataset_config)")
        subset = {"image_dir": train_dir, "conditioning_data_dir": cond_dir, "num_repeats": 1}
        return {"datasets": [{"subsets": [subset]}]}

    cond_dir = getattr(args, "conditioning_data_dir", None)
    if cond_dir and in_json is None:
        return {"datasets": [{"subsets": _mask_subsets(args, train_dir, cond_dir, support, warnings)}]}

    if in_json is not None:
        subset = {"metadata_file": in_json}
        if train_dir:
            subset["image_dir"] = train_dir
        return {"datasets": [{"subsets": [subset]}]}

    if not support.dreambooth:
        raise UserError("--in_json is required by this trainer (or pass --dataset_config)")
    if not train_dir:
        raise UserError("--train_data_dir is required (or pass --dataset_config)")
    subsets, skipped = _scan_parent_flag("--train_data_dir", train_dir, False, warnings)
    if not subsets:
        raise UserError(_no_folders_message(train_dir, skipped))
    reg_dir = getattr(args, "reg_data_dir", None)
    if reg_dir:
        reg_subsets, _ = _scan_parent_flag("--reg_data_dir", reg_dir, True, warnings)
        if not reg_subsets:
            warnings.append(f"--reg_data_dir {reg_dir!r} has no sub-folder named {FOLDER_NAMING_RULE}; no reg images")
        subsets += reg_subsets
    return {"datasets": [{"subsets": subsets}]}


def _mask_subsets(args, train_dir: Optional[str], cond_dir: str, support: Support, warnings: list[str]) -> list[dict]:
    """--masked_loss with --conditioning_data_dir and DreamBooth folders: each `<repeats>_<name>` folder
    becomes a ControlNet subset whose masks are in `<conditioning_data_dir>/<same folder name>`, or in
    `--conditioning_data_dir` itself (masks matched by base name)."""
    if not support.controlnet:
        raise UserError("--conditioning_data_dir: mask images are used with --masked_loss; add --masked_loss "
                        "or remove the flag")
    if getattr(args, "reg_data_dir", None):
        raise UserError("--conditioning_data_dir with --reg_data_dir: masked subsets cannot be regularization "
                        "images; use a --dataset_config to combine them")
    if not train_dir:
        raise UserError("--train_data_dir is required with --conditioning_data_dir (or pass --dataset_config)")
    if not os.path.isdir(cond_dir):
        raise UserError(f"--conditioning_data_dir {cond_dir!r} is not a folder")
    folders, skipped = _scan_parent_flag("--train_data_dir", train_dir, False, warnings)
    if not folders:
        raise UserError(_no_folders_message(train_dir, skipped))
    subsets = []
    for folder in folders:
        own = os.path.join(cond_dir, os.path.basename(folder["image_dir"]))
        subsets.append({"image_dir": folder["image_dir"], "num_repeats": folder["num_repeats"],
                        "conditioning_data_dir": own if os.path.isdir(own) else cond_dir})
    return subsets


def _scan_parent_flag(flag: str, parent: str, is_reg: bool, warnings: list[str]) -> tuple[list[dict], list[str]]:
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {parent!r} is not a folder")
    subsets, skipped = scan_dreambooth_parent(parent, is_reg)
    for name in skipped:
        warnings.append(f"{flag}: ignoring folder {name!r}: its name must be {FOLDER_NAMING_RULE} with repeats >= 1")
    return subsets, skipped


def _no_folders_message(parent: str, skipped: list[str]) -> str:
    loose = [e.name for e in os.scandir(parent) if e.is_file() and not e.name.startswith(".")]
    details = []
    if skipped:
        details.append("ignored: " + ", ".join(repr(name) for name in skipped[:5]))
    if loose:
        details.append(f"it holds {len(loose)} files directly")
    detail = f" ({'; '.join(details)})" if details else ""
    return (
        f"--train_data_dir {parent!r}: no sub-folder named {FOLDER_NAMING_RULE} found{detail}; put the images "
        f"in such sub-folders, e.g. {os.path.join(parent, '10_sks dog')}"
    )
