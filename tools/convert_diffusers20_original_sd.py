"""Convert a Stable Diffusion model between single-file checkpoints and diffusers folders.

    python tools/convert_diffusers20_original_sd.py [flags] MODEL_TO_LOAD MODEL_TO_SAVE

MODEL_TO_SAVE with an extension (.safetensors / .ckpt) is written as a single file in the original
layout; without one, as a diffusers folder. The family (SD1.x, SD2.x, SDXL) is read from the input.
"""

import argparse
import ast
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v1", action="store_true", help="assert the model is SD1.x (detected from the input anyway)")
    p.add_argument("--v2", action="store_true", help="assert the model is SD2.x (detected from the input anyway)")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="assert the U-Net's transformer projections are Linear (SD2.x); they are read from the weights, "
                   "and a model with 1x1-convolution projections (SD1.x) is refused")
    p.add_argument("--fp16", action="store_true", help="load as fp16 and save as fp16 (unless --save_precision_as)")
    p.add_argument("--bf16", action="store_true", help="load as bf16 and save as bf16 (unless --save_precision_as)")
    p.add_argument("--float", action="store_true", help="load as float32 and save as float32 (unless --save_precision_as)")
    p.add_argument("--save_precision_as", choices=["fp16", "bf16", "float"], default=None,
                   help="precision of the saved weights (default: as loaded)")
    p.add_argument("--epoch", type=int, default=0, help="epoch written into a .ckpt (added to the source's)")
    p.add_argument("--global_step", type=int, default=0, help="global_step written into a .ckpt (added to the source's)")
    p.add_argument("--metadata", type=str, default=None,
                   help='extra safetensors metadata as a dict literal, e.g. "{\'modelspec.author\': \'me\'}" (parsed as data, never run)')
    p.add_argument("--variant", type=str, default=None, help="diffusers weight variant to read, e.g. fp16")
    p.add_argument("--reference_model", type=str, default=None,
                   help="diffusers output: copy the scheduler and tokenizer folders of this local diffusers model "
                   "(default: built offline for the model's family)")
    p.add_argument("--use_safetensors", action="store_true",
                   help="diffusers output: store weights as .safetensors (default .bin, as sd-scripts)")
    p.add_argument("--sdxl", action="store_true", help="assert the model is SDXL (detected from the input anyway)")
    p.add_argument("model_to_load", help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("model_to_save", help="output: .safetensors/.ckpt file, or a folder path without extension for diffusers")
    return p


def parse_metadata(text):
    if text is None:
        return {}
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--metadata: not a dict literal: {text!r}") from None
    if not isinstance(value, dict):
        raise UserError("--metadata: must be a dict literal like {'key': 'value'}")
    return {str(k): str(v) for k, v in value.items()}


REFERENCE_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2")


def check_reference_model(path, fmt) -> None:
    """--reference_model: a local diffusers folder, and only for diffusers output (sd-scripts' use of it)."""
    if path is None:
        return
    if not fmt.startswith("diffusers"):
        raise UserError("--reference_model only applies when saving a diffusers folder (a path without extension)")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UserError(f"--reference_model {path}: not a local diffusers folder (no model_index.json); models are "
                        "never downloaded: pass the folder of a downloaded diffusers model")


def copy_reference_configs(reference: str, out: str) -> None:
    """Replace the written scheduler/tokenizer folders by the reference model's, folder by folder, atomically."""
    from library.models.atomic_writes import atomic_folder

    for name in REFERENCE_FOLDERS:
        source, target = os.path.join(reference, name), os.path.join(out, name)
        if not os.path.isdir(source) or not os.path.isdir(target):
            continue
        with atomic_folder(target) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        print(f"  {name}/ from {reference}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if sum([args.fp16, args.bf16, args.float]) > 1:
        raise UserError("choose at most one of --fp16, --bf16, --float")
    if sum([args.v1, args.v2, args.sdxl]) > 1:
        raise UserError("choose at most one of --v1, --v2, --sdxl")
    metadata = parse_metadata(args.metadata)

    import torch

    from library.models.loading import load_models
    from library.models.saving import PRECISIONS, format_for_path, save_models

    load_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32 if args.float else None
    save_dtype = PRECISIONS[args.save_precision_as] if args.save_precision_as else load_dtype
    v2 = True if args.v2 else False if args.v1 else None
    sdxl = True if args.sdxl else False if (args.v1 or args.v2) else None
    fmt = format_for_path(args.model_to_save)
    if fmt == "diffusers" and args.use_safetensors:
        fmt = "diffusers_safetensors"
    check_reference_model(args.reference_model, fmt)

    print(f"loading {args.model_to_load}")
    models = load_models(args.model_to_load, v2=v2, sdxl=sdxl, dtype=load_dtype, variant=args.variant, keep_ema=True)
    print(f"  {models.family.title}{' (v-prediction)' if models.v_parameterization else ''}")
    if args.unet_use_linear_projection and not models.unet.config.use_linear_projection:
        raise UserError(f"--unet_use_linear_projection: {args.model_to_load} has 1x1-convolution projections "
                        f"({models.family.title} layout); remove the flag")
    save_models(models, args.model_to_save, fmt, precision=save_dtype, metadata=metadata,
                epoch=args.epoch, global_step=args.global_step)
    if args.reference_model:
        copy_reference_configs(args.reference_model, args.model_to_save)
    print(f"saved {args.model_to_save} ({fmt})")


if __name__ == "__main__":
    run(main)
