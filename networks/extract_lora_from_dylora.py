"""Cut a DyLoRA file into plain LoRA files of ranks unit, 2·unit, ... below its full rank.

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to cut.safetensors --unit 4

Writes `cut-0004.safetensors`, `cut-0008.safetensors`, ...: every module's leading r ranks
(`lora_down[:r]`, `lora_up[:, :r]`) with its alpha unchanged, which is what a DyLoRA trained here
computes at rank r. Files are written one at a time, each with its own hashes. See docs/lora-tools.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.errors import UserError  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_to", type=str, default=None, help="output name; the rank is appended (NAME-0004.ext)")
    p.add_argument("--model", type=str, default=None, help="DyLoRA file")
    p.add_argument("--unit", type=int, default=None, help="rank step of the cut (the DyLoRA's unit or a multiple)")
    return p


def split_tensors(tensors, rank: int):
    """Every module cut to its leading `rank` ranks; other tensors (alpha) as they are."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("lora_down.weight"):
            value = value[:rank]
        elif key.endswith("lora_up.weight"):
            value = value[:, :rank]
        out[key] = value.contiguous()
    return out


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from networks import lora_files

    if not args.model:
        raise UserError("--model: the DyLoRA file is required")
    if args.unit is None or args.unit < 1:
        raise UserError("--unit: the rank step is required (a positive integer, e.g. the DyLoRA's unit)")
    base = lora_files.check_output(args.save_to, [args.model])
    source = lora_files.read_lora(args.model)
    downs = [v for k, v in source.tensors.items() if k.endswith("lora_down.weight")]
    if not downs:
        raise UserError(f"{args.model}: no lora_down/lora_up modules; not a DyLoRA file")
    max_rank = max(int(v.shape[0]) for v in downs)
    ranks = list(range(args.unit, max_rank, args.unit))
    if not ranks:
        raise UserError(f"--unit {args.unit}: the file's rank is {max_rank}; the unit must be below it")
    stem, ext = os.path.splitext(base)
    comment = source.metadata.get("ss_training_comment", "")
    for rank in ranks:
        tensors = split_tensors(source.tensors, rank)
        meta = {k: v for k, v in source.metadata.items() if not k.startswith("sshs_")}
        note = f"split from DyLoRA, rank {max_rank} to {rank}"
        meta["ss_training_comment"] = f"{note}; {comment}" if comment else note
        meta["ss_network_dim"] = str(rank)
        if "modelspec.title" in meta:
            meta["modelspec.title"] = f"{lora_files.title_of(stem)}-{rank:04d}"
        path = f"{stem}-{rank:04d}{ext}"
        lora_files.save_lora(path, tensors, meta)
        print(f"saved {path} (rank {rank})")


if __name__ == "__main__":
    run(main)
