"""Every trainer's options on a tool's parser, so a training command line or `--config_file` runs unchanged.

sd-scripts' cache tools take the trainer's whole parser: the command line (or TOML) of a training run
works on them as it is. `add_trainer_options` gives a tool's parser every option of every trainer
script that the tool does not define itself (with the trainers' types and defaults, so values are
checked as the trainer would), `--config_file`, `--output_config` and `--config_strict` included;
after `train_args.parse_args`, `report_ignored` says in one line which of them were set and have
no effect on what the tool does. Nothing heavy is imported.
"""

from __future__ import annotations

import argparse
import logging
from typing import Iterable

from library.training import script_parsers

logger = logging.getLogger(__name__)

# read by train_args.parse_args on every parser that has them
_USED_BY_PARSING = ("config_file", "output_config", "config_strict")
_SHOWN = 12  # ignored options named in the line


def add_trainer_options(parser: argparse.ArgumentParser, title: str) -> set:
    """Add the trainers' options `parser` lacks; returns their dests (those not used by the tool)."""
    group = parser.add_argument_group(title)
    added = set()
    for trainer in script_parsers.trainer_parsers().values():
        for action in trainer._actions:
            if action.dest == "help" or any(o in parser._option_string_actions for o in action.option_strings):
                continue
            shown = action.dest in _USED_BY_PARSING
            kwargs = {"dest": action.dest, "default": action.default, "help": action.help if shown else argparse.SUPPRESS}
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kwargs["action"] = "store_true" if isinstance(action, argparse._StoreTrueAction) else "store_false"
            else:
                # the first trainer's type; choices differ between trainers (save_model_as) and are not checked here
                kwargs.update(type=action.type, nargs=action.nargs, metavar=action.metavar)
            group.add_argument(*action.option_strings, **kwargs)
            if action.dest not in _USED_BY_PARSING:
                added.add(action.dest)
    parser.option_scripts = script_parsers.option_scripts  # unknown --config_file keys say whose they are
    return added


def report_ignored(args: argparse.Namespace, parser: argparse.ArgumentParser, ignored: Iterable[str]) -> list:
    """One line naming the trainer options that were set (command line or config) but do nothing here."""
    set_options = [f"--{dest}" for dest in sorted(ignored) if getattr(args, dest, None) != parser.get_default(dest)]
    if set_options:
        shown = ", ".join(set_options[:_SHOWN])
        more = f" and {len(set_options) - _SHOWN} more" if len(set_options) > _SHOWN else ""
        logger.info(f"{parser.prog}: ignoring training options that do not change the cache: {shown}{more}")
    return set_options
