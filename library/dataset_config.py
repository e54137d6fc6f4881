"""Dataset configuration: CLI dataset flags, `--dataset_config` TOML/JSON files, value resolution.

`load_dataset_config` produces a `ResolvedConfig`: plain dataclasses holding, for every dataset and
subset, the value of each setting after sd-scripts' fallback chain

    subset -> dataset -> [general] -> command line -> default        (None = unset)

(dataset settings skip the subset level). Without a config file the same structure is built from
the command line (`--train_data_dir` with `<repeats>_<class tokens>` sub-folders, `--reg_data_dir`,
`--in_json`, ...), so the rest of the code never cares where a value came from.

Every problem in the user's input (unknown key, wrong type, value out of range, impossible
combination, malformed file) is one `UserError` naming the file, the section and the key.
This module does not touch images; `library.dataset_sources` turns subsets into image lists.
No torch import: argument parsers and tools import this before any model is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

DREAMBOOTH = "dreambooth"
FINETUNE = "finetune"
CONTROLNET = "controlnet"

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
# sd-scripts' --resize_interpolation has no "box"; config files accept it.
CLI_RESIZE_INTERPOLATIONS = tuple(i for i in RESIZE_INTERPOLATIONS if i != "box")
MAX_TOKEN_LENGTHS = (75, 150, 225)

FOLDER_NAMING_RULE = "'<repeats>_<class tokens>' (e.g. '10_sks dog')"


# --- resolved configuration ---------------------------------------------------------------------


@dataclass
class SubsetParams:
    """One subset after value resolution.

    `kind` is the kind of its dataset. Fields of other kinds keep their defaults: DreamBooth uses
    image_dir, is_reg, class_tokens, caption_extension, cache_info, alpha_mask; fine-tuning uses
    metadata_file, image_dir (base of relative keys), alpha_mask; ControlNet (also masked-loss
    subsets) uses image_dir, conditioning_data_dir, caption_extension, cache_info.
    """

    kind: str = DREAMBOOTH
    image_dir: Optional[str] = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: Optional[tuple[float, float]] = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: dict = field(default_factory=dict)
    resize_interpolation: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    # DreamBooth
    is_reg: bool = False
    class_tokens: Optional[str] = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    # fine-tuning
    metadata_file: Optional[str] = None
    # ControlNet / masked loss
    conditioning_data_dir: Optional[str] = None


@dataclass
class DatasetParams:
    """One dataset after value resolution; `subsets` in file order."""

    kind: str = DREAMBOOTH
    resolution: Optional[tuple[int, int]] = None  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    # sd-scripts copies this into batches but no trainer reads it; ours is carried to every entry.
    network_multiplier: float = 1.0
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    resize_interpolation: Optional[str] = None
    subsets: list[SubsetParams] = field(default_factory=list)


@dataclass
class GeneralParams:
    """Settings that only come from the command line (not accepted in a config file)."""

    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    max_token_length: Optional[int] = None


@dataclass
class ResolvedConfig:
    datasets: list[DatasetParams]
    general: GeneralParams = field(default_factory=GeneralParams)
    source: Optional[str] = None  # the config file, or None when built from the command line
    warnings: list[str] = field(default_factory=list)

    def text_encoder_cache_blockers(self) -> list[str]:
        """Settings that change captions between fetches, which makes caching TE outputs wrong."""
        blockers = []
        for d, dataset in enumerate(self.datasets, 1):
            for s, subset in enumerate(dataset.subsets, 1):
                active = {
                    "caption_dropout_rate": subset.caption_dropout_rate > 0,
                    "caption_dropout_every_n_epochs": subset.caption_dropout_every_n_epochs > 0,
                    "shuffle_caption": subset.shuffle_caption,
                    "token_warmup_step": subset.token_warmup_step > 0,
                    "caption_tag_dropout_rate": subset.caption_tag_dropout_rate > 0,
                }
                blockers += [f"{key} (dataset #{d}, subset #{s})" for key, on in active.items() if on]
        return blockers


def check_bucket_reso_steps(config: ResolvedConfig, multiple: int) -> None:
    """Trainers require bucket_reso_steps to be a multiple of 64 (SD1/2) or 32 (SDXL)."""
    for d, dataset in enumerate(config.datasets, 1):
        if dataset.bucket_reso_steps % multiple:
            raise UserError(
                f"dataset #{d}: bucket_reso_steps = {dataset.bucket_reso_steps} must be a multiple of {multiple} "
                f"for this model"
            )


# --- key table ------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value failed its check; the message says what is expected."""


