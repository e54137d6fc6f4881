"""Generate images with SDXL models, as sd-scripts' sdxl_gen_img.py (gen_img.py also takes SDXL).

    python sdxl_gen_img.py --ckpt sdxl.safetensors --outdir out --prompt "a cat --n blurry --w 1024 --h 768" \
        --original_width 2048 --original_height 1536 --steps 30 --sampler euler_a

A model of another family is refused; see docs/generation.md for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.generation.args import build_parser

    args = build_parser(sdxl_only=True, description=__doc__).parse_args(argv)
    from library.generation.run import run_from_args

    return run_from_args(args, sdxl=True)


if __name__ == "__main__":
    run(main)
