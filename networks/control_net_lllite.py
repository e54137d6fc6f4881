"""ControlNet-LLLite for SDXL (`networks.control_net_lllite`), file-compatible with kohya-ss/sd-scripts.

A light control network: one small module per attention projection of the SDXL U-Net's input and
middle blocks steers generation with a conditioning image (edges, depth, ...). Each module wraps a
`Linear` the way every adapter here does (`networks.lora_layers.AdapterPatch`) and adds a control
signal to that layer's **input** (spec textual-inversion-and-lllite.md §2):

    cond_emb = conditioning1(hint)            once per hint image, [B, 3, H, W] in [-1, 1] → [B, h·w, C]
    cx = up(mid(cat[cond_emb, down(x)])) · multiplier
    y  = original(x + cx)

Where: `attn1.to_q/to_k/to_v` and `attn2.to_q` of every transformer block of `input_blocks` and
`middle_block` (attn2's keys and values read the text, so never): 136 modules on SDXL. The depth of
the block (input blocks 0-2 → 1, 3-5 → 2, 6-8 and the middle block → 3) picks how far
`conditioning1` shrinks the hint: to 1/8, 1/16 or 1/32 of the image, the resolution of that block.
`up` starts at zero, so an untrained module changes nothing.

Files: a flat state dict `lllite_unet_<SGM module path with _>.{conditioning1.{0,2[,4]},down.0,mid.0,up.0}.
{weight,bias}` (safetensors, or a torch pickle for .pt/.ckpt); loaders read the MLP width from
`down.0.weight` and the embedding width from `conditioning1.0.weight` (× 2). Metadata is modelspec
only (architecture `stable-diffusion-xl-v1-base/control-net-lllite`), written by the trainer.

Inference with classifier-free guidance: when the U-Net batch is a multiple of the hint batch (the
unconditional, conditional and, with --negative_scale, empty-prompt rows), the hint repeats for each
part, in the pipeline's order of concatenation.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from library.errors import UserError
from networks.lora_layers import AdapterPatch
from networks.lora_names import LINEAR_CLASSES, UNET_TARGETS, find_targets, is_sdxl_unet, unet_renamer

logger = logging.getLogger(__name__)

PREFIX = "lllite_unet"
TARGET_SUFFIXES = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q")
ARCHITECTURE_KIND = "control-net-lllite"  # modelspec: stable-diffusion-xl-v1-base/control-net-lllite


def block_depth(sgm_path: str) -> Optional[int]:
    """Depth of a module from its SGM path (`input_blocks_4_1_...`): input blocks 0-2 → 1, 3-5 → 2,
    6-8 → 3, middle block → 3; None for output blocks (sd-scripts never attaches there)."""
    if sgm_path.startswith("input_blocks_"):
        index = int(sgm_path[len("input_blocks_"):].split("_")[0])
        return 1 if index <= 2 else 2 if index <= 5 else 3
    if sgm_path.startswith("middle_block_"):
        return 3
    return None


def lllite_targets(unet: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module, int]]:
    """(name, Linear, depth) of every layer an LLLite network attaches to, in U-Net order."""
    if not is_sdxl_unet(unet):
        raise UserError("ControlNet-LLLite works with SDXL models only; this U-Net is not SDXL's")
    for target in find_targets(unet, PREFIX, UNET_TARGETS, unet_renamer(unet), False):
        name = target.lora_name
        if not name.endswith(TARGET_SUFFIXES) or type(target.module).__name__ not in LINEAR_CLASSES:
            continue
        depth = block_depth(name[len(PREFIX) + 1:])
        if depth is not None:
            yield name, target.module, depth


def conditioning_embedding(depth: int, cond_emb_dim: int) -> torch.nn.Sequential:
    """The hint encoder of one module: image → [B, C, H/8·2^(depth-1), ...] (state keys 0, 2[, 4])."""
    half = cond_emb_dim // 2
    layers: List[torch.nn.Module] = [torch.nn.Conv2d(3, half, kernel_size=4, stride=4)]
    if depth == 1:
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2)]
    elif depth == 2:
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(half, cond_emb_dim, kernel_size=4, stride=4)]
    elif depth == 3:
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(half, half, kernel_size=4, stride=4),
                   torch.nn.ReLU(), torch.nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2)]
    else:
        raise ValueError(f"LLLite depth must be 1, 2 or 3, not {depth}")
    return torch.nn.Sequential(*layers)


class LLLiteModule(AdapterPatch):
    """One LLLite module around one `Linear` (see the module docstring for the math)."""

    def __init__(self, depth: int, cond_emb_dim: int, name: str, org_module: torch.nn.Module, mlp_dim: int,
                 dropout: Optional[float] = None, multiplier: float = 1.0):
        super().__init__(org_module)
        self.lllite_name = name
        self.depth = depth
        self.cond_emb_dim = cond_emb_dim
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.multiplier = multiplier
        in_dim = org_module.in_features
        self.conditioning1 = conditioning_embedding(depth, cond_emb_dim)
        self.down = torch.nn.Sequential(torch.nn.Linear(in_dim, mlp_dim), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp_dim, in_dim))
        torch.nn.init.zeros_(self.up[0].weight)  # starts as a no-op; the bias keeps its default init
        self.cond_emb: Optional[torch.Tensor] = None

    def set_cond_image(self, image: Optional[torch.Tensor]) -> None:
        """Embed a hint [B, 3, H, W] in [-1, 1] (with grad when training), or None to switch off."""
        if image is None:
            self.cond_emb = None
            return
        weight = self.conditioning1[0].weight
        emb = self.conditioning1(image.to(weight.device, weight.dtype))
        n, c, h, w = emb.shape
        self.cond_emb = emb.view(n, c, h * w).permute(0, 2, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.multiplier == 0.0 or self.cond_emb is None:
            return self.org_forward(x, *args, **kwargs)
        cx = self.cond_emb
        if x.shape[0] != cx.shape[0]:
            if x.shape[0] % cx.shape[0]:
                raise ValueError(f"{self.lllite_name}: batch of {x.shape[0]} for {cx.shape[0]} hint image(s)")
            cx = cx.repeat(x.shape[0] // cx.shape[0], 1, 1)  # classifier-free guidance parts share the hint
        if cx.shape[1] != x.shape[1]:
            raise UserError(f"ControlNet-LLLite: the hint image gives {cx.shape[1]} positions where the U-Net has "
                            f"{x.shape[1]}; image sides must be multiples of 32 and the hint the image's size")
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.down[0].weight.dtype)
        h = self.down(h)
        cx = self.mid(torch.cat([cx.to(h.dtype), h], dim=2))
        if self.training and self.dropout:
            cx = F.dropout(cx, p=self.dropout)
        cx = self.up(cx) * self.multiplier
        return self.org_forward(x + cx.to(x.dtype), *args, **kwargs)


class ControlNetLLLite(torch.nn.Module):
    """All LLLite modules of one SDXL U-Net; the sd-scripts class of the same name, on our U-Net.

    State-dict keys are the modules' names (`lllite_unet_...`), as sd-scripts writes them.
    """

    def __init__(self, unet: torch.nn.Module, cond_emb_dim: int = 16, mlp_dim: int = 16,
                 dropout: Optional[float] = None, varbose: Optional[bool] = False, multiplier: float = 1.0):
        super().__init__()
        for name, value in (("cond_emb_dim", cond_emb_dim), ("mlp_dim (--network_dim)", mlp_dim)):
            if not isinstance(value, int) or value < 1 or (name == "cond_emb_dim" and value % 2):
                raise UserError(f"ControlNet-LLLite {name} {value!r}: must be a positive"
                                f"{' even' if name == 'cond_emb_dim' else ''} whole number")
        self.cond_emb_dim, self.mlp_dim, self.multiplier = cond_emb_dim, mlp_dim, multiplier
        self.unet_modules: List[LLLiteModule] = [
            LLLiteModule(depth, cond_emb_dim, name, layer, mlp_dim, dropout=dropout, multiplier=multiplier)
            for name, layer, depth in lllite_targets(unet)
        ]
        for module in self.unet_modules:
            self.add_module(module.lllite_name, module)
        logger.info("ControlNet-LLLite: %d modules (cond_emb_dim %d, network_dim %d)", len(self.unet_modules),
                    cond_emb_dim, mlp_dim)

    def forward(self, x):
        return x  # the modules run inside the U-Net

    # --- conditioning and strength -----------------------------------------------------------

    def set_cond_image(self, image: Optional[torch.Tensor]) -> None:
        """Hint images [B, 3, H, W] in [-1, 1] for the next U-Net calls, or None to switch the control off."""
        for module in self.unet_modules:
            module.set_cond_image(image)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.unet_modules:
            module.multiplier = multiplier

    # --- attaching ---------------------------------------------------------------------------

    def apply_to(self, *unused) -> None:
        for module in self.unet_modules:
            module.apply_to()

    def unapply(self) -> None:
        for module in self.unet_modules:
            module.unapply()

    def is_mergeable(self) -> bool:
        return False  # the control depends on the hint image: there is nothing fixed to merge

    def merge_to(self, *unused, **unused_kw) -> None:
        raise UserError("a ControlNet-LLLite network cannot be merged into the model weights")

    # --- training ----------------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        pass  # the modules are small; the U-Net's own checkpointing recomputes them with its blocks

    def prepare_optimizer_params(self, *unused) -> List[torch.nn.Parameter]:
        self.requires_grad_(True)
        return list(self.parameters())

    def prepare_grad_etc(self, *unused) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *unused) -> None:
        self.train()

    def get_trainable_params(self) -> List[torch.nn.Parameter]:
        return list(self.parameters())

    # --- files -------------------------------------------------------------------------------

    def load_weights(self, file: str):
        """Load an LLLite file (ours or sd-scripts'); one error names what does not fit."""
        self.load_lllite_state_dict(read_lllite_file(file), file)

    def load_lllite_state_dict(self, weights: Dict[str, torch.Tensor], source: str) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            modules = {k.partition(".")[0] for k in weights}
            raise UserError(f"{source}: does not fit this model's ControlNet-LLLite: {len(missing)} key(s) missing "
                            f"(e.g. {missing[:1]}), {len(unexpected)} unknown (e.g. {unexpected[:1]}); the file has "
                            f"{len(modules)} modules, this SDXL U-Net takes {len(self.unet_modules)}")
        for key, tensor in weights.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise UserError(f"{source}: {key} has shape {list(tensor.shape)} where this model and --cond_emb_dim "
                                f"{self.cond_emb_dim} / --network_dim {self.mlp_dim} need {list(own[key].shape)}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserError(f"{source}: {key} holds NaN or infinite values; the file is damaged")
        self.load_state_dict(weights, strict=True)

    def save_weights(self, file: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> None:
        """Write the state dict atomically: .safetensors with `metadata`, else a torch pickle."""
        state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype, copy=True)
                 for k, v in self.state_dict().items()}
        if os.path.splitext(file)[1] == ".safetensors":
            from library.models.safetensors_io import save_tensors

            save_tensors(state, file, {k: str(v) for k, v in (metadata or {}).items()} or None)
        else:
            from library.models.checkpoint_io import save_pickle_checkpoint

            save_pickle_checkpoint(state, file)


# ---------------------------------------------------------------------------------------------
# files


def read_lllite_file(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of an LLLite file (.safetensors, else a torch pickle read with weights_only)."""
    from library.models.checkpoint_io import torch_load_safely

    if not os.path.isfile(path):
        raise UserError(f"{path}: ControlNet-LLLite file not found")
    if path.endswith(".safetensors"):
        from library.models.safetensors_io import load_tensors

        weights = load_tensors(path)
    else:
        weights = torch_load_safely(path, what="ControlNet-LLLite file")
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise UserError(f"{path}: not a ControlNet-LLLite state dict")
    if not weights or not all(k.startswith(PREFIX + "_") for k in weights):
        other = next((k for k in weights if not k.startswith(PREFIX + "_")), None)
        raise UserError(f"{path}: not a ControlNet-LLLite file (its keys, e.g. {other!r}, do not start with "
                        f"{PREFIX}_)")
    return weights


def dims_from_weights(weights: Dict[str, torch.Tensor], source: str = "file") -> Tuple[int, int]:
    """(cond_emb_dim, mlp_dim) of an LLLite state dict, as sd-scripts' loaders read them."""
    cond = next((v for k, v in weights.items() if k.endswith(".conditioning1.0.weight")), None)
    down = next((v for k, v in weights.items() if k.endswith(".down.0.weight")), None)
    if cond is None or down is None:
        raise UserError(f"{source}: no conditioning1.0.weight / down.0.weight keys; not a ControlNet-LLLite file")
    return int(cond.shape[0]) * 2, int(down.shape[0])


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                   cond_emb_dim: Optional[int] = None, **kwargs) -> ControlNetLLLite:
    """The plugin-style constructor: `network_dim` is the MLP width, `cond_emb_dim` the hint embedding's."""
    if cond_emb_dim is None:
        raise UserError("ControlNet-LLLite needs --cond_emb_dim (sd-scripts' docs use 32 for canny)")
    return ControlNetLLLite(unet, int(cond_emb_dim), int(network_dim), dropout=neuron_dropout, multiplier=multiplier)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """(network sized from the file, its state dict); apply it with `apply_to()`, then load the state dict."""
    weights = weights_sd if weights_sd is not None else read_lllite_file(file)
    cond_emb_dim, mlp_dim = dims_from_weights(weights, file)
    return ControlNetLLLite(unet, cond_emb_dim, mlp_dim, multiplier=multiplier), weights


def load_lllite(file: str, unet: torch.nn.Module, multiplier: float = 1.0) -> ControlNetLLLite:
    """An LLLite file (ours or sd-scripts') attached to `unet`, its weights loaded."""
    network, weights = create_network_from_weights(multiplier, file, None, None, unet)
    network.load_lllite_state_dict(weights, file)
    network.apply_to()
    return network
