"""Generate images with SD1.x / SD2.x models under sd-scripts' older name for its generator.

    python gen_img_diffusers.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry" --steps 30

Guides and scripts written for sd-scripts' gen_img_diffusers.py run unchanged: this is gen_img.py
(same options, same images for the same seed; SDXL models work too). See docs/generation.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library.cli import run  # noqa: E402


def main(argv=None):
    import gen_img

    return gen_img.main(argv)


if __name__ == "__main__":
    run(main)
