"""Train a ControlNet-LLLite network on SDXL, as sd-scripts' sdxl_train_control_net_lllite.py.

    accelerate launch sdxl_train_control_net_lllite.py --pretrained_model_name_or_path sdxl.safetensors \
        --dataset_config lllite.toml --output_dir out --output_name canny_lllite \
        --cond_emb_dim 32 --network_dim 64 --learning_rate 2e-4 --max_train_epochs 12 ...

Every training image needs a hint image of the same size and base name in the subset's
conditioning_data_dir (without a config: --train_data_dir and --conditioning_data_dir).
Generate with it: sdxl_gen_img.py --control_net_lllite_models out/canny_lllite.safetensors
--guide_image_path hint.png. See docs/controlnet-lllite.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.training.script_parsers import lllite_parser
    from library.training.train_args import parse_args

    args = parse_args(lllite_parser(description=__doc__), argv)
    from library.training.task_lllite import LLLiteTask
    from library.training.trainer import train

    result = train(args, LLLiteTask())
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    run(main)
