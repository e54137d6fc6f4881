"""`--config_file` and `--output_config`: sd-scripts' flat TOML of script options, read with types kept.

Reading follows sd-scripts (`train_util.read_config_from_file`): `.toml` is appended when missing,
the file is flattened one level (top-level keys kept, each table's keys hoisted, section names
ignored, later duplicates win), and the command line wins over the file. What sd-scripts leaves
unchecked is checked here, without refusing what it accepts:

* a key naming an option of the script sets it, through the option's own conversion and choices
  (`resolution = 512`, `max_train_steps = "30"` and `learning_rate = 1e-4` all work; a wrong value is
  an error naming the file and key);
* `false`, `""` and `[]` on an option that takes a value mean "not set" (its default), as sd-scripts'
  `if args.resume:` treats them, so `resume = false` never becomes the string "False"; a flag
  (store_true) takes `true`/`false`, or 1/0 as the kohya_ss GUI writes some of them;
* keys naming no option of the script are what sd-scripts ignores silently: here one warning line
  lists them, saying which are settings GUIs write for themselves, which are options of another
  script, and which look like a typo of an option ("did you mean"); `--config_strict` (or
  `config_strict = true` in the file) makes that line an error.

Only the standard library is imported, so parsers stay instant.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import tomllib
from pathlib import Path
from typing import Callable, Dict, List, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

# Keys the kohya_ss GUI's config writer (kohya_gui/*_gui.py, `config_toml_data`) puts into the TOML it
# passes to the scripts, for its own use: no sd-scripts option of these scripts reads them.
# key -> what does that job instead (None: nothing needs to).
KOHYA_GUI_KEYS: Dict[str, Optional[str]] = {
    "epoch": "the GUI turns it into max_train_steps; set max_train_epochs or max_train_steps",
    "noise_offset_type": "the GUI's choice between noise_offset and multires_noise_iterations, which it also writes",
    "lowvram": None,
    "loraplus_lr_ratio": 'read from network_args, e.g. network_args = ["loraplus_lr_ratio=16"]',
    "loraplus_unet_lr_ratio": 'read from network_args, e.g. network_args = ["loraplus_unet_lr_ratio=16"]',
    "loraplus_text_encoder_lr_ratio": 'read from network_args, e.g. network_args = ["loraplus_text_encoder_lr_ratio=4"]',
}

# Keys of other GUIs' and presets' configs that travel with sd-scripts TOMLs (the kohya_ss GUI's JSON
# presets, lora-scripts' settings); key -> the option that does that job.
PRESET_KEYS: Dict[str, Optional[str]] = {
    "LoRA_type": "network_module and network_args",
    "sdxl": "the sdxl_* scripts; the model family is read from the weights",
    "sdxl_no_half_vae": "no_half_vae",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "use_wandb": 'log_with = "wandb"',
    "conv_dim": 'network_args = ["conv_dim=4"]',
    "conv_alpha": 'network_args = ["conv_alpha=1"]',
    "lr_restart_cycles": "lr_scheduler_num_cycles",
    "lr": "learning_rate",
    "batch_size": "train_batch_size, or batch_size in a --dataset_config",
    "max_train_epoches": "max_train_epochs",
    "train_unet_only": "network_train_unet_only",
    "train_text_encoder_only": "network_train_text_encoder_only",
    "resume_from": "resume",
    "sample_dir": "samples go to <output_dir>/sample",
    "sample_batch_size": None,
}

# Options of sd-scripts' SD3 / FLUX / Lumina scripts (kohya_ss GUI configs carry some of them);
# sdtrain trains SD1.x, SD2.x and SDXL only.
DIT_OPTIONS = frozenset({
    "ae", "apply_t5_attn_mask", "blocks_to_swap", "blockwise_fused_optimizers", "clip_g", "clip_l",
    "controlnet_model_name_or_path", "cpu_offload_checkpointing", "discrete_flow_shift", "double_blocks_to_swap",
    "guidance_scale", "logit_mean", "logit_std", "mem_eff_save", "mode_scale", "model_prediction_type", "model_type",
    "save_clip", "save_t5xxl", "sigmoid_scale", "single_blocks_to_swap", "split_mode", "t5xxl", "t5xxl_device",
    "t5xxl_dtype", "t5xxl_max_token_length", "timestep_sampling", "train_blocks", "weighting_scheme",
})

# Top-level keys of a --dataset_config file, when one is passed as --config_file by mistake.
DATASET_CONFIG_KEYS = frozenset({"general", "datasets"})

NOT_WRITTEN = ("config_file", "output_config", "config_strict", "wandb_api_key")

# options whose command-line form is comma-separated numbers: a TOML list is joined back
_COMMA_LISTS = ("resolution", "face_crop_aug_range")


def config_path(path: str) -> str:
    """sd-scripts appends `.toml` to a --config_file given without it."""
    return path if path.lower().endswith(".toml") else path + ".toml"


# ---------------------------------------------------------------------------------------------
# reading


def load_flat(path: str) -> dict:
    """The TOML file flattened one level, as sd-scripts reads it."""
    if not os.path.isfile(path):
        raise UserError(f"--config_file {path}: no such file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in DATASET_CONFIG_KEYS:
            flat.update(value)  # section names are only for people
        else:
            flat[key] = value
    return flat


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _takes_list(action: argparse.Action) -> bool:
    return action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 1)


def convert_value(action: argparse.Action, key: str, value, path: str):
    """A TOML value as the option's value; `NOT_SET` for false / "" / [] on options that take one."""
    where = f"{path}: {key}"
    if _is_flag(action):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # the kohya_ss GUI writes some flags as 0/1
            return bool(value)
        raise UserError(f"{where} is a flag: write true or false, not {value!r}")
    if value is False or value == "" or value == []:
        return NOT_SET
    if isinstance(value, dict):
        raise UserError(f"{where} takes a value, not a table")
    if value is True:
        raise UserError(f"{where} takes a value, not true (write the value, or false / \"\" to leave it unset)")
    if _takes_list(action):
        return [_one(action, v, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        if key in _COMMA_LISTS and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)
        else:
            raise UserError(f"{where} takes one value, not a list")
    return _one(action, value, where)


def _one(action: argparse.Action, value, where: str):
    if isinstance(value, (bool, list, dict)) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: {value!r} is not a valid value")
    if action.type is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{where} = {value!r}: must be a whole number")
        value = int(value)
    if action.type is not None:
        try:
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{where} = {value!r} is not valid ({e})") from None
    elif not isinstance(value, str):
        value = str(value)  # an untyped option holds the string the command line would give it
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} = {value!r} is not one of {[c for c in action.choices if c is not None]}")
    return value


