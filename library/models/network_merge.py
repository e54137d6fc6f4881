"""Merging LoRA and LyCORIS files into model weights: into loaded models, or a checkpoint file streamed
tensor by tensor.

Both paths find each module's layer with `network_targets` and compute the new weight with
`network_deltas.merge_weight` (W + multiplier·scale·ΔW, the plain formulas), so `--base_weights` in
the trainers, `gen_img.py --network_merge` and the merge tools give the same weights. A module that
addresses no layer of the model is an error (a LoRA made for another family would otherwise be a
silent no-op), as is a form with no formula (OFT, IA3, ...).

The checkpoint path never builds a model: it reads one tensor, adds what the networks hold for it,
casts it and writes it, so memory holds one tensor (plus the network files) however large the
checkpoint is. Writes are atomic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from library.errors import UserError
from library.models import checkpoint_io, network_deltas, network_targets, safetensors_io

logger = logging.getLogger(__name__)

Modules = Dict[str, Dict[str, torch.Tensor]]


@dataclass
class NetworkToMerge:
    """One network file: its modules (`network_deltas.group_modules`), multiplier, and optionally a
    further per-module weight (SDXL block weights)."""

    source: str
    modules: Modules
    multiplier: float = 1.0
    module_weight: Optional[Callable[[str], float]] = None

    def weight_of(self, name: str) -> float:
        return self.multiplier * (self.module_weight(name) if self.module_weight else 1.0)


def understands(modules: Modules) -> bool:
    """Whether every module is a form `network_deltas` has a formula for."""
    try:
        for name, parts in modules.items():
            network_deltas.module_kind(parts, name)
    except UserError:
        return False
    return bool(modules)


def resolve(modules: Modules, targets: Dict[str, object], source: str, model_title: str) -> List[Tuple[str, object]]:
    """(module name, target) for every module; a UserError when some address nothing in the model."""
    for name, parts in modules.items():
        network_deltas.module_kind(parts, f"{source}: module {name}")
    unmatched = [name for name in modules if name not in targets]
    if unmatched and len(unmatched) == len(modules):
        raise UserError(f"{source}: none of its {len(modules)} modules match this {model_title} model "
                        f"(e.g. {unmatched[0]}); it was made for another model family")
    if unmatched:
        raise UserError(f"{source}: {len(unmatched)} of its {len(modules)} modules match no layer of this "
                        f"{model_title} model, e.g. {unmatched[0]}; it was made for another model")
    return [(name, targets[name]) for name in modules]


# ----------------------------------------------------------------------------------------------
# loaded models


def merge_into_models(weights_sd: Dict[str, torch.Tensor], text_encoders: Sequence[torch.nn.Module],
                      unet: Optional[torch.nn.Module], multiplier: float, source: str,
                      model_title: str = "Stable Diffusion", module_weight: Optional[Callable[[str], float]] = None,
                      precision: Optional[torch.dtype] = None) -> int:
    """Add a network file's change into the layers' weights (in their own dtype and device); returns
    the number of modules merged. Only the parts the file has modules for need to be given.
    module_weight: a further factor per module name (block weights); precision: a dtype each merged
    weight is rounded to before it is stored (the merge tools' --precision)."""
    modules = network_deltas.group_modules(weights_sd)
    targets = network_targets.model_targets(text_encoders, unet)
    resolved = resolve(modules, targets, source, model_title)
    for name, layer in resolved:  # every check before the first change: a bad file changes nothing
        network_deltas.check_fits(modules[name], layer.weight.shape, f"{source}: module {name}")
    merged = 0
    with torch.no_grad():
        for name, layer in resolved:
            parts = modules[name]
            weight = layer.weight
            factor = multiplier * (module_weight(name) if module_weight else 1.0)
            new = network_deltas.merge_weight(weight, parts, factor, f"{source}: {name}")
            weight.copy_((new if precision is None else new.to(precision)).to(weight.dtype))
            bias = network_deltas.delta_bias(parts, weight.device)
            if bias is not None and layer.bias is not None:
                layer.bias.add_((bias * factor).to(layer.bias.dtype))
            merged += 1
    logger.info("%s: merged %d modules (multiplier %s)", source, merged, multiplier)
    return merged


# ----------------------------------------------------------------------------------------------
# checkpoint files


@dataclass
class _Update:
    network: NetworkToMerge
    name: str
    part: Optional[int]
    is_bias: bool


def _plan(source: checkpoint_io.TensorSource, networks: Sequence[NetworkToMerge]):
    """(family, {file key: updates in network order}) after checking every module against the file."""
    family, targets = network_targets.checkpoint_targets(source.path, source.shapes())
    plan: Dict[str, List[_Update]] = {}
    for network in networks:
        for name, target in resolve(network.modules, targets, network.source, family.title):
            parts = network.modules[name]
            network_deltas.check_fits(parts, target.shape, f"{network.source}: module {name}")
            plan.setdefault(target.key, []).append(_Update(network, name, target.part, False))
            if "diff_b" in parts and target.bias_key:
                plan.setdefault(target.bias_key, []).append(_Update(network, name, target.part, True))
    return family, plan


def _apply(tensor: torch.Tensor, updates: List[_Update], precision: torch.dtype) -> torch.Tensor:
    """The tensor with every update added, rounded to `precision` after each network."""
    out = tensor.to(precision, copy=True)
    for update in updates:
        parts = update.network.modules[update.name]
        weight = update.network.weight_of(update.name)
        rows = slice(None)
        if update.part is not None:
            third = out.shape[0] // 3
            rows = slice(update.part * third, (update.part + 1) * third)
        if update.is_bias:
            out[rows] = (out[rows].float() + network_deltas.delta_bias(parts) * weight).to(precision)
        else:
            label = f"{update.network.source}: {update.name}"
            out[rows] = network_deltas.merge_weight(out[rows], parts, weight, label).to(precision)
    return out


def merge_into_checkpoint(src: str, dst: str, networks: Sequence[NetworkToMerge], precision: torch.dtype = torch.float32,
                          save_dtype: Optional[torch.dtype] = None, metadata: Optional[Dict[str, str]] = None,
                          progress: bool = True):
    """Write `dst` (.safetensors streamed, any other extension a pickled `{"state_dict": ...}`) as the
    single-file checkpoint `src` with the networks merged in. Floating tensors are saved in
    `save_dtype` (None: each keeps its dtype in `src`); other keys (EMA, buffers) are copied.
    Returns the checkpoint's family. Nothing is written when a network does not fit."""
    from tqdm import tqdm

    if os.path.abspath(src) == os.path.abspath(dst):
        raise UserError(f"{dst}: the output would replace the checkpoint being read; choose another --save_to")
    with checkpoint_io.TensorSource(src) as source:
        family, plan = _plan(source, networks)

        def out_dtype(name: str) -> torch.dtype:
            dtype = source.dtype(name)
            return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype

        bar = tqdm(total=len(source.names), desc="merging", unit="tensor", disable=not progress)

        def produce(name: str) -> torch.Tensor:
            tensor = source.read(name)
            if name in plan:
                tensor = _apply(tensor, plan[name], precision)
            bar.update(1)
            return tensor.to(out_dtype(name))

        if os.path.splitext(dst)[1].lower() == ".safetensors":
            entries = [(name, out_dtype(name), source.shape(name)) for name in source.names]
            safetensors_io.write_tensors(dst, entries, produce, metadata)
        else:
            state = {name: produce(name) for name in source.names}
            extra = {"epoch": source.extra.get("epoch", 0), "global_step": source.extra.get("global_step", 0)}
            checkpoint_io.save_pickle_checkpoint({"state_dict": state, **extra}, dst)
        bar.close()
    return family
