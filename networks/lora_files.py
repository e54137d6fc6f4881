"""LoRA files for the LoRA tools (merge, SVD merge, resize, extract): reading with one-line errors,
telling a file's model family, writing with the metadata and hashes the web UIs read.

* `read_lora`: a .safetensors or pickled LoRA (or LyCORIS) file; a model checkpoint or anything else
  passed by mistake is named as such.
* `lora_family`: SD1 / SD2 / SDXL and v-prediction from the file's `ss_*` and `modelspec.*` metadata,
  else from its module names (`lora_te1_`, SGM U-Net names ⇒ SDXL) and layer widths.
* `tool_metadata`: the minimum `ss_*` set (spec tools-and-tagging.md §1) with dim/alpha read from
  the tensors written, plus ModelSpec with the right architecture (`merged_from` the inputs' titles).
* `save_lora`: cast, hash the bytes that are written (`sshs_*` after the cast), write atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from library.errors import UserError
from library.models import checkpoint_io, detect, modelspec, safetensors_io
from library.models.families import FAMILIES, ModelFamily
from library.models.network_deltas import group_modules
from library.training import lora_metadata

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_CHOICES = ("float", "fp16", "bf16")


def precision(name: Optional[str], default: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """float/fp16/bf16 -> dtype; None -> `default`."""
    return default if name is None else PRECISIONS[name]


def title_of(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


@dataclass
class LoraFile:
    path: str
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.metadata.get("modelspec.title") or title_of(self.path)

    @property
    def modules(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return group_modules(self.tensors)


def read_lora(path: str, dtype: Optional[torch.dtype] = None) -> LoraFile:
    """A network file's tensors (floating ones in `dtype` when given) and metadata."""
    ckpt = checkpoint_io.read_checkpoint(path, dtype=dtype)
    kind = detect.classify_keys(ckpt.tensors)
    if kind in ("sd1", "sd2", "sdxl"):
        raise UserError(f"{path}: is a model checkpoint, not a LoRA file")
    if kind in ("embedding", "lllite", "vae"):
        raise UserError(f"{path}: is a {'VAE' if kind == 'vae' else kind} file, not a LoRA file")
    if not group_modules(ckpt.tensors):
        raise UserError(f"{path}: holds no network modules (`<module>.<tensor>` keys); not a LoRA file")
    return LoraFile(path, ckpt.tensors, ckpt.metadata)


# ----------------------------------------------------------------------------------------------
# family


def _cross_attention_width(tensors: Dict[str, torch.Tensor]) -> Optional[int]:
    for key, value in tensors.items():
        if "attn2_to_k" in key and key.endswith("lora_down.weight"):
            return int(value.shape[1])
    return None


def lora_family(files: Sequence[LoraFile]) -> Tuple[ModelFamily, bool]:
    """(family, v-prediction) of LoRA files: the first one whose metadata says, else the keys."""
    for f in files:
        version = f.metadata.get("ss_base_model_version", "")
        arch = f.metadata.get("modelspec.architecture", "")
        v = version.endswith("_v") or f.metadata.get("modelspec.prediction_type") == "v" or "768-v" in arch
        if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
            return FAMILIES["sdxl"], False
        if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or f.metadata.get("ss_v2") == "True":
            return FAMILIES["sd2"], v
        if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
            return FAMILIES["sd1"], False
    for f in files:
        keys = list(f.tensors)
        if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys) or any(
                k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
                for k in keys):
            return FAMILIES["sdxl"], False
        width = _cross_attention_width(f.tensors)
        if width in (1024, 2048):
            return FAMILIES["sd2" if width == 1024 else "sdxl"], False
    return FAMILIES["sd1"], False


# ----------------------------------------------------------------------------------------------
# metadata and saving


def _format(values: set, as_alpha: bool) -> Optional[str]:
    if not values:
        return None
    if len(values) > 1:
        return "Dynamic"
    value = values.pop()
    return str(int(value)) if as_alpha and float(value).is_integer() else str(value)