def _check_bool(value):
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_check(minimum: Optional[int] = None) -> Callable:
    def check(value):
        if not _is_int(value):
            raise _Invalid("must be an integer")
        if minimum is not None and value < minimum:
            raise _Invalid(f"must be >= {minimum}")
        return value

    return check


def _number_check(low: Optional[float] = None, high: Optional[float] = None, high_open: bool = False) -> Callable:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid("must be a number")
        if (low is not None and value < low) or (
            high is not None and (value >= high if high_open else value > high)
        ):
            upper = f"below {high}" if high_open else f"at most {high}"
            raise _Invalid(f"must be at least {low} and {upper}" if high is not None else f"must be >= {low}")
        return float(value)

    return check


def _str_check(nonempty: bool = False) -> Callable:
    def check(value):
        if not isinstance(value, str):
            raise _Invalid("must be a string")
        if nonempty and value == "":
            raise _Invalid("must not be empty")
        return value

    return check


def _check_caption_extension(value):
    value = _str_check()(value)
    return "." + value if value and not value.startswith(".") else value


def _check_metadata_file(value):
    value = _str_check(nonempty=True)(value)
    if not value.lower().endswith((".json", ".jsonl")):
        raise _Invalid("must be a .json or .jsonl file")
    return value


def _check_resolution(value):
    if _is_int(value) and value > 0:
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (value[0], value[1])
    raise _Invalid("must be a positive size like 512 or [768, 512] (width, height)")


def _check_float_pair(value):
    numbers = isinstance(value, (list, tuple)) and len(value) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers:
        raise _Invalid("must be two numbers like [2.0, 4.0]")
    low, high = float(value[0]), float(value[1])
    if not 0 < low <= high:
        raise _Invalid("must be [low, high] with 0 < low <= high")
    return (low, high)


def _check_table(value):
    if not isinstance(value, dict):
        raise _Invalid("must be a table")
    return dict(value)


def _choice_check(choices) -> Callable:
    def check(value):
        if value not in choices:
            raise _Invalid("must be one of " + ", ".join(choices))
        return value

    return check


def _check_max_token_length(value):
    if value not in MAX_TOKEN_LENGTHS:
        raise _Invalid("must be 75, 150 or 225")
    return value


CHECKS: dict[str, Callable] = {
    # dataset level
    "resolution": _check_resolution,
    "batch_size": _int_check(1),
    "enable_bucket": _check_bool,
    "min_bucket_reso": _int_check(1),
    "max_bucket_reso": _int_check(1),
    "bucket_reso_steps": _int_check(1),
    "bucket_no_upscale": _check_bool,
    "network_multiplier": _number_check(),
    "validation_seed": _int_check(),
    "validation_split": _number_check(0.0, 1.0, high_open=True),
    "resize_interpolation": _choice_check(RESIZE_INTERPOLATIONS),
    # subset level, all kinds
    "num_repeats": _int_check(),
    "shuffle_caption": _check_bool,
    # str.split("") raises, so an empty separator is refused here rather than mid-training.
    "caption_separator": _str_check(nonempty=True),
    "keep_tokens": _int_check(0),
    "keep_tokens_separator": _str_check(),
    "secondary_separator": _str_check(),
    "enable_wildcard": _check_bool,
    "caption_prefix": _str_check(),
    "caption_suffix": _str_check(),
    "color_aug": _check_bool,
    "flip_aug": _check_bool,
    "random_crop": _check_bool,
    "face_crop_aug_range": _check_float_pair,
    "token_warmup_min": _int_check(0),
    "token_warmup_step": _number_check(0.0),
    "custom_attributes": _check_table,
    "caption_dropout_rate": _number_check(0.0, 1.0),
    "caption_dropout_every_n_epochs": _int_check(0),
    "caption_tag_dropout_rate": _number_check(0.0, 1.0),
    # kind-specific
    "image_dir": _str_check(nonempty=True),
    "is_reg": _check_bool,
    "alpha_mask": _check_bool,
    "class_tokens": _str_check(),
    "caption_extension": _check_caption_extension,
    "cache_info": _check_bool,
    "metadata_file": _check_metadata_file,
    "conditioning_data_dir": _str_check(nonempty=True),
    # command line only
    "prior_loss_weight": _number_check(0.0),
    "debug_dataset": _check_bool,
    "max_token_length": _check_max_token_length,
}

