"""Extract a LoRA approximating the difference between a fine-tuned checkpoint and its original.

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to diff.safetensors --dim 32 [--conv_dim 16] [--device cuda]

The family (SD1, SD2, SDXL) is read from the files; weights are read one layer at a time, so memory
holds two layers, not two models. See docs/lora-tools.md.
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
    p.add_argument("--v2", action="store_true", help="assert the models are SD2.x (read from the files anyway)")
    p.add_argument("--v_parameterization", action="store_true", default=None,
                   help="mark the LoRA as for a v-prediction model (default: with --v2)")
    p.add_argument("--sdxl", action="store_true", help="assert the models are SDXL (read from the files anyway)")
    p.add_argument("--load_precision", choices=PRECISIONS, default=None,
                   help="dtype both weights are cast to before the difference (default: difference in float32)")
    p.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype written (default float)")
    p.add_argument("--model_org", type=str, required=True, help="the original (base) checkpoint")
    p.add_argument("--model_tuned", type=str, required=True, help="the fine-tuned checkpoint: LoRA = tuned - original")
    p.add_argument("--save_to", type=str, required=True, help="output LoRA (.safetensors, .ckpt, .pt)")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear and 1x1-conv modules (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="also extract the ResNet/Down/Upsample layers, 3x3 convs at this rank (C3Lier)")
    p.add_argument("--device", type=str, default=None, help="where the SVDs run, e.g. cuda (default CPU)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clip both factors at this quantile of their values (1: no clipping; default 0.99)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="keep the text encoder(s) only if some weight changed by more than this (default 0.01)")
    p.add_argument("--no_metadata", action="store_true", help="do not write ModelSpec metadata")
    p.add_argument("--load_original_model_to", type=str, default=None,
                   help="device the original's weights are read to before the difference (default cpu)")
    p.add_argument("--load_tuned_model_to", type=str, default=None,
                   help="device the tuned weights are read to before the difference (default cpu)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from library.models.checkpoint_io import TensorSource
    from library.models.loading import resolve_family
    from library.models.network_targets import checkpoint_family
    from networks import lora_files
    from networks.lora_extraction import extract

    if args.v2 and args.sdxl:
        raise UserError("--v2 and --sdxl exclude each other")
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise UserError("--dim / --conv_dim: must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    save_to = lora_files.check_output(args.save_to, [args.model_org, args.model_tuned])
    devices = [lora_files.resolve_device(d, f) for d, f in ((args.device, "--device"),
               (args.load_original_model_to, "--load_original_model_to"),
               (args.load_tuned_model_to, "--load_tuned_model_to"))]
    with TensorSource(args.model_org) as org, TensorSource(args.model_tuned) as tuned:
        family = checkpoint_family(org.path, org.names)
        family = resolve_family(family.name, org.path, v2=True if args.v2 else None, sdxl=True if args.sdxl else None)
        tuned_family = checkpoint_family(tuned.path, tuned.names)
        if tuned_family.name != family.name:
            raise UserError(f"{tuned.path}: is a {tuned_family.title} model, {org.path} a {family.title} model")
        tensors = extract(org, tuned, family, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff,
                          lora_files.precision(args.load_precision), *devices)
    v_param = args.v2 if args.v_parameterization is None else args.v_parameterization
    save_dtype = lora_files.precision(args.save_precision, lora_files.PRECISIONS["float"])
    tensors = lora_files.save_tool_lora(save_to, tensors, save_dtype, [], family, bool(v_param), args.no_metadata)
    print(f"saved {save_to}: {len(tensors) // 3} modules")


if __name__ == "__main__":
    run(main)
