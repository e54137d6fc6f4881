"""Generate images with SD1.x / SD2.x / SDXL models, as sd-scripts' gen_img.py.

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry --d 42" \
        --steps 30 --sampler euler_a [--network_module networks.lora --network_weights my_lora.safetensors]

The model family is read from the file. Prompts can carry options (`--n`, `--w`, `--h`, `--s`, `--d`,
`--l`, `--nl`, `--t`, `--am`, ...); see docs/generation.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    from library.generation.args import build_parser

    args = build_parser(sdxl_only=False, description=__doc__).parse_args(argv)
    from library.generation.run import run_from_args

    return run_from_args(args)


if __name__ == "__main__":
    run(main)
