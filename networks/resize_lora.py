"""Change the rank of a LoRA by SVD: to a fixed rank, or per module by a dynamic rule.

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 32
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 64 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module keeps its best rank-k approximation and alpha = old scale · k, so its strength is
unchanged. Dynamic rules pick per module the smallest k (at most --new_rank) that keeps singular
values above S0/param (sv_ratio), a share of their sum (sv_cumulative) or of the Frobenius norm
(sv_fro). See docs/lora-tools.md.
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
    p.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype written (default float)")
    p.add_argument("--new_rank", type=int, default=4, help="rank (fixed) or rank cap (dynamic) of Linear and 1x1 "
                   "modules (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="the same for 3x3-conv modules (default --new_rank)")
    p.add_argument("--save_to", type=str, default=None, help="output (.safetensors, .ckpt, .pt, .pth)")
    p.add_argument("--model", type=str, default=None, help="LoRA to resize")
    p.add_argument("--device", type=str, default=None, help="where the SVDs run, e.g. cuda (default CPU)")
    p.add_argument("--verbose", action="store_true", help="print what each module keeps")
    p.add_argument("--dynamic_method", type=str, default=None, choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                   help="choose each module's rank: sv_ratio (largest/kept singular value <= param), sv_cumulative "
                        "(share of the singular values' sum >= param), sv_fro (share of the Frobenius norm >= param)")
    p.add_argument("--dynamic_param", type=float, default=None, help="the rule's value (e.g. 4 for sv_ratio, 0.9 for "
                   "sv_fro / sv_cumulative)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from networks import lora_files
    from networks.lora_resizing import check_rule, resize, resized_metadata

    if not args.model:
        raise UserError("--model: the LoRA file to resize is required")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank / --new_conv_rank: must be at least 1")
    method, param = check_rule(args.dynamic_method, args.dynamic_param)
    save_to = lora_files.check_output(args.save_to, [args.model])
    device = lora_files.resolve_device(args.device)
    source = lora_files.read_lora(args.model)
    result = resize(source.tensors, args.model, args.new_rank, args.new_conv_rank, method, param, device,
                    args.verbose)
    save_dtype = lora_files.precision(args.save_precision, lora_files.PRECISIONS["float"])
    tensors = lora_files.cast_tensors(result.tensors, save_dtype)
    meta = resized_metadata(source, tensors, save_to, args.new_rank, args.new_conv_rank, method, param,
                            result.old_max_rank)
    lora_files.save_lora(save_to, tensors, meta, save_dtype)
    print(f"saved {save_to}")


if __name__ == "__main__":
    run(main)
