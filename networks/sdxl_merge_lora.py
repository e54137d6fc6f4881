"""Merge LoRA (or LyCORIS) files into an SDXL checkpoint, or SDXL LoRAs into one LoRA.

    python networks/sdxl_merge_lora.py --sd_model MODEL --models a.safetensors --ratios 0.8 --save_to OUT
    python networks/sdxl_merge_lora.py --models a.safetensors b.safetensors --lbws "[1,0,...]" "[...]" --save_to OUT

As networks/merge_lora.py, plus --lbws per-block weights. U-Net modules with SGM or diffusers names
both merge (an SDXL LoRA is never skipped silently). See docs/lora-tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def setup_parser():
    from networks.lora_merging import build_parser

    return build_parser(sdxl=True, description=__doc__)


def main(argv=None):
    from networks.lora_merging import main as merge

    merge(setup_parser().parse_args(argv), sdxl=True)


if __name__ == "__main__":
    run(main)
