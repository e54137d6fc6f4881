"""Fine-tune a whole SD1.x / SD2.x model from captions/tags metadata, as sd-scripts' fine_tune.py.

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \
        --in_json meta.json --train_data_dir images --output_dir out --learning_rate 1e-6 ...

Flags, formats and the differences from sd-scripts: docs/full-training.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.training.script_parsers import fine_tune_parser
    from library.training.train_args import parse_args

    args = parse_args(fine_tune_parser(description=__doc__), argv)
    from library.training.task_full import FullModelTask
    from library.training.trainer import train

    result = train(args, FullModelTask("fine_tune"))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    run(main)
