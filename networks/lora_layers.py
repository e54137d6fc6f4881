"""Adapter layers: how an adapter attaches to a base Linear/Conv2d, and the LoRA math of one layer.

`AdapterPatch` is the one way the project injects adapters: it patches the *instance* `forward` of
the base module (LoRA and its family here, ControlNet-LLLite in networks/control_net_lllite.py).

A LoRA layer holds `lora_down`, `lora_up` (nn.Linear / nn.Conv2d without bias, so state-dict keys are
`lora_down.weight` / `lora_up.weight` as in every LoRA file), an `alpha` buffer, the multiplier and
the dropouts. `apply_to()` patches the *instance* `forward` of the base module instead of replacing
the module in its parent: the base model keeps its own module tree and state-dict keys, and the
adapter is not registered inside it (we keep the base module in a plain list, not as a child).

Forward (spec §3): `y = base(x) + up(drop(down(x))) * multiplier * alpha / rank`, with neuron,
rank and module dropout only in training mode. Merging adds `multiplier * scale * ΔW` to the base
weight, with ΔW = up @ down for linear / 1x1 and the composed convolution for k x k kernels.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from library.models.network_deltas import fit_shape, lora_delta  # noqa: F401 - part of this module's interface
from networks.lora_names import CONV_CLASSES


class AdapterPatch(torch.nn.Module):
    """An adapter attached to one base module by patching that module's instance `forward`.

    The base module stays in its model's module tree (its state-dict keys do not change) and is held
    here in a plain list, not as a child, so the adapter's state dict holds only its own tensors. A
    subclass's `forward(x, ...)` calls `self.org_forward` (the base module's forward, or the adapter
    patched before it) and changes its input or output. Frozen layers swapped by
    library/models/frozen_weights.py keep their class names and take part like plain ones.
    """

    def __init__(self, org_module: torch.nn.Module):
        super().__init__()
        self._org = [org_module]  # a list: not a registered child, so no org keys in our state dict
        self.org_forward = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        if self.org_forward is not None:
            return
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def unapply(self) -> None:
        """Give the base module its own forward back (every adapter patched onto it is detached)."""
        if self.org_forward is None:
            return
        # The instance attribute is what we added; removing it restores the class's forward.
        if self.org_module.__dict__.get("forward") is not None:
            del self.org_module.forward
        self.org_forward = None


class LoRAModule(AdapterPatch):
    """Common part of every LoRA adapter: alpha/scale, multiplier, dropouts, merging.

    Subclasses create the factor parameters (`_build`) and may change which factors the forward
    uses (`forward_factors`) - DyLoRA truncates ranks there.
    """

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: Optional[float] = 1.0, dropout: Optional[float] = None,
                 rank_dropout: Optional[float] = None, module_dropout: Optional[float] = None):
        super().__init__(org_module)
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.is_conv = type(org_module).__name__ in CONV_CLASSES
        if self.is_conv:
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
            self.kernel_size = tuple(org_module.kernel_size)
            self.stride, self.padding = tuple(org_module.stride), org_module.padding
        else:
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        alpha = self.lora_dim if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / self.lora_dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self._build()

    # --- parameters --------------------------------------------------------------------------

    def _build(self) -> None:
        # Built on meta and materialised once: the default init would be overwritten anyway.
        if self.is_conv:
            self.lora_down = torch.nn.Conv2d(self.in_dim, self.lora_dim, self.kernel_size, self.stride,
                                             self.padding, bias=False, device="meta")
            self.lora_up = torch.nn.Conv2d(self.lora_dim, self.out_dim, (1, 1), (1, 1), bias=False, device="meta")
        else:
            self.lora_down = torch.nn.Linear(self.in_dim, self.lora_dim, bias=False, device="meta")
            self.lora_up = torch.nn.Linear(self.lora_dim, self.out_dim, bias=False, device="meta")
        self.lora_down.to_empty(device="cpu")
        self.lora_up.to_empty(device="cpu")
        self._init_factors()

    def _init_factors(self) -> None:
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(down, up) weights in file layout."""
        return self.lora_down.weight, self.lora_up.weight

    def forward_factors(self) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, scale) used by this forward pass."""
        down, up = self.factors()
        return down, up, self.scale

    def trainable_named_parameters(self):
        return list(self.named_parameters())

    def scale_factors(self, factor: float) -> None:
        """Multiply both factors in place (max-norm regularisation)."""
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(factor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, own in (("lora_down.weight", self.factors()[0]), ("lora_up.weight", self.factors()[1])):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = fit_shape(state_dict[key], own.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim

    # --- forward -----------------------------------------------------------------------------

    def _down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, weight, stride=self.stride, padding=self.padding)
        return F.linear(x, weight)

    def _up(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, weight) if self.is_conv else F.linear(h, weight)

    def _drop_ranks(self, h: torch.Tensor, scale: float) -> Tuple[torch.Tensor, float]:
        rank = h.shape[1] if self.is_conv else h.shape[-1]
        mask = (torch.rand((h.shape[0], rank), device=h.device) > self.rank_dropout).to(h.dtype)
        if self.is_conv:
            mask = mask[:, :, None, None]
        elif h.dim() == 3:
            mask = mask[:, None, :]
        # Rescale like inverted dropout so the expected output is unchanged.
        return h * mask, scale / (1.0 - self.rank_dropout)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's own contribution (multiplier and scale included)."""
        down, up, scale = self.forward_factors()
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts both to its own dtype
            x = x.to(down.dtype)
        h = self._down(x, down)
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            h, scale = self._drop_ranks(h, scale)
        return self._up(h, up) * (self.multiplier * scale)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.org_forward(x, *args, **kwargs)
        if not self.enabled:
            return y
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return y
        return y + self.lora_forward(x).to(y.dtype)

    # --- merging -----------------------------------------------------------------------------

    def delta_weight(self, multiplier: Optional[float] = None, down: Optional[torch.Tensor] = None,
                     up: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
        """multiplier * scale * ΔW in float32, shaped like the base weight."""
        if down is None or up is None:
            down, up = self.factors()
        multiplier = self.multiplier if multiplier is None else multiplier
        scale = self.scale if scale is None else scale
        weight = self.org_module.weight
        down = fit_shape(down.detach().float(), (self.lora_dim, *weight.shape[1:]))
        up = fit_shape(up.detach().float(), (weight.shape[0], self.lora_dim, *([1, 1] if weight.dim() == 4 else [])))
        return fit_shape(lora_delta(down, up), weight.shape) * (multiplier * scale)

    def merge_to(self, sd: Optional[Dict[str, torch.Tensor]] = None, dtype: Optional[torch.dtype] = None,
                 device=None) -> None:
        """Add this adapter (or the factors in `sd`: `lora_down.weight`, `lora_up.weight`, `alpha`) to the base weight."""
        weight = self.org_module.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        if sd is not None:
            down, up = sd["lora_down.weight"], sd["lora_up.weight"]
            rank = down.shape[0]
            alpha = sd.get("alpha")
            alpha = rank if alpha is None or float(alpha) == 0 else float(alpha)
            delta = self.delta_weight(down=down.to(device), up=up.to(device), scale=alpha / rank)
        else:
            delta = self.delta_weight()
        with torch.no_grad():
            merged = weight.detach().to(device=device, dtype=torch.float32) + delta.to(device)
            # Copy into the existing parameter (like load_state_dict) so references to it stay valid.
            weight.copy_(merged.to(dtype))


class LoRALinear(LoRAModule):
    """Adapter for an nn.Linear: down [r, in], up [out, r]."""


class LoRAConv2d(LoRAModule):
    """Adapter for an nn.Conv2d: down [r, in, k, k] (base stride/padding), up [out, r, 1, 1]."""


def make_lora_module(lora_name: str, org_module: torch.nn.Module, **kwargs) -> LoRAModule:
    cls = LoRAConv2d if type(org_module).__name__ in CONV_CLASSES else LoRALinear
    return cls(lora_name, org_module, **kwargs)
