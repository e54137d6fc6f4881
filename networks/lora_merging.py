"""merge_lora.py and sdxl_merge_lora.py: LoRA/LyCORIS files into a checkpoint, or LoRAs into one LoRA.

Into a checkpoint (`--sd_model`): a single file is streamed tensor by tensor
(`library.models.network_merge.merge_into_checkpoint`: one tensor in memory, never a model); a
diffusers folder, or a diffusers folder as output, goes through the loaded models. Either way each
module's change is `ratio · block weight · alpha/r · ΔW` from `library.models.network_deltas` (LoRA,
C3Lier, DyLoRA, LoRA-FA, LoCon, LoHa, LoKr, DoRA), and a module that matches no layer is an error.
Without `--sd_model` the LoRAs are combined into one (`networks.lora_combine`).
"""

from __future__ import annotations

import argparse
import logging
import os

from library.errors import UserError

logger = logging.getLogger(__name__)
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", "")
PRECISIONS = ("float", "fp16", "bf16")


def build_parser(sdxl: bool, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if not sdxl:
        p.add_argument("--v2", action="store_true",
                       help="assert --sd_model is SD2.x (the family is read from the file; a checkpoint without "
                            "its own prediction type is then marked v-prediction, as sd-scripts does)")
    p.add_argument("--save_precision", choices=PRECISIONS, default=None,
                   help="dtype written (default: a checkpoint keeps each tensor's dtype, a LoRA is written in "
                        "--precision)")
    p.add_argument("--precision", choices=PRECISIONS, default="float",
                   help="dtype weights are held in while merging: each merged weight is rounded to it after every "
                        "file (default float)")
    p.add_argument("--sd_model", type=str, default=None,
                   help="checkpoint (single file or diffusers folder) to merge into; omit to merge the LoRAs into "
                        "one LoRA")
    p.add_argument("--save_to", type=str, default=None,
                   help="output: .safetensors/.ckpt (a folder path without extension: diffusers, with --sd_model)")
    p.add_argument("--models", type=str, nargs="*", default=None, help="LoRA (or LyCORIS) files, merged in order")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per model (default 1 each)")
    if sdxl:
        p.add_argument("--lbws", type=str, nargs="*", default=None,
                       help="per-block weights, one JSON list per model: 20 values (BASE, IN00-08, MID, OUT00-08) or "
                            "12 (BASE, IN04/05/07/08, MID, OUT00-05); BASE is the text encoders")
    p.add_argument("--no_metadata", action="store_true", help="do not write ModelSpec metadata (a LoRA keeps the "
                   "minimum ss_* set and hashes)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA mode: put the inputs' ranks side by side (exact sum of the changes, rank = sum of ranks)")
    p.add_argument("--shuffle", action="store_true", help="LoRA mode: permute the ranks of every module")
    return p


def block_weights(args, files, is_sdxl: bool):
    from networks import lora_block_weights

    lbws = getattr(args, "lbws", None)
    if not lbws:
        return [None] * len(files)
    if len(lbws) != len(files):
        raise UserError(f"--lbws: {len(lbws)} lists for {len(files)} models; give one per --models file")
    return [lora_block_weights.module_weight(text, is_sdxl, f.path) for text, f in zip(lbws, files)]


def main(args, sdxl: bool) -> None:
    from networks import lora_files

    if not args.models:
        raise UserError("--models: give at least one LoRA file")
    ratios = lora_files.ratios_for(args.models, args.ratios)
    if args.sd_model:
        for flag in ("concat", "shuffle"):
            if getattr(args, flag):
                raise UserError(f"--{flag} is for merging LoRAs into one LoRA; it does nothing with --sd_model")
        save_to = lora_files.check_output(args.save_to, [args.sd_model, *args.models],
                                          extensions=CHECKPOINT_EXTENSIONS)
    else:
        save_to = lora_files.check_output(args.save_to, args.models)
    precision = lora_files.precision(args.precision)
    files = [lora_files.read_lora(path) for path in args.models]
    if args.sd_model:
        _into_checkpoint(args, sdxl, files, ratios, precision, save_to)
    else:
        _into_lora(args, sdxl, files, ratios, precision, save_to)
    print(f"saved {save_to}")


def _into_lora(args, sdxl: bool, files, ratios, precision, save_to: str) -> None:
    import torch

    from library.models.families import FAMILIES
    from networks import lora_files
    from networks.lora_combine import combine

    family, v_param = lora_files.lora_family(files)
    if sdxl:
        family, v_param = FAMILIES["sdxl"], False
    weights = block_weights(args, files, family.is_sdxl)
    generator = torch.Generator().manual_seed(0) if args.shuffle else None
    tensors = combine(files, ratios, args.concat, args.shuffle, weights, precision, generator)
    save_dtype = lora_files.precision(args.save_precision, precision)
    lora_files.save_tool_lora(save_to, tensors, save_dtype, files, family, v_param, args.no_metadata,
                              merged_from=[f.title for f in files])


def _into_checkpoint(args, sdxl: bool, files, ratios, precision, save_to: str) -> None:
    from library.models import checkpoint_io, modelspec, network_merge, network_targets, safetensors_io
    from library.models.loading import resolve_family
    from networks import lora_files

    src = args.sd_model
    v2 = True if getattr(args, "v2", False) else None
    merged_from = [lora_files.title_of(src)] + [f.title for f in files]
    save_dtype = lora_files.precision(args.save_precision)
    streamed = os.path.isfile(src) and os.path.splitext(save_to)[1] != ""
    if streamed:
        family = network_targets.checkpoint_family(src, checkpoint_io.read_keys(src))
        family = resolve_family(family.name, src, v2=v2, sdxl=True if sdxl else None)
        is_safetensors = checkpoint_io.sniff_format(src) == "safetensors"
        source_meta = safetensors_io.read_metadata(src) if is_safetensors else {}
        v_param = modelspec.prediction_is_v(source_meta)
        v_param = bool(v2) if v_param is None else v_param
        weights = block_weights(args, files, family.is_sdxl)
        networks = [network_merge.NetworkToMerge(f.path, f.modules, r, w) for f, r, w in zip(files, ratios, weights)]
        meta = None if args.no_metadata else modelspec.build_metadata(
            family, v_param, lora_files.title_of(save_to), extra={"merged_from": ", ".join(merged_from)})
        network_merge.merge_into_checkpoint(src, save_to, networks, precision, save_dtype, meta)
        return
    from library.models.loading import load_models
    from library.models.saving import save_models

    models = load_models(src, v2=v2, v_parameterization=True if v2 else None, sdxl=True if sdxl else None)
    weights = block_weights(args, files, models.family.is_sdxl)
    for f, ratio, weight in zip(files, ratios, weights):
        network_merge.merge_into_models(f.tensors, models.text_encoders, models.unet, ratio, f.path,
                                        models.family.title, weight, precision)
    if os.path.splitext(save_to)[1].lower() == ".safetensors" and args.no_metadata:
        from library.models.saving import original_state_dict

        tensors = lora_files.cast_tensors(original_state_dict(models), save_dtype)
        safetensors_io.save_tensors(tensors, save_to, None)  # --no_metadata: no ModelSpec either
        return
    save_models(models, save_to, precision=save_dtype, metadata={"modelspec.merged_from": ", ".join(merged_from)})
