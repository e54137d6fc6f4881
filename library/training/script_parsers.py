"""The argument parsers of the training scripts, composed from each module's flag group.

Imports nothing heavy: `train_network.py --help` builds its parser from here without torch.
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable, Dict, List

from library.caching import settings as cache_settings
from library.data import check as dataset_check, flags as dataset_flags
from library.training import ema, lr_schedulers, optimizers, ti_args, train_args, train_math

FULL_MODEL_FORMATS = [None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"]


def _base_parser(description: str, sdxl: bool, support_dreambooth: bool = True,
                 support_caption: bool = True, masked_loss: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_logging_arguments(parser)
    train_args.add_model_arguments(parser, sdxl=sdxl)
    train_args.add_modelspec_arguments(parser)
    dataset_flags.add_dataset_arguments(parser, support_dreambooth, support_caption, True)
    dataset_flags.add_config_arguments(parser)
    train_args.add_training_arguments(parser, support_dreambooth)
    if masked_loss:
        train_args.add_masked_loss_arguments(parser)
    lr_schedulers.add_lr_scheduler_arguments(optimizers.add_optimizer_arguments(parser))
    train_math.add_train_math_arguments(parser)
    parser.add_argument("--weighted_captions", action="store_true", help="parse (word:1.2) weights in captions")
    cache_settings.add_cache_arguments(parser, support_text_encoder_caching=sdxl)
    dataset_check.add_dataset_check_arguments(parser)
    if sdxl:
        train_args.add_sdxl_arguments(parser)
    ema.add_ema_arguments(parser)
    # --config_file names the script that has a key this one lacks (train_args.parse_args)
    parser.option_scripts = option_scripts
    return parser


def network_parser(sdxl: bool, description: str) -> argparse.ArgumentParser:
    parser = _base_parser(description, sdxl)
    train_args.add_network_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# full-model trainers (library/training/task_full.py; flags as sd-scripts, docs/full-training.md)


def _add_full_model_saving(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving the model")
    g.add_argument("--save_model_as", choices=FULL_MODEL_FORMATS, default=None,
                   help="format of the saved model (default: the same kind as the base model)")
    g.add_argument("--use_safetensors", action="store_true",
                   help="save weights as safetensors (a default or ckpt single file becomes .safetensors)")


def _add_prior_loss_weight(parser: argparse.ArgumentParser) -> None:
    """fine_tune / sdxl_train: sd-scripts has no flag and weights reg images 1; we apply it."""
    parser.add_argument("--prior_loss_weight", type=float, default=1.0,
                        help="loss weight of regularization images (is_reg subsets)")


def db_parser(description: str) -> argparse.ArgumentParser:
    parser = _base_parser(description, sdxl=False, support_dreambooth=True, support_caption=False)
    _add_full_model_saving(parser)
    g = parser.add_argument_group("DreamBooth")
    g.add_argument("--learning_rate_te", type=float, default=None,
                   help="text-encoder learning rate (default: one group with --learning_rate)")
    g.add_argument("--no_token_padding", action="store_true",
                   help="accepted for compatibility; has no effect (as in sd-scripts)")
    g.add_argument("--stop_text_encoder_training", type=int, default=None,
                   help="stop training the text encoder after this many steps (-1: never train it)")
    return parser


def fine_tune_parser(description: str) -> argparse.ArgumentParser:
    parser = _base_parser(description, sdxl=False, support_dreambooth=False)
    _add_prior_loss_weight(parser)
    _add_full_model_saving(parser)
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers")
    g.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
    g.add_argument("--learning_rate_te", type=float, default=None,
                   help="text-encoder learning rate (default: --learning_rate)")
    return parser


def sdxl_train_parser(description: str) -> argparse.ArgumentParser:
    parser = _base_parser(description, sdxl=True, support_dreambooth=True)
    _add_full_model_saving(parser)
    g = parser.add_argument_group("SDXL fine-tuning")
    g.add_argument("--learning_rate_te1", type=float, default=None,
                   help="text encoder 1 learning rate (default --learning_rate; 0 = frozen)")
    g.add_argument("--learning_rate_te2", type=float, default=None,
                   help="text encoder 2 learning rate (default --learning_rate; 0 = frozen)")
    g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers")
    g.add_argument("--train_text_encoder", action="store_true", help="train the text encoders too")
    g.add_argument("--block_lr", type=str, default=None,
                   help="23 comma-separated U-Net learning rates: time/label embedding, input blocks 0-8, "
                   "middle 0-2, output blocks 0-8, out (0 = block frozen)")
    g.add_argument("--fused_optimizer_groups", type=int, default=None,
                   help="step the optimizer per parameter during the backward pass (any per-parameter optimizer)")
    return parser


def ti_parser(sdxl: bool, description: str) -> argparse.ArgumentParser:
    parser = _base_parser(description, sdxl)
    ti_args.add_textual_inversion_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# ControlNet-LLLite (library/training/task_lllite.py; flags as sd-scripts, docs/controlnet-lllite.md)


def lllite_parser(description: str) -> argparse.ArgumentParser:
    """sd-scripts' sdxl_train_control_net_lllite.py: ControlNet datasets only, no masked loss."""
    parser = _base_parser(description, sdxl=True, support_dreambooth=False, masked_loss=False)
    g = parser.add_argument_group("ControlNet-LLLite")
    g.add_argument("--save_model_as", choices=[None, "ckpt", "pt", "safetensors"], default="safetensors",
                   help="file format of the trained network (pt and ckpt are torch pickles)")
    g.add_argument("--cond_emb_dim", type=int, default=None,
                   help="width of the hint image's embedding (required; 32 in sd-scripts' canny example)")
    g.add_argument("--network_dim", type=int, default=None,
                   help="width of each module's MLP (required; 64 in sd-scripts' canny example)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout in each module's MLP while training")
    g.add_argument("--network_weights", type=str, default=None,
                   help="start from this LLLite file (ours or sd-scripts'); its widths are used")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="hint images with the base names of the --train_data_dir images (without --dataset_config)")
    return parser


# ---------------------------------------------------------------------------------------------
# every trainer's options, by script


TRAINER_SCRIPTS: Dict[str, Callable[[], argparse.ArgumentParser]] = {
    "train_network.py": lambda: network_parser(False, ""),
    "sdxl_train_network.py": lambda: network_parser(True, ""),
    "train_db.py": lambda: db_parser(""),
    "fine_tune.py": lambda: fine_tune_parser(""),
    "sdxl_train.py": lambda: sdxl_train_parser(""),
    "train_textual_inversion.py": lambda: ti_parser(False, ""),
    "sdxl_train_textual_inversion.py": lambda: ti_parser(True, ""),
    "sdxl_train_control_net_lllite.py": lambda: lllite_parser(""),
}


@functools.lru_cache(maxsize=None)
def trainer_parsers() -> Dict[str, argparse.ArgumentParser]:
    return {name: build() for name, build in TRAINER_SCRIPTS.items()}


@functools.lru_cache(maxsize=None)
def option_scripts() -> Dict[str, List[str]]:
    """{option dest: the trainer scripts that have it}."""
    found: Dict[str, List[str]] = {}
    for name, parser in trainer_parsers().items():
        for action in parser._actions:
            if action.dest != "help":
                found.setdefault(action.dest, []).append(name)
    return found
