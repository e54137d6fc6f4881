"""svd_merge_lora.py: any number of LoRAs of any ranks merged in weight space and re-factored by SVD.

Per module, `ΔW = Σ_i ratio_i · block weight_i · alpha_i/r_i · ΔW_i` (inputs need not share ranks or
modules), then the best rank-k factors of ΔW (`networks.lora_svd`) with k = `--new_rank` (Linear and
1×1 conv) or `--new_conv_rank` (k×k conv), at most the matrix's size, and alpha = k (scale 1). The SVD
goes through the inputs' stacked factors (exact, without forming ΔW) where the summed rank is below
the layer's size, else through the dense sum; one module at a time. Unlike sd-scripts the
factors are not clipped at a quantile, so the result is the truncated-SVD optimum.

Inputs: LoRA-layout modules (LierLa, C3Lier, DyLoRA, LoRA-FA, LoCon with or without Tucker core) and
full-weight `diff` modules. LoHa/LoKr store conv changes with the kernel flattened, so their layer
shape is not in the file: merge those into a checkpoint instead (merge_lora.py --sd_model).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from library.errors import UserError
from library.models import network_deltas
from networks import lora_svd
from networks.lora_files import LoraFile


def _check_module(parts: Dict[str, torch.Tensor], name: str, source: str) -> None:
    kind = network_deltas.module_kind(parts, f"{source}: module {name}")
    if kind in (network_deltas.LOHA, network_deltas.LOKR) and "hada_t1" not in parts and "lokr_t2" not in parts:
        raise UserError(f"{source}: module {name} is a LyCORIS {kind.upper()} module, whose layer shape the file "
                        "does not record; merge it into a checkpoint with merge_lora.py --sd_model instead")
    if "dora_scale" in parts or "diff_b" in parts:
        raise UserError(f"{source}: module {name} changes more than a weight (DoRA scale or bias), which a LoRA "
                        "cannot hold; merge it into a checkpoint with merge_lora.py --sd_model instead")


def merged_delta(name: str, inputs: List[tuple], precision: torch.dtype, device) -> torch.Tensor:
    """Σ weight·scale·ΔW of one module over (file, parts, weight) inputs, accumulated in `precision`."""
    shape = network_deltas.delta_shape(inputs[0][1], name)
    total = None
    for source, parts, weight in inputs:
        delta = network_deltas.delta_weight(parts, shape, f"{source}: module {name}", device) * weight
        total = delta.to(precision) if total is None else total + delta.to(precision)
    return total


def _stacked_factors(name: str, inputs: List[tuple], shape, precision: torch.dtype):
    """(up [out, Σr], down [Σr, in·k·k]) whose product is the merged ΔW, or None when an input is
    not a plain factor pair (full weights, Tucker cores): those are summed densely."""
    ups, downs = [], []
    for source, parts, weight in inputs:
        if set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}:
            return None
        down = parts["lora_down.weight"].to(precision).float().flatten(1)
        up = parts["lora_up.weight"].to(precision).float().flatten(1)
        if up.shape[0] != shape[0] or down.shape[1] != torch.Size(shape[1:]).numel():
            network_deltas.check_fits(parts, shape, f"{source}: module {name}")
        ups.append(up * (weight * network_deltas.module_scale(parts)))
        downs.append(down)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def svd_merge(files: Sequence[LoraFile], ratios: Sequence[float], new_rank: int, new_conv_rank: Optional[int],
              module_weights: Optional[Sequence[Optional[Callable[[str], float]]]] = None,
              precision: torch.dtype = torch.float32, device=None, progress: bool = True) -> Dict[str, torch.Tensor]:
    """The merged LoRA's tensors in float32 (`lora_down.weight`, `lora_up.weight`, `alpha` per module)."""
    from tqdm import tqdm

    conv_rank = new_conv_rank or new_rank
    modules: Dict[str, List[tuple]] = {}
    for i, f in enumerate(files):
        for name, parts in f.modules.items():
            _check_module(parts, name, f.path)
            weight = ratios[i] * (module_weights[i](name) if module_weights and module_weights[i] else 1.0)
            modules.setdefault(name, []).append((f.path, parts, weight))
    out: Dict[str, torch.Tensor] = {}
    for name, inputs in tqdm(modules.items(), desc="SVD", unit="module", disable=not progress):
        shape = network_deltas.delta_shape(inputs[0][1], name)
        stacked = _stacked_factors(name, inputs, shape, precision)
        if stacked is not None:
            u, s, vh = lora_svd.svd_of_product(*stacked, device)
        else:
            u, s, vh = lora_svd.svd(merged_delta(name, inputs, precision, device), device)
        kxk = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        k = min(conv_rank if kxk else new_rank, s.numel())
        down, up = lora_svd.factors(u, s, vh, k, shape)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(k))
    return out
