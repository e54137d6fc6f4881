"""Merge LoRA (or LyCORIS) files into an SD1.x/SD2.x checkpoint, or LoRAs into one LoRA.

    python networks/merge_lora.py --sd_model MODEL --models a.safetensors b.safetensors --ratios 0.8 0.5 --save_to OUT
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 [--concat] --save_to OUT

With --sd_model each file's change (ratio · alpha/rank · ΔW) is added to the checkpoint's weights;
a single file is streamed tensor by tensor. Without it the LoRAs' factors are combined into one
LoRA (--concat: ranks side by side, the exact sum). See docs/lora-tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def setup_parser():
    from networks.lora_merging import build_parser

    return build_parser(sdxl=False, description=__doc__)


def main(argv=None):
    from networks.lora_merging import main as merge

    merge(setup_parser().parse_args(argv), sdxl=False)


if __name__ == "__main__":
    run(main)
