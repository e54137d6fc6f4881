"""Train a LoRA (or any --network_module network) on SD1.x / SD2.x, as sd-scripts' train_network.py.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir data --output_dir out --network_module networks.lora --network_dim 8 ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.training.script_parsers import network_parser
    from library.training.train_args import parse_args

    args = parse_args(network_parser(sdxl=False, description=__doc__), argv)
    from library.training.task_network import NetworkTask
    from library.training.trainer import train

    result = train(args, NetworkTask(sdxl=False))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    run(main)