DATASET_KEYS = (
    "resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
    "bucket_no_upscale", "network_multiplier", "validation_seed", "validation_split", "resize_interpolation",
)
SUBSET_COMMON_KEYS = (
    "num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
    "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "color_aug", "flip_aug",
    "random_crop", "face_crop_aug_range", "token_warmup_min", "token_warmup_step", "custom_attributes",
    "resize_interpolation",
)
DROPOUT_KEYS = ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate")
# "Ascendable" keys may also be written at dataset level or in [general]; "distinct" keys only in a subset.
ASCENDABLE_KEYS = {
    DREAMBOOTH: ("caption_extension", "class_tokens", "cache_info"),
    FINETUNE: (),
    CONTROLNET: ("caption_extension", "cache_info"),
}
DISTINCT_KEYS = {
    DREAMBOOTH: ("image_dir", "is_reg", "alpha_mask"),
    FINETUNE: ("metadata_file", "image_dir", "alpha_mask"),
    CONTROLNET: ("image_dir", "conditioning_data_dir"),
}
REQUIRED_KEYS = {
    DREAMBOOTH: ("image_dir",),
    FINETUNE: ("metadata_file",),
    CONTROLNET: ("image_dir", "conditioning_data_dir"),
}
COMMAND_LINE_ONLY_KEYS = ("prior_loss_weight", "debug_dataset", "max_token_length")
# Command-line names that feed a differently named config key.
ARG_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
KEY_TO_ARG = {key: arg for arg, key in ARG_TO_KEY.items()}
# Names users carry over from the command line or older docs.
KEY_ALIASES = {
    "train_batch_size": "batch_size",
    "dataset_repeats": "num_repeats",
    "train_data_dir": "image_dir",
    "reg_data_dir": "image_dir (with is_reg = true)",
    "in_json": "metadata_file",
    "caption_extention": "caption_extension",
}


@dataclass(frozen=True)
class Support:
    """What the calling trainer accepts (sd-scripts' ConfigSanitizer flags)."""

    dreambooth: bool = True
    finetuning: bool = True
    controlnet: bool = False
    dropout: bool = True

    def subset_keys(self, kind: str) -> tuple:
        return SUBSET_COMMON_KEYS + self._dropout() + ASCENDABLE_KEYS[kind] + DISTINCT_KEYS[kind]

    def dataset_keys(self, kind: str) -> tuple:
        return DATASET_KEYS + SUBSET_COMMON_KEYS + self._dropout() + ASCENDABLE_KEYS[kind] + ("subsets",)

    def general_keys(self) -> tuple:
        keys = DATASET_KEYS + SUBSET_COMMON_KEYS + self._dropout()
        if self.dreambooth:
            keys += ASCENDABLE_KEYS[DREAMBOOTH]
        if self.controlnet:
            keys += ASCENDABLE_KEYS[CONTROLNET]
        return keys

    def _dropout(self) -> tuple:
        return DROPOUT_KEYS if self.dropout else ()


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
    add("--debug_dataset", action="store_true", help="show images for debugging (do not train)")
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
    add("--dataset_class", type=str, default=None,
        help="dataset class for arbitrary dataset (package.module.Class)")

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


# --- loading ------------------------------------------------------------------------------------------


