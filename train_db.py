"""DreamBooth-train a whole SD1.x / SD2.x model (U-Net and text encoder), as sd-scripts' train_db.py.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir data --reg_data_dir reg --output_dir out --learning_rate 1e-6 ...

Flags, formats and the differences from sd-scripts: docs/full-training.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.training.script_parsers import db_parser
    from library.training.train_args import parse_args

    args = parse_args(db_parser(description=__doc__), argv)
    from library.training.task_full import FullModelTask
    from library.training.trainer import train

    result = train(args, FullModelTask("db"))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    run(main)
