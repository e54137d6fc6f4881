"""LoRA-FA network plugin (`--network_module networks.lora_fa`): LoRA with a frozen down projection.

LoRA-FA (Zhang et al., 2023) draws `lora_down` once from N(0, sqrt(2/(fan_in + r))) and never
trains it; only `lora_up` (zero-initialised) learns. The backward pass then needs no gradient for
`lora_down`, so the layer input need not be kept for it. Files have the plain LoRA layout (the frozen
random `lora_down` is saved too) and load anywhere a LoRA loads. fan_in is the down layer's input
size: in_features, or in_channels·k·k for convolutions.

Network args are those of networks.lora; block-wise args also work for SDXL (sd-scripts: SD1/2 only).
"""

from __future__ import annotations

import math

import torch

from networks import lora as lora_network
from networks.lora_layers import LoRAModule


class LoRAFAModule(LoRAModule):
    def _init_factors(self) -> None:
        weight = self.lora_down.weight
        fan_in = weight[0].numel()
        torch.nn.init.normal_(weight, mean=0.0, std=math.sqrt(2.0 / (fan_in + self.lora_dim)))
        weight.requires_grad_(False)
        torch.nn.init.zeros_(self.lora_up.weight)

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("lora_down")]


class LoRAFANetwork(lora_network.LoRANetwork):
    module_factory = staticmethod(LoRAFAModule)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    return lora_network.build_network(LoRAFANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                                      neuron_dropout, kwargs)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    return lora_network.build_network_from_weights(LoRAFANetwork, multiplier, file, text_encoder, unet, weights_sd,
                                                   kwargs)
