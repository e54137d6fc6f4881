"""Write a seeded random Stable Diffusion model of any family, at tiny or full size.

    python tools/make_random_model.py --family sd1 --size tiny OUTPUT

OUTPUT with .safetensors / .ckpt is a single file in the original layout, without extension a
diffusers folder. Tiny models keep the real key structure with small widths: they are the embedded
default model of the demo and the tests. Full-size ones are for benchmarks.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402

FAMILY_CHOICES = ("sd1", "sd2", "sd2-v", "sdxl")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILY_CHOICES, default="sd1",
                   help="sd1, sd2 (512 epsilon), sd2-v (768 v-prediction) or sdxl")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny widths or the real model's")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights)")
    p.add_argument("--precision", choices=("float", "fp16", "bf16"), default="float", help="weight precision")
    p.add_argument("--format", choices=("ckpt", "safetensors", "diffusers", "diffusers_safetensors"), default=None,
                   help="output format (default: from OUTPUT's extension)")
    p.add_argument("output", help="output file (.safetensors/.ckpt) or folder")
    args = p.parse_args(argv)

    from library.models.families import get_family
    from library.models.saving import PRECISIONS, save_models
    from library.models.random_models import build_random_models

    family = get_family(args.family.split("-")[0])
    models = build_random_models(family, args.size, args.seed, PRECISIONS[args.precision],
                                 v_parameterization=args.family == "sd2-v")
    fmt = save_models(models, args.output, args.format, metadata={"modelspec.title": f"random {args.family} {args.size}"})
    print(f"wrote {args.output}: random {family.title} ({args.size}, seed {args.seed}, {args.precision}, {fmt})")


if __name__ == "__main__":
    run(main)
