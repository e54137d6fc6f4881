"""Train a textual-inversion embedding on SDXL (both text encoders), as sd-scripts' sdxl_train_textual_inversion.py.

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir data --output_dir out --token_string mychar --init_word girl \
        --num_vectors_per_token 4 --learning_rate 5e-3 --max_train_steps 1000 ...

Captions must contain the token string (or use --use_object_template / --use_style_template).
See docs/textual-inversion.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.training.script_parsers import ti_parser
    from library.training.train_args import parse_args

    args = parse_args(ti_parser(sdxl=True, description=__doc__), argv)
    from library.training.task_embedding import EmbeddingTask
    from library.training.trainer import train

    result = train(args, EmbeddingTask(sdxl=True))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    run(main)