def rank_summary(tensors: Dict[str, torch.Tensor]) -> Tuple[str, str, Optional[str], Optional[str]]:
    """(`ss_network_dim`, `ss_network_alpha`, conv_dim, conv_alpha) of the tensors to be written:
    k×k conv modules apart (they are `conv_dim` in `ss_network_args`); "Dynamic" where modules differ."""
    dims, alphas, conv_dims, conv_alphas = set(), set(), set(), set()
    for parts in group_modules(tensors).values():
        down = parts.get("lora_down.weight")
        if down is None:
            continue
        rank = int(down.shape[0])
        alpha = parts.get("alpha")
        alpha = float(alpha) if alpha is not None and float(alpha) != 0 else float(rank)
        kxk = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
        (conv_dims if kxk else dims).add(rank)
        (conv_alphas if kxk else alphas).add(alpha)
    if not dims:  # a conv-only file
        dims, alphas = set(conv_dims), set(conv_alphas)
    return (_format(dims, False) or "None", _format(alphas, True) or "None",
            _format(conv_dims, False), _format(conv_alphas, True))


def network_args_of(tensors: Dict[str, torch.Tensor]) -> Optional[Dict[str, str]]:
    """`ss_network_args` conv_dim/conv_alpha of the k×k conv modules written (None when there are none)."""
    _, _, conv_dim, conv_alpha = rank_summary(tensors)
    return None if conv_dim is None else {"conv_dim": conv_dim, "conv_alpha": conv_alpha}


def tool_metadata(tensors: Dict[str, torch.Tensor], inputs: Sequence[LoraFile], family: ModelFamily,
                  v_parameterization: bool, save_to: str, no_metadata: bool,
                  network_args: Optional[Dict[str, str]] = None, merged_from: Optional[Iterable[str]] = None
                  ) -> Dict[str, str]:
    """Minimum `ss_*` set for a LoRA written by a tool, plus ModelSpec unless `no_metadata`."""
    dim, alpha, _, _ = rank_summary(tensors)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha,
            "ss_v2": str(family.name == "sd2"),
            "ss_base_model_version": lora_metadata.base_model_version(family, v_parameterization)}
    args = network_args if network_args is not None else network_args_of(tensors)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    if not no_metadata:
        extra = {"merged_from": ", ".join(merged_from)} if merged_from else None
        meta.update(modelspec.build_metadata(family, v_parameterization, title_of(save_to), kind="lora", extra=extra))
    return meta


def cast_tensors(tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Floating tensors in `dtype` (None: as they are), contiguous, on the CPU."""
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def save_lora(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]],
              dtype: Optional[torch.dtype] = None) -> None:
    """Write a LoRA file atomically: .safetensors with metadata and the sshs hashes of the bytes
    written (computed after the cast), any other extension a pickled state dict (no metadata)."""
    tensors = cast_tensors(tensors, dtype)
    if os.path.splitext(path)[1].lower() == ".safetensors":
        metadata = {k: str(v) for k, v in (metadata or {}).items()}
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = lora_metadata.sshs_hashes(tensors, metadata)
        order = lora_metadata.safetensors_order(tensors)
        safetensors_io.save_tensors({k: tensors[k] for k in order}, path, metadata)
    else:
        checkpoint_io.save_pickle_checkpoint(tensors, path)


def save_tool_lora(path: str, tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype],
                   inputs: Sequence[LoraFile], family: ModelFamily, v_parameterization: bool, no_metadata: bool,
                   merged_from: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Save a LoRA a tool made: cast to `dtype` first, so the metadata (`tool_metadata`) describes the
    tensors as written (an alpha rounded to fp16, say). Returns the tensors written."""
    tensors = cast_tensors(tensors, dtype)
    meta = tool_metadata(tensors, inputs, family, v_parameterization, path, no_metadata, merged_from=merged_from)
    save_lora(path, tensors, meta, dtype)
    return tensors


def check_output(path: Optional[str], inputs: Sequence[str] = (), flag: str = "--save_to",
                 extensions: Sequence[str] = (".safetensors", ".ckpt", ".pt", ".pth")) -> str:
    """The output path, checked before any work: given, a known extension, not one of the inputs."""
    if not path:
        raise UserError(f"{flag} is required: the file to write")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise UserError(f"{flag} {path}: use one of the extensions {', '.join(extensions)}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder")
    for src in inputs:
        if src and os.path.exists(src) and os.path.abspath(src) == os.path.abspath(path):
            raise UserError(f"{flag} {path}: would overwrite an input file; choose another name")
    return path


def ratios_for(models: List[str], ratios: Optional[List[float]], flag: str = "--ratios") -> List[float]:
    """One ratio per model (1.0 each when not given)."""
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"{flag}: {len(ratios)} values for {len(models)} models; give one per --models file")
    return list(ratios)


def resolve_device(name: Optional[str], flag: str = "--device") -> torch.device:
    """`--device` (None: the CPU), checked before any work."""
    if not name:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine; leave {flag} out to use the CPU")
    return device
