"""DyLoRA network plugin (`--network_module networks.dylora`, arg `unit`).

DyLoRA (Valipour et al., 2022) trains one LoRA that also works cut down to any rank that is a
multiple of `unit`. Each training forward draws `b` in [0, dim) (floored to a multiple of unit) and
uses only the ranks [0, b+unit): the leading ranks [0, b) are used frozen (detached) and only the
unit [b, b+unit) gets gradients. The file has the plain LoRA layout (`lora_down.weight` /
`lora_up.weight` / `alpha`, unit chunks concatenated), so the full-rank file loads anywhere and
`down[:r]`, `up[:, :r]` with the same alpha is a rank-r LoRA.

Deviations from sd-scripts (bugs there, see shared spec README):
* the training forward truncates to [0, b+unit) and scales by alpha/(b+unit) - exactly what the
  rank-(b+unit) LoRA extracted from the file computes. sd-scripts adds *all* ranks (the higher
  ones without gradient) scaled by `alpha/dim·sqrt(dim/(b+unit))`, so no extracted rank matches
  what was trained. In eval mode the full rank is used with alpha/dim, like any LoRA.
* SDXL text encoders get `lora_te1_`/`lora_te2_` like LoRA (sd-scripts gives both `lora_te_`, so
  the names collide).
* each unit chunk is its own parameter (not each rank), and the frozen ones are simply detached:
  no `requires_grad` toggling inside forward.
Dropouts, block-wise args, LoRA+, max-norm and merging work as in networks.lora.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from library.errors import UserError
from networks import lora as lora_network
from networks.lora_layers import LoRAModule, fit_shape


class DyLoRAModule(LoRAModule):
    """A LoRA whose ranks come in `unit`-sized chunks, each a separate parameter."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, unit=1, **kwargs):
        unit = int(unit)
        if unit < 1 or int(lora_dim) % unit:
            raise UserError(f"DyLoRA: rank {lora_dim} of {lora_name} is not a multiple of unit={unit}; "
                            f"set --network_dim (and conv_dim) to a multiple of unit")
        self.unit = unit
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, **kwargs)

    @property
    def chunks(self) -> int:
        return self.lora_dim // self.unit

    def _down_shape(self, rank: int) -> tuple:
        return (rank, self.in_dim, *self.kernel_size) if self.is_conv else (rank, self.in_dim)

    def _up_shape(self, rank: int) -> tuple:
        return (self.out_dim, rank, 1, 1) if self.is_conv else (self.out_dim, rank)

    def _build(self) -> None:
        for i in range(self.chunks):
            down = torch.empty(self._down_shape(self.unit))
            # Kaiming's bound depends on fan-in only, so chunks get the distribution of the whole matrix.
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.register_parameter(f"lora_down_{i}", torch.nn.Parameter(down))
            self.register_parameter(f"lora_up_{i}", torch.nn.Parameter(torch.zeros(self._up_shape(self.unit))))

    def _down_chunks(self) -> List[torch.nn.Parameter]:
        return [getattr(self, f"lora_down_{i}") for i in range(self.chunks)]

    def _up_chunks(self) -> List[torch.nn.Parameter]:
        return [getattr(self, f"lora_up_{i}") for i in range(self.chunks)]

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self._down_chunks(), dim=0), torch.cat(self._up_chunks(), dim=1)

    def forward_factors(self) -> Tuple[torch.Tensor, torch.Tensor, float]:
        if not self.training:
            down, up = self.factors()
            return down, up, self.scale
        b = int(torch.randint(0, self.lora_dim, ()).item())
        k = b // self.unit  # the unit that learns this step
        downs, ups = self._down_chunks(), self._up_chunks()
        down = torch.cat([d.detach() for d in downs[:k]] + [downs[k]], dim=0)
        up = torch.cat([u.detach() for u in ups[:k]] + [ups[k]], dim=1)
        rank = (k + 1) * self.unit
        return down, up, self.scale * self.lora_dim / rank

    # The state dict has the plain LoRA layout: concatenated chunks under lora_down/lora_up.weight.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        down, up = self.factors()
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {"alpha": (), "lora_down.weight": self._down_shape(self.lora_dim),
               "lora_up.weight": self._up_shape(self.lora_dim)}
        values = {}
        for name, shape in own.items():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = fit_shape(state_dict[key], shape)
            if tuple(value.shape) != tuple(shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the model has {tuple(shape)}")
                continue
            values[name] = value
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own)
        with torch.no_grad():
            if "alpha" in values:
                self.alpha.copy_(values["alpha"])
                self.scale = float(self.alpha) / self.lora_dim
            if "lora_down.weight" in values:
                for chunk, part in zip(self._down_chunks(), values["lora_down.weight"].split(self.unit, dim=0)):
                    chunk.copy_(part)
            if "lora_up.weight" in values:
                for chunk, part in zip(self._up_chunks(), values["lora_up.weight"].split(self.unit, dim=1)):
                    chunk.copy_(part)


class DyLoRANetwork(lora_network.LoRANetwork):
    module_factory = staticmethod(DyLoRAModule)


def _unit(kwargs: dict) -> int:
    unit = lora_network._arg(kwargs, "unit", int, 1)
    if unit < 1:
        raise UserError(f"--network_args unit={unit}: must be a positive integer")
    return unit


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    network_dim = 4 if network_dim is None else int(network_dim)
    conv_dim = lora_network._arg(kwargs, "conv_dim", int)
    if conv_dim is not None and conv_dim != network_dim:
        raise UserError(f"DyLoRA: --network_args conv_dim={conv_dim} must equal --network_dim {network_dim}")
    return lora_network.build_network(DyLoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                                      neuron_dropout, kwargs, module_kwargs={"unit": _unit(kwargs)})


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A DyLoRA network shaped like the file (to continue training); `unit` from kwargs (default 1)."""
    return lora_network.build_network_from_weights(DyLoRANetwork, multiplier, file, text_encoder, unet, weights_sd,
                                                   kwargs, module_kwargs={"unit": _unit(kwargs)})
