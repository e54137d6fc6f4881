"""LoRA + LoRA into one LoRA by combining factors (merge_lora.py / sdxl_merge_lora.py without --sd_model).

For each module, with `c_i = ratio_i · block weight_i · scale_i / scale_out` (scale = alpha/rank):

* sum (equal ranks): `down = Σ sign(c_i)·√|c_i|·down_i`, `up = Σ √|c_i|·up_i`, alpha of the first
  file having the module. Each input's own term is exactly `ratio_i·ΔW_i` (sd-scripts scales both
  factors by the ratio, giving ratio·|ratio|), but summing factors also adds the cross terms
  `up_i·down_j`: the result is not the sum of the changes. `--concat` or svd_merge_lora.py give that.
* `--concat`: the factors side by side (rank Σ r_i), `alpha = Σ r_i · scale_out`: the change is
  exactly `Σ ratio_i·ΔW_i` (sd-scripts dilutes each input by its rank share).
* `--shuffle`: one random permutation of the ranks of every module; the product is unchanged.

Only plain LoRA modules (`lora_down`/`lora_up`/`alpha`: LierLa, C3Lier, DyLoRA, LoRA-FA files) can
be combined this way; LyCORIS forms are refused with a pointer to svd_merge_lora.py.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from library.errors import UserError
from library.models.network_deltas import fit_shape
from networks.lora_files import LoraFile

_PLAIN = {"lora_down.weight", "lora_up.weight", "alpha"}


def _plain(parts: Dict[str, torch.Tensor], name: str, source: str) -> Tuple[torch.Tensor, torch.Tensor, float, int]:
    extra = sorted(set(parts) - _PLAIN)
    if extra or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise UserError(f"{source}: module {name} is not a plain LoRA module ({', '.join(extra or sorted(parts))}); "
                        "LoRA + LoRA merging combines lora_down/lora_up factors only. Use svd_merge_lora.py for "
                        "LyCORIS files, or merge them into a checkpoint with --sd_model")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = int(down.shape[0])
    alpha = parts.get("alpha")
    alpha = float(rank) if alpha is None or float(alpha) == 0 else float(alpha)
    return down, up, alpha, rank


def combine(files: Sequence[LoraFile], ratios: Sequence[float], concat: bool = False, shuffle: bool = False,
            module_weights: Optional[Sequence[Optional[Callable[[str], float]]]] = None,
            dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None
            ) -> Dict[str, torch.Tensor]:
    """The combined LoRA's tensors (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    entries: Dict[str, List[tuple]] = {}
    for i, f in enumerate(files):
        for name, parts in f.modules.items():
            weight = module_weights[i](name) if module_weights and module_weights[i] else 1.0
            entries.setdefault(name, []).append((ratios[i] * weight, f.path, *_plain(parts, name, f.path)))
    out: Dict[str, torch.Tensor] = {}
    for name, items in entries.items():
        _, _, first_down, first_up, alpha_out, rank_out = items[0]
        scale_out = alpha_out / rank_out
        if not concat:
            ranks = {rank for *_, rank in items}
            if len(ranks) > 1:
                raise UserError(f"module {name} has ranks {sorted(ranks)} in the inputs; summing needs equal ranks. "
                                "Use --concat, or svd_merge_lora.py for any ranks")
        downs, ups = [], []
        for ratio, source, down, up, alpha, rank in items:
            c = ratio * (alpha / rank) / scale_out
            root = math.sqrt(abs(c))
            shape_down = (rank, *first_down.shape[1:])
            shape_up = (first_up.shape[0], rank, *first_up.shape[2:])
            down, up = fit_shape(down, shape_down), fit_shape(up, shape_up)
            if tuple(down.shape) != shape_down or tuple(up.shape) != shape_up:
                raise UserError(f"{source}: module {name} has shapes {tuple(down.shape)}/{tuple(up.shape)}, "
                                f"the first file {tuple(first_down.shape)}/{tuple(first_up.shape)}; "
                                "the files are for different models")
            downs.append(down.to(dtype) * (math.copysign(root, c)))
            ups.append(up.to(dtype) * root)
        if concat:
            down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
            alpha = down.shape[0] * scale_out
        else:
            down, up = torch.stack(downs).sum(0), torch.stack(ups).sum(0)
            alpha = alpha_out
        if shuffle:
            perm = torch.randperm(down.shape[0], generator=generator)
            down, up = down[perm], up[:, perm]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out
