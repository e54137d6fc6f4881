"""The argument parsers of the training scripts, composed from each module's flag group.

Imports nothing heavy: `train_network.py --help` builds its parser from here without torch.
"""

from __future__ import annotations

import argparse

from library import dataset_config, dataset_scan, latent_cache, optimizers, train_args, train_math


def _base_parser(description: str, sdxl: bool, support_dreambooth: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_args.add_logging_arguments(parser)
    train_args.add_model_arguments(parser, sdxl=sdxl)
    train_args.add_modelspec_arguments(parser)
    dataset_config.add_dataset_arguments(parser, support_dreambooth, True, True)
    dataset_config.add_config_arguments(parser)
    train_args.add_training_arguments(parser, support_dreambooth)
    train_args.add_masked_loss_arguments(parser)
    optimizers.add_optimizer_arguments(parser)
    train_math.add_train_math_arguments(parser)
    parser.add_argument("--weighted_captions", action="store_true", help="parse (word:1.2) weights in captions")
    latent_cache.add_cache_arguments(parser, support_text_encoder_caching=sdxl)
    dataset_scan.add_dataset_check_arguments(parser)
    if sdxl:
        train_args.add_sdxl_arguments(parser)
    return parser


def network_parser(sdxl: bool, description: str) -> argparse.ArgumentParser:
    parser = _base_parser(description, sdxl)
    train_args.add_network_arguments(parser)
    return parser
