"""extract_lora_from_models.py: a LoRA approximating `tuned − original` of two checkpoints.

The modules are the ones `networks.lora` trains (`networks.lora_names`: CLIP attention/MLP layers,
the U-Net's transformer blocks, and with `--conv_dim` its ResNet/Down/Upsample layers), found on the
checkpoint's layout built on the meta device (no memory). Then, one layer at a time: read the two
weights from the files (`library.models.checkpoint_io.TensorSource`), take the difference, and keep
its best rank-k factors (`networks.lora_svd`, float32, on `--device`), clipped at `--clamp_quantile`;
alpha = k. Memory holds two layer weights and the factors found so far, never a model (sd-scripts
holds both models in float32). The text encoders are kept only when some layer changed by more than
`--min_diff` (both SDXL encoders are decided together).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from library.errors import UserError
from library.models import checkpoint_io, clip_convert, detect, network_targets, unet_convert
from library.models.families import ModelFamily
from networks import lora_names, lora_svd

logger = logging.getLogger(__name__)


@dataclass
class Layer:
    name: str
    target: network_targets.FileTarget
    rank: int
    is_text_encoder: bool


def meta_models(source: checkpoint_io.TensorSource, family: ModelFamily):
    """(U-Net, text encoders) of the checkpoint's layout on the meta device: shapes, no data."""
    from library.models.loading import build_text_encoder, build_unet

    meta = {name: torch.empty(source.shape(name), dtype=source.dtype(name), device="meta") for name in source.names}
    unet_sd = {k[len(detect.UNET_PREFIX):]: v for k, v in meta.items() if k.startswith(detect.UNET_PREFIX)}
    unet = build_unet(unet_convert.ldm_to_diffusers(unet_sd), family)
    encoders = []
    for spec in family.text_encoders:
        prefix = spec.single_file_prefix
        section = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        if spec.kind == "openclip":
            classic = clip_convert.openclip_to_classic(section, spec)[0]
        else:
            classic = clip_convert.normalize_clip_keys(section)
        encoders.append(build_text_encoder(classic, spec))
    return unet, encoders


def extraction_layers(source: checkpoint_io.TensorSource, family: ModelFamily, dim: int,
                      conv_dim: Optional[int]) -> List[Layer]:
    """The layers a LoRA of `dim` (and `conv_dim` for 3x3 convs) would adapt, with their file keys."""
    unet, encoders = meta_models(source, family)
    _, index = network_targets.checkpoint_targets(source.path, source.shapes())
    found = [t for group in lora_names.text_encoder_targets(encoders, family.is_sdxl) for t in group]
    found += lora_names.unet_targets(unet, include_conv_blocks=conv_dim is not None)
    layers = []
    for t in found:
        rank = conv_dim if t.is_kxk_conv else dim
        if not rank:
            continue
        if t.lora_name not in index:
            raise UserError(f"{source.path}: layer {t.lora_name} has no weight in the file; the checkpoint is incomplete")
        layers.append(Layer(t.lora_name, index[t.lora_name], rank, t.is_text_encoder))
    return layers


class _WeightReader:
    """One layer's weight from a checkpoint (the packed q/k/v tensor read once for its three parts)."""

    def __init__(self, source: checkpoint_io.TensorSource, dtype: Optional[torch.dtype], device):
        self.source, self.dtype, self.device = source, dtype, device
        self._key, self._tensor = None, None

    def __call__(self, target: network_targets.FileTarget) -> torch.Tensor:
        if target.key != self._key:
            self._key, self._tensor = None, None  # drop the previous one before reading the next
            tensor = self.source.read(target.key)
            if self.dtype is not None:
                tensor = tensor.to(self.dtype)
            self._key, self._tensor = target.key, tensor.to(self.device)
        tensor = self._tensor
        return tensor if target.part is None else tensor[target.rows(tensor.shape[0])]


def _check_same_layout(org: checkpoint_io.TensorSource, tuned: checkpoint_io.TensorSource, layers: List[Layer]) -> None:
    tuned_shapes = tuned.shapes()
    for layer in layers:
        key = layer.target.key
        if tuned_shapes.get(key) != org.shape(key):
            raise UserError(f"{tuned.path}: weight {key} is {'missing' if key not in tuned_shapes else tuned_shapes[key]}"
                            f", the original model has {org.shape(key)}; the two checkpoints are different models")


def extract(org: checkpoint_io.TensorSource, tuned: checkpoint_io.TensorSource, family: ModelFamily,
            dim: int, conv_dim: Optional[int], clamp_quantile: float, min_diff: float,
            load_dtype: Optional[torch.dtype] = None, device=None, org_device=None, tuned_device=None,
            progress: bool = True) -> Dict[str, torch.Tensor]:
    """The LoRA's tensors (float32): `lora_down.weight`, `lora_up.weight`, `alpha` per layer."""
    from tqdm import tqdm

    layers = extraction_layers(org, family, dim, conv_dim)
    _check_same_layout(org, tuned, layers)
    read_org = _WeightReader(org, load_dtype, org_device or "cpu")
    read_tuned = _WeightReader(tuned, load_dtype, tuned_device or org_device or "cpu")

    def diff(layer: Layer) -> torch.Tensor:
        a = read_org(layer.target)
        b = read_tuned(layer.target).to(a.device)
        if load_dtype is None:  # the files' dtypes: difference in float32, as of models loaded in float32
            return b.float() - a.float()
        return b - a

    te_layers = [layer for layer in layers if layer.is_text_encoder]
    largest = max((float(diff(layer).abs().max()) for layer in te_layers), default=0.0)
    if te_layers and largest <= min_diff:
        logger.warning("text encoder weights differ by at most %g (<= --min_diff %g): the LoRA has no text encoder "
                       "modules", largest, min_diff)
        layers = [layer for layer in layers if not layer.is_text_encoder]
    out: Dict[str, torch.Tensor] = {}
    for layer in tqdm(layers, desc="extracting", unit="module", disable=not progress):
        delta = diff(layer)
        shape = tuple(delta.shape)
        u, s, vh = lora_svd.svd(delta, device)
        k = min(layer.rank, s.numel())
        down, up = lora_svd.factors(u, s, vh, k, shape, clamp_quantile)
        out[f"{layer.name}.lora_down.weight"] = down
        out[f"{layer.name}.lora_up.weight"] = up
        out[f"{layer.name}.alpha"] = torch.tensor(float(k))
    return out