class _NotSet:
    def __repr__(self) -> str:
        return "NOT_SET"


NOT_SET = _NotSet()


def read_config_file(path: str, parser: argparse.ArgumentParser) -> tuple[dict, list]:
    """({dest: value} for keys naming an option of `parser`, [keys naming none]).

    A value of NOT_SET means the file leaves the option at its default."""
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    values, unknown = {}, []
    for key, value in load_flat(path).items():
        if key in actions:
            values[key] = convert_value(actions[key], key, value, path)
        else:
            unknown.append(key)
    return values, unknown


# ---------------------------------------------------------------------------------------------
# keys that name no option


def describe_unknown_keys(keys: List[str], options: List[str], other_scripts: Optional[Dict[str, List[str]]]) -> str:
    """The keys grouped by what they are: GUI settings, other scripts' options, likely typos."""
    gui, preset, dataset, dit, typo, plain = [], [], [], [], [], []
    by_scripts: Dict[str, List[str]] = {}
    for key in keys:
        if key in DATASET_CONFIG_KEYS:
            dataset.append(key)
        elif key in KOHYA_GUI_KEYS:
            hint = KOHYA_GUI_KEYS[key]
            gui.append(f"{key} ({hint})" if hint else key)
        elif key in PRESET_KEYS:
            hint = PRESET_KEYS[key]
            preset.append(f"{key} (use {hint})" if hint else key)
        elif other_scripts and key in other_scripts:
            by_scripts.setdefault(", ".join(other_scripts[key]), []).append(key)
        elif key in DIT_OPTIONS:
            dit.append(key)
        else:
            close = difflib.get_close_matches(key, options, n=1)
            (typo if close else plain).append(f"{key} (did you mean {close[0]}?)" if close else key)
    parts = []
    if gui:
        parts.append("kohya_ss GUI settings: " + ", ".join(gui))
    if preset:
        parts.append("settings of GUI presets: " + ", ".join(preset))
    parts += [f"options of {scripts}: {', '.join(names)}" for scripts, names in by_scripts.items()]
    if dit:
        parts.append("options of sd-scripts' SD3/FLUX scripts: " + ", ".join(dit))
    if dataset:
        parts.append(f"{', '.join(dataset)} (--dataset_config sections: pass that file with --dataset_config)")
    if typo or plain:
        parts.append("unknown: " + ", ".join(typo + plain))
    return "; ".join(parts)


def report_unknown_keys(path: str, keys: List[str], parser: argparse.ArgumentParser, strict: bool,
                        other_scripts: Optional[Callable[[], Dict[str, List[str]]]] = None) -> None:
    """One warning line (or, with strict, one error) naming every key that sets no option."""
    if not keys:
        return
    options = [a.dest for a in parser._actions if a.dest != "help"]
    described = describe_unknown_keys(keys, options, other_scripts() if other_scripts else None)
    script = parser.prog
    n = f"{len(keys)} key{'s' if len(keys) > 1 else ''}"
    if strict:
        raise UserError(f"{path}: {n} name no option of {script}: {described} (--config_strict)")
    logger.warning(f"{path}: ignoring {n} that name no option of {script}, as sd-scripts does: {described}; "
                   f"--config_strict makes this an error")


# ---------------------------------------------------------------------------------------------
# --output_config


def toml_value(value):
    """A parsed option value as TOML can hold it (paths as strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [toml_value(v) for v in value]
    return value


def write_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """--output_config: every option that differs from its default, as flat TOML; returns the path."""
    import toml

    if not args.config_file:
        raise UserError("--output_config needs --config_file PATH to write to")
    path = config_path(args.config_file)
    if os.path.exists(path):
        raise UserError(f"--output_config: {path} already exists; choose another --config_file")
    defaults = parser.parse_args([])
    values = {k: toml_value(v) for k, v in vars(args).items()
              if k not in NOT_WRITTEN and v is not None and getattr(defaults, k, None) != v}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        toml.dump(values, f)
    os.replace(tmp, path)
    return path
