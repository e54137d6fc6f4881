"""Dataset configuration: `--dataset_config` TOML/JSON files and the command line, resolved.

`load_dataset_config` produces a `ResolvedConfig`: plain dataclasses holding, for every dataset and
subset, the value of each setting after sd-scripts' fallback chain

    subset -> dataset -> [general] -> command line -> default        (None = unset)

(dataset settings skip the subset level). Without a config file the same structure is built from
the command line (`--train_data_dir` with `<repeats>_<class tokens>` sub-folders, `--reg_data_dir`,
`--in_json`, ...), so the rest of the code never cares where a value came from.

Every problem in the user's input (unknown key, wrong type, value out of range, impossible
combination, malformed file) is one `UserError` naming the file, the section and the key. The keys
and their checks are `library.data.schema`; the flags and the config they describe are
`library.data.flags`. This module does not touch images; `library.data.sources` turns
subsets into image lists. No torch import: argument parsers and tools import this before any model
is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from library.data.flags import command_line_layer, config_from_command_line
from library.data.schema import (
    CHECKS,
    COMMAND_LINE_ONLY_KEYS,
    CONTROLNET,
    DATASET_KEYS,
    DREAMBOOTH,
    FINETUNE,
    REQUIRED_KEYS,
    InvalidValue,
    Layer,
    Support,
    show_value,
    suggest_key,
    unknown_key_hint,
)
from library.errors import UserError

logger = logging.getLogger(__name__)


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
    cli_layer = command_line_layer(args, support)

    if config_path is not None:
        raw = read_config_file(config_path)
        source = str(config_path)
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if getattr(args, name, None)]
        if ignored:
            warnings.append(f"{', '.join(ignored)} ignored because --dataset_config is given")
    else:
        raw = config_from_command_line(args, support, warnings)
        source = None

    resolver = _Resolver(support, source, cli_layer, warnings)
    datasets = resolver.resolve(raw)
    config = ResolvedConfig(datasets, _general_params(cli_layer), source, warnings)
    _check_latent_caching(config, args)
    for message in warnings:
        logger.warning(message)
    return config


def _general_params(cli_layer: Layer) -> GeneralParams:
    general = GeneralParams()
    for key in COMMAND_LINE_ONLY_KEYS:
        if key in cli_layer:
            setattr(general, key, cli_layer[key][0])
    return general


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
                hint = suggest_key(key, ["general", "datasets"])
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
                hint = unknown_key_hint(key, allowed, level, kind, self.support)
                raise self.error(label, f"unknown key '{key}'{hint}")
            if key == "subsets" or value is None:  # JSON null = unset
                continue
            try:
                layer[key] = (CHECKS[key](value), label)
            except InvalidValue as e:
                raise self.error(label, f"'{key}' {e}, got {show_value(value)}") from None
        return layer

    # Cross-key checks on resolved values
    def check_subset(self, subset: SubsetParams, label: str, layers: list[Layer]) -> None:
        if subset.kind == CONTROLNET and subset.random_crop:
            origin = _origin("random_crop", layers)
            raise self.error(label, f"random_crop is not supported for ControlNet/masked-loss subsets (set by {origin})")

    def check_dataset(self, params: DatasetParams, label: str, layers: list[Layer]) -> None:
        if params.resolution is None and params.kind != FINETUNE:
            where = "[[datasets]] or [general], " if self.source else ""
            raise self.error(label, f"no resolution set; add resolution = 512 (or [W, H]) to {where}or pass --resolution")
        if params.resolution is not None:
            self.check_resolution(params, label, layers)
        if params.enable_bucket:
            self.round_bucket_limits(params, label, layers)

    def check_resolution(self, params: DatasetParams, label: str, layers: list[Layer]) -> None:
        """Without bucketing every sample has the resolution's size: it must map to whole latents (1/8).
        With bucketing it only sets the buckets' largest area; a side off the steps is worth a word."""
        w, h = params.resolution
        origin = _origin("resolution", layers)
        if not params.enable_bucket and (w % 8 or h % 8):
            hint = ",".join(str(max(64, round(side / 64) * 64)) for side in (w, h))
            raise self.error(label, f"resolution {w},{h} ({origin}): without bucketing every image is trained at this "
                                    f"size, so each side must be a multiple of 8 (a latent is 1/8 of the image; 64 is "
                                    f"usual), e.g. {hint}")
        steps = params.bucket_reso_steps
        if params.enable_bucket and (w % steps or h % steps):
            side = int(math.sqrt(w * h) // steps) * steps
            self.warnings.append(f"{label}: resolution {w},{h} ({origin}) is not a multiple of bucket_reso_steps "
                                 f"{steps}: it only sets the buckets' largest area ({w * h} pixels), so the square "
                                 f"bucket is {side}x{side}")

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