def read_config_file(path) -> dict:
    """Parse a `.toml` or `.json` dataset config; problems become a UserError naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"{path}: dataset config must be a .toml or .json file")
    if not path.is_file():
        raise UserError(f"{path}: dataset config file not found")
    try:
        if suffix == ".toml":
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: malformed TOML: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON: {e.msg} (at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a table with [general] and [[datasets]]")
    return data


def load_dataset_config(
    config_path,
    args: Optional[argparse.Namespace],
    *,
    support_dreambooth: bool = True,
    support_finetuning: bool = True,
    support_controlnet: Optional[bool] = None,
    support_dropout: bool = True,
) -> ResolvedConfig:
    """Resolve the datasets from a config file (or, when `config_path` is None, from the CLI flags).

    support_controlnet None means "with --masked_loss" (train_network and friends).
    """
    if support_controlnet is None:
        support_controlnet = bool(getattr(args, "masked_loss", False))
    support = Support(support_dreambooth, support_finetuning, support_controlnet, support_dropout)
    warnings: list[str] = []
    cli_layer = _command_line_layer(args, support)

    if config_path is not None:
        raw = read_config_file(config_path)
        source = str(config_path)
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if ignored:
            warnings.append(f"{', '.join(ignored)} ignored because --dataset_config is given")
    else:
        raw = _config_from_command_line(args, support, warnings)
        source = None

    resolver = _Resolver(support, source, cli_layer, warnings)
    datasets = resolver.resolve(raw)
    config = ResolvedConfig(datasets, _general_params(cli_layer), source, warnings)
    _check_latent_caching(config, args)
    for message in warnings:
        logger.warning(message)
    return config


# A resolved layer maps key -> (value, where it came from).
Layer = dict[str, tuple[Any, str]]


def _command_line_layer(args: Optional[argparse.Namespace], support: Support) -> Layer:
    """Dataset-relevant command-line values, converted and checked; None values are left out."""
    if args is None:
        return {}
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
        except _Invalid as e:
            raise UserError(f"{flag} {_show(value)}: {e}") from None
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


def _general_params(cli_layer: Layer) -> GeneralParams:
    general = GeneralParams()
    for key in COMMAND_LINE_ONLY_KEYS:
        if key in cli_layer:
            setattr(general, key, cli_layer[key][0])
    return general


def _show(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


# --- the resolver ----------------------------------------------------------------------------------


class _Resolver:
    """Validates a raw config (from a file or built from the CLI) and applies the fallback chain."""

    def __init__(self, support: Support, source: Optional[str], cli_layer: Layer, warnings: list[str]):
        self.support = support
        self.source = source
        self.cli_layer = cli_layer
        self.warnings = warnings

    # Labels and errors
    def error(self, section: str, message: str) -> UserError:
        prefix = f"{self.source}: " if self.source else ""
        return UserError(f"{prefix}{section}: {message}")

    def dataset_label(self, d: int) -> str:
        return f"[[datasets]] #{d + 1}" if self.source else "command-line dataset"

    def subset_label(self, d: int, s: int, raw: dict) -> str:
        if self.source:
            return f"[[datasets.subsets]] #{s + 1} of [[datasets]] #{d + 1}"
        return f"folder {raw.get('image_dir')!r}" if raw.get("image_dir") else "command-line subset"

    # Top level
    def resolve(self, raw: dict) -> list[DatasetParams]:
        for key in raw:
            if key not in ("general", "datasets"):
                hint = _suggest(key, ["general", "datasets"])
                raise self.error("top level", f"unknown key '{key}'{hint}; only [general] and [[datasets]] are allowed")
        general_raw = raw.get("general", {})
        if not isinstance(general_raw, dict):
            raise self.error("top level", "'general' must be a table ([general])")
        general = self.check_section(general_raw, self.support.general_keys(), "[general]", "general")
        datasets_raw = raw.get("datasets", [])
        if not isinstance(datasets_raw, list) or not all(isinstance(d, dict) for d in datasets_raw):
            raise self.error("top level", "'datasets' must be an array of tables ([[datasets]])")
        if not datasets_raw:
            raise self.error("top level", "no [[datasets]] defined; add at least one with a [[datasets.subsets]]")
        return [self.resolve_dataset(d, dataset_raw, general) for d, dataset_raw in enumerate(datasets_raw)]

    def resolve_dataset(self, d: int, dataset_raw: dict, general: Layer) -> DatasetParams:
        label = self.dataset_label(d)
        subsets_raw = dataset_raw.get("subsets")
        if not subsets_raw:
            raise self.error(label, "no [[datasets.subsets]] defined; each dataset needs at least one subset")
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw):
            raise self.error(label, "'subsets' must be an array of tables ([[datasets.subsets]])")

        kind = self.dataset_kind(d, subsets_raw)
        dataset_layer = self.check_section(dataset_raw, self.support.dataset_keys(kind), label, "dataset", kind)
        layers_for_dataset = [dataset_layer, general, self.cli_layer]
        params = DatasetParams(kind=kind)
        for key in DATASET_KEYS:
            _assign(params, key, layers_for_dataset)

        for s, subset_raw in enumerate(subsets_raw):
            subset_label = self.subset_label(d, s, subset_raw)
            subset_layer = self.check_section(subset_raw, self.support.subset_keys(kind), subset_label, "subset", kind)
            for key in REQUIRED_KEYS[kind]:
                if key not in subset_layer:
                    raise self.error(subset_label, f"missing required key '{key}'")
            subset = SubsetParams(kind=kind)
            for key in self.support.subset_keys(kind):
                _assign(subset, key, [subset_layer] + layers_for_dataset)
            self.check_subset(subset, subset_label, [subset_layer] + layers_for_dataset)
            params.subsets.append(subset)

        self.check_dataset(params, label, layers_for_dataset)
        return params

    def dataset_kind(self, d: int, subsets_raw: list[dict]) -> str:
        label = self.dataset_label(d)
        support = self.support
        if support.controlnet and all("conditioning_data_dir" in s for s in subsets_raw):
            return CONTROLNET
        with_metadata = ["metadata_file" in s for s in subsets_raw]
        if all(with_metadata) and support.finetuning:
            return FINETUNE
        if not any(with_metadata) and support.dreambooth:
            return DREAMBOOTH
        if any(with_metadata) and not all(with_metadata) and support.dreambooth and support.finetuning:
            raise self.error(
                label,
                "DreamBooth subsets (image_dir only) and fine-tuning subsets (metadata_file) cannot be mixed in one "
                "dataset; split them into separate [[datasets]]",
            )
        # Only one kind is supported by this trainer: report the subsets as that kind, so the
        # message names the missing or unknown key.
        only = DREAMBOOTH if support.dreambooth else FINETUNE if support.finetuning else CONTROLNET
        return only

    def check_section(self, raw: dict, allowed: tuple, label: str, level: str, kind: Optional[str] = None) -> Layer:
        """Check keys and values of one table; return its non-None values as a layer."""
        layer: Layer = {}
        for key, value in raw.items():
            if key not in allowed:
                raise self.error(label, f"unknown key '{key}'{self.unknown_key_hint(key, allowed, level, kind)}")
            if key == "subsets" or value is None:  # JSON null = unset
                continue
            try:
                layer[key] = (CHECKS[key](value), label)
            except _Invalid as e:
                raise self.error(label, f"'{key}' {e}, got {_show(value)}") from None
        return layer

    def unknown_key_hint(self, key: str, allowed: tuple, level: str, kind: Optional[str]) -> str:
        support = self.support
        if key in COMMAND_LINE_ONLY_KEYS:
            return f"; '{key}' can only be set on the command line (--{key})"
        if key == "metadata_file" and not support.finetuning:
            return "; this trainer does not accept fine-tuning subsets (metadata_file)"
        if key == "conditioning_data_dir" and not support.controlnet:
            return "; conditioning_data_dir is only accepted with --masked_loss or by the ControlNet-LLLite trainer"
        if key == "conditioning_data_dir" and level == "subset":
            return "; a ControlNet/masked-loss dataset needs conditioning_data_dir in every one of its subsets"
        if key in DROPOUT_KEYS and not support.dropout:
            return "; caption dropout is not supported by this trainer"
        if key in DATASET_KEYS and level == "subset":
            return f"; '{key}' is a dataset setting: put it in [[datasets]] or [general]"
        all_distinct = {k for keys in DISTINCT_KEYS.values() for k in keys}
        if key in all_distinct and level != "subset":
            return f"; '{key}' belongs in each [[datasets.subsets]]"
        if key in CHECKS:
            return f"; '{key}' does not apply to {kind} subsets" if kind else f"; '{key}' is not used by this trainer"
        if key in KEY_ALIASES:
            return f" (did you mean '{KEY_ALIASES[key]}'?)"
        return _suggest(key, allowed)

    # Cross-key checks on resolved values
    def check_subset(self, subset: SubsetParams, label: str, layers: list[Layer]) -> None:
        if subset.kind == CONTROLNET and subset.random_crop:
            origin = _origin("random_crop", layers)
            raise self.error(label, f"random_crop is not supported for ControlNet/masked-loss subsets (set by {origin})")

    def check_dataset(self, params: DatasetParams, label: str, layers: list[Layer]) -> None:
        if params.resolution is None and params.kind != FINETUNE:
            where = "[[datasets]] or [general], " if self.source else ""
            raise self.error(label, f"no resolution set; add resolution = 512 (or [W, H]) to {where}or pass --resolution")
        if params.enable_bucket:
            self.round_bucket_limits(params, label, layers)

    def round_bucket_limits(self, params: DatasetParams, label: str, layers: list[Layer]) -> None:
        steps = params.bucket_reso_steps
        low = params.min_bucket_reso - params.min_bucket_reso % steps
        high = params.max_bucket_reso + (-params.max_bucket_reso) % steps
        for key, value in (("min_bucket_reso", low), ("max_bucket_reso", high)):
            if getattr(params, key) != value:
                self.warnings.append(f"{label}: {key} {getattr(params, key)} rounded to {value} (a multiple of {steps})")
                setattr(params, key, value)
        if low <= 0:
            raise self.error(label, f"min_bucket_reso must be at least bucket_reso_steps ({steps})")
        if low > high:
            raise self.error(label, f"min_bucket_reso {low} is larger than max_bucket_reso {high}")
        if params.resolution is None:
            return
        if min(params.resolution) < low:
            raise self.error(
                label,
                f"min_bucket_reso {low} ({_origin('min_bucket_reso', layers)}) is larger than the resolution's "
                f"smaller side {min(params.resolution)}; lower min_bucket_reso",
            )
        if max(params.resolution) > high:
            raise self.error(
                label,
                f"max_bucket_reso {high} ({_origin('max_bucket_reso', layers)}) is smaller than the resolution's "
                f"larger side {max(params.resolution)}; raise max_bucket_reso",
            )


def _assign(params, key: str, layers: list[Layer]) -> None:
    """Set `params.key` to the first value found along the fallback chain (else keep the default)."""
    for layer in layers:
        if key in layer:
            setattr(params, key, layer[key][0])
            return


def _origin(key: str, layers: list[Layer]) -> str:
    for layer in layers:
        if key in layer:
            return layer[key][1]
    return "default"


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, [k for k in allowed if k != "subsets"], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_latent_caching(config: ResolvedConfig, args) -> None:
    if not (getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)):
        return
    for d, dataset in enumerate(config.datasets, 1):
        for s, subset in enumerate(dataset.subsets, 1):
            for key in ("color_aug", "random_crop"):
                if getattr(subset, key):
                    raise UserError(
                        f"dataset #{d}, subset #{s}: {key} changes the image every step, so latents cannot be cached; "
                        f"drop {key} or --cache_latents/--cache_latents_to_disk"
                    )


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


def _config_from_command_line(args, support: Support, warnings: list[str]) -> dict:
    """The config sd-scripts builds when no --dataset_config is given."""
    train_dir = getattr(args, "train_data_dir", None)
    in_json = getattr(args, "in_json", None) if support.finetuning else None

    if support.controlnet and not (support.dreambooth or support.finetuning):
        cond_dir = getattr(args, "conditioning_data_dir", None)
        if not train_dir or not cond_dir:
            raise UserError("--train_data_dir and --conditioning_data_dir are required (or pass --dataset_config)")
        subset = {"image_dir": train_dir, "conditioning_data_dir": cond_dir, "num_repeats": 1}
        return {"datasets": [{"subsets": [subset]}]}

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
