"""Dataset config schema: the keys each level accepts, their value checks, and unknown-key hints.

A `--dataset_config` file has [general], [[datasets]] and [[datasets.subsets]] tables. Which keys a
table accepts depends on its level, on the kind of its dataset (DreamBooth folders, fine-tuning
metadata, ControlNet / masked-loss image pairs) and on what the calling trainer supports
(`Support`, sd-scripts' ConfigSanitizer flags). `CHECKS` maps every key to the check that converts
its value or raises `InvalidValue` saying what is expected; `unknown_key_hint` explains a key a
table does not accept (a command-line-only setting, the wrong level, another kind, an old name, a
typo: "did you mean"). No torch, no file access: the loader and the flag parsers build on this.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

DREAMBOOTH = "dreambooth"
FINETUNE = "finetune"
CONTROLNET = "controlnet"

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
MAX_TOKEN_LENGTHS = (75, 150, 225)

# A resolved layer maps key -> (value, where it came from).
Layer = dict[str, tuple[Any, str]]


# --- value checks ---------------------------------------------------------------------------------


class InvalidValue(Exception):
    """A value failed its check; the message says what is expected."""


def _check_bool(value):
    if not isinstance(value, bool):
        raise InvalidValue("must be true or false")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_check(minimum: Optional[int] = None) -> Callable:
    def check(value):
        if not _is_int(value):
            raise InvalidValue("must be an integer")
        if minimum is not None and value < minimum:
            raise InvalidValue(f"must be >= {minimum}")
        return value

    return check


def _number_check(low: Optional[float] = None, high: Optional[float] = None, high_open: bool = False) -> Callable:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidValue("must be a number")
        if (low is not None and value < low) or (
            high is not None and (value >= high if high_open else value > high)
        ):
            upper = f"below {high}" if high_open else f"at most {high}"
            raise InvalidValue(f"must be at least {low} and {upper}" if high is not None else f"must be >= {low}")
        return float(value)

    return check


def _str_check(nonempty: bool = False) -> Callable:
    def check(value):
        if not isinstance(value, str):
            raise InvalidValue("must be a string")
        if nonempty and value == "":
            raise InvalidValue("must not be empty")
        return value

    return check


def _check_caption_extension(value):
    value = _str_check()(value)
    return "." + value if value and not value.startswith(".") else value


def _check_metadata_file(value):
    value = _str_check(nonempty=True)(value)
    if not value.lower().endswith((".json", ".jsonl")):
        raise InvalidValue("must be a .json or .jsonl file")
    return value


def _check_resolution(value):
    if _is_int(value) and value > 0:
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (value[0], value[1])
    raise InvalidValue("must be a positive size like 512 or [768, 512] (width, height)")


def _check_float_pair(value):
    numbers = isinstance(value, (list, tuple)) and len(value) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers:
        raise InvalidValue("must be two numbers like [2.0, 4.0]")
    low, high = float(value[0]), float(value[1])
    if not 0 < low <= high:
        raise InvalidValue("must be [low, high] with 0 < low <= high")
    return (low, high)


def _check_table(value):
    if not isinstance(value, dict):
        raise InvalidValue("must be a table")
    return dict(value)


def _choice_check(choices) -> Callable:
    def check(value):
        if value not in choices:
            raise InvalidValue("must be one of " + ", ".join(choices))
        return value

    return check


def _check_max_token_length(value):
    if value not in MAX_TOKEN_LENGTHS:
        raise InvalidValue("must be 75, 150 or 225")
    return value


# --- key table ------------------------------------------------------------------------------------


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


# --- hints for unknown keys ------------------------------------------------------------------------


def unknown_key_hint(key: str, allowed: tuple, level: str, kind: Optional[str], support: Support) -> str:
    """Why `key` is not accepted in a table of `level` ("general", "dataset", "subset") and `kind`."""
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
    return suggest_key(key, allowed)


def suggest_key(key: str, allowed) -> str:
    """The hint " (did you mean 'KEY'?)" for the allowed key closest to `key`, else an empty string."""
    close = difflib.get_close_matches(key, [k for k in allowed if k != "subsets"], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def show_value(value) -> str:
    """A config value as the user wrote it (JSON), for error messages."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)
