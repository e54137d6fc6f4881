"""Merge any number of LoRAs of any ranks in weight space and re-factor the sum to a new rank by SVD.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \\
        --new_rank 16 [--new_conv_rank 8] --save_to merged.safetensors [--device cuda]

Each module's ΔW = Σ ratio · alpha/rank · up·down, then its best rank-k factors (k = --new_rank, or
--new_conv_rank for 3x3 convs; alpha = k). See docs/lora-tools.md.
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
    p.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype written (default: --precision)")
    p.add_argument("--precision", choices=PRECISIONS, default="float",
                   help="dtype the summed ΔW is accumulated in (the SVD itself always runs in float32)")
    p.add_argument("--save_to", type=str, default=None, help="output LoRA (.safetensors, .ckpt, .pt)")
    p.add_argument("--models", type=str, nargs="*", default=None, help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per model (default 1 each)")
    p.add_argument("--lbws", type=str, nargs="*", default=None,
                   help="per-block weights, one JSON list per model: 26 or 17 values (SD1/SD2), 20 or 12 (SDXL)")
    p.add_argument("--no_metadata", action="store_true", help="do not write ModelSpec metadata")
    p.add_argument("--new_rank", type=int, default=4, help="rank of Linear and 1x1-conv modules (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3-conv modules (default --new_rank)")
    p.add_argument("--device", type=str, default=None, help="where the SVDs run, e.g. cuda (default CPU)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from networks import lora_files
    from networks.lora_merging import block_weights
    from networks.lora_svd_merge import svd_merge

    if not args.models:
        raise UserError("--models: give at least one LoRA file")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank / --new_conv_rank: must be at least 1")
    ratios = lora_files.ratios_for(args.models, args.ratios)
    save_to = lora_files.check_output(args.save_to, args.models)
    device = lora_files.resolve_device(args.device)
    precision = lora_files.precision(args.precision)
    files = [lora_files.read_lora(path) for path in args.models]
    family, v_param = lora_files.lora_family(files)
    weights = block_weights(args, files, family.is_sdxl)
    tensors = svd_merge(files, ratios, args.new_rank, args.new_conv_rank, weights, precision, device)
    save_dtype = lora_files.precision(args.save_precision, precision)
    lora_files.save_tool_lora(save_to, tensors, save_dtype, files, family, v_param, args.no_metadata,
                              merged_from=[f.title for f in files])
    print(f"saved {save_to}")


if __name__ == "__main__":
    run(main)
