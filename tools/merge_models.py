"""Merge checkpoints by a weighted sum of their weights.

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.7 0.3 --output merged.safetensors

Each tensor of the first model becomes Σ ratio · tensor (ratios default to 1/N each, not
normalised); with --unet_only the VAE and text encoders are taken from the first model. Tensors are
read, summed and written one at a time. See docs/lora-tools.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.errors import UserError  # noqa: E402

PRECISIONS = ("float", "fp16", "bf16")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=str, required=True, help="checkpoints to merge (.safetensors or .ckpt)")
    p.add_argument("--output", type=str, required=True, help="output file (.safetensors is appended if missing)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one weight per model (default 1/N each)")
    p.add_argument("--unet_only", action="store_true", help="merge only the U-Net; VAE and text encoders from the first")
    p.add_argument("--device", type=str, default="cpu", help="device the sums are computed on (default cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="float", help="dtype of the sums (default float)")
    p.add_argument("--saving_precision", choices=PRECISIONS, default="float", help="dtype written (default float)")
    p.add_argument("--show_skipped", action="store_true", help="list the keys of later models that the first lacks")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from library.models import checkpoint_io, detect, modelspec
    from library.models.checkpoint_sum import weighted_sum
    from library.models.families import get_family
    from networks.lora_files import PRECISIONS as DTYPES, resolve_device, title_of

    ratios = args.ratios if args.ratios is not None else [1.0 / len(args.models)] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios: {len(ratios)} values for {len(args.models)} models; give one per model")
    output = args.output if args.output.endswith(".safetensors") else args.output + ".safetensors"
    for path in args.models:
        if os.path.abspath(path) == os.path.abspath(output):
            raise UserError(f"--output {output}: would overwrite an input model; choose another name")
    device = resolve_device(args.device)
    first = checkpoint_io.read_checkpoint(args.models[0], select=lambda k: False)  # header only
    kind = detect.classify_keys(checkpoint_io.read_keys(args.models[0]))
    metadata = None
    if kind in ("sd1", "sd2", "sdxl"):
        v_param = modelspec.prediction_is_v(first.metadata)
        merged_from = ", ".join(title_of(p) for p in args.models)
        metadata = modelspec.build_metadata(get_family(kind), bool(v_param), title_of(output),
                                            extra={"merged_from": merged_from})
        if v_param is None:
            metadata.pop("modelspec.prediction_type")  # not known from the weights
    n = weighted_sum(args.models, ratios, output, DTYPES[args.precision], DTYPES[args.saving_precision],
                     args.unet_only, device, metadata, args.show_skipped)
    print(f"saved {output}: {n} tensors")


if __name__ == "__main__":
    run(main)
