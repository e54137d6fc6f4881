"""LoRA network plugin (`--network_module networks.lora`), compatible with kohya-ss/sd-scripts.

A `LoRANetwork` owns one adapter layer (networks/lora_layers.py) per wrapped Linear/Conv2d of the
text encoder(s) and the U-Net (chosen and named by networks/lora_names.py) and implements the
plugin surface the trainers, the generator and the LoRA tools call (spec lora-format.md §5):
module functions `create_network` / `create_network_from_weights`, and methods `apply_to`,
`load_weights`, `save_weights`, `merge_to`, `prepare_optimizer_params` (block learning rates,
LoRA+), `apply_max_norm_regularization`, ...

Network args arrive as strings (`--network_args k=v`) and are parsed here: conv_dim/conv_alpha,
rank_dropout, module_dropout, block_dims/block_alphas/conv_block_dims/conv_block_alphas,
down/mid/up_lr_weight (lists or presets), block_lr_zero_threshold and the loraplus ratios.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from library.errors import UserError
from library.training.lora_metadata import safetensors_order, sshs_hashes
from networks import lora_names
from networks.lora_layers import LoRAModule, lora_delta, make_lora_module
from networks.lora_names import Target, block_index, is_sdxl_unet, num_blocks

logger = logging.getLogger(__name__)

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
KNOWN_ARGS = {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "block_dims", "block_alphas",
              "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
              "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
              "loraplus_text_encoder_lr_ratio", "dropout"}  # `dropout` is injected by the trainer, unused


# ----------------------------------------------------------------------------------------------
# network args (all strings)


def _arg(kwargs: dict, name: str, convert: Callable, default=None):
    value = kwargs.get(name)
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return default
    try:
        return convert(value)
    except (TypeError, ValueError):
        kind = "an integer" if convert is int else "a number"
        raise UserError(f"--network_args {name}={value!r}: expected {kind}") from None


def _fraction(kwargs: dict, name: str) -> Optional[float]:
    value = _arg(kwargs, name, float)
    if value is not None and not 0.0 <= value < 1.0:
        raise UserError(f"--network_args {name}={value}: must be in [0, 1)")
    return value


def _block_list(text: Optional[str], n: int, convert: Callable, name: str) -> Optional[list]:
    """Exactly one value per U-Net block (25 for SD1/SD2, 23 for SDXL)."""
    if text is None:
        return None
    items = [s.strip() for s in str(text).split(",")]
    if len(items) != n:
        raise UserError(f"--network_args {name}: expected {n} comma-separated values (one per U-Net block), "
                        f"got {len(items)}")
    try:
        return [convert(s) for s in items]
    except ValueError:
        raise UserError(f"--network_args {name}={text!r}: every value must be a number") from None


def _lr_weight_list(text: Optional[str], n: int, name: str) -> Optional[List[float]]:
    """A comma list (empty item = 0) or a preset `cosine|sine|linear|reverse_linear|zeros[+base]`."""
    if text is None:
        return None
    text = str(text).strip()
    preset, _, base = text.partition("+")
    if preset in LR_WEIGHT_PRESETS:
        try:
            base_lr = float(base) if base else 0.0
        except ValueError:
            raise UserError(f"--network_args {name}={text!r}: the part after '+' must be a number") from None
        steps = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        curves = {
            "sine": [math.sin(math.pi / 2 * s) for s in steps],
            "cosine": [math.sin(math.pi / 2 * s) for s in reversed(steps)],
            "linear": steps,
            "reverse_linear": list(reversed(steps)),
            "zeros": [0.0] * n,
        }
        return [v + base_lr for v in curves[preset]]
    try:
        # sd-scripts needs a trailing comma for a lone number; we also take it without.
        return [float(s) if s.strip() else 0.0 for s in text.split(",")]
    except ValueError:
        raise UserError(f"--network_args {name}={text!r}: expected comma-separated numbers or one of "
                        f"{', '.join(LR_WEIGHT_PRESETS)} (optionally +base)") from None


def _fit(values: Optional[List[float]], n: int, name: str) -> List[float]:
    if values is None:
        return [1.0] * n
    if len(values) != n:
        logger.warning("%s has %d values, %d expected: %s", name, len(values), n,
                       "extra values ignored" if len(values) > n else "missing ones set to 1")
    return (list(values) + [1.0] * n)[:n]


def block_lr_weights(is_sdxl: bool, kwargs: dict) -> Optional[List[float]]:
    """Learning-rate weight per U-Net block index, or None when no *_lr_weight arg is given."""
    names = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    if all(kwargs.get(k) in (None, "") for k in names):
        return None
    side, mid = (9, 3) if is_sdxl else (12, 1)
    down = _fit(_lr_weight_list(kwargs.get("down_lr_weight"), side, "down_lr_weight"), side, "down_lr_weight")
    up = _fit(_lr_weight_list(kwargs.get("up_lr_weight"), side, "up_lr_weight"), side, "up_lr_weight")
    mid_values = kwargs.get("mid_lr_weight")
    if mid_values is not None:
        mid_values = [float(s) if s.strip() else 0.0 for s in str(mid_values).split(",")]
    middle = _fit(mid_values, mid, "mid_lr_weight")
    threshold = _arg(kwargs, "block_lr_zero_threshold", float, 0.0)
    weights = down + middle + up
    weights = [w if w > threshold else 0.0 for w in weights]
    # SDXL's block 0 (time/label embeddings) and 22 (out) carry no LoRA; they keep weight 1.
    return [1.0] + weights + [1.0] if is_sdxl else weights


def block_dims_and_alphas(kwargs: dict, n: int, network_dim: int, network_alpha: float,
                          conv_dim: Optional[int], conv_alpha: Optional[float]):
    """(block_dims, block_alphas, conv_block_dims, conv_block_alphas), each a list of n or None."""
    dims = _block_list(kwargs.get("block_dims"), n, int, "block_dims") or [network_dim] * n
    alphas = _block_list(kwargs.get("block_alphas"), n, float, "block_alphas") or [network_alpha] * n
    conv_dims = _block_list(kwargs.get("conv_block_dims"), n, int, "conv_block_dims")
    if conv_dims is not None:
        default_alpha = 1.0 if conv_alpha is None else conv_alpha
        conv_alphas = _block_list(kwargs.get("conv_block_alphas"), n, float, "conv_block_alphas") or [default_alpha] * n
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha] * n
    else:
        conv_alphas = None
    return dims, alphas, conv_dims, conv_alphas


class RankPlan:
    """Rank and alpha of every candidate module, from the network args or from a file."""

    def __init__(self, dim: int = 4, alpha: float = 1.0, conv_dim: Optional[int] = None,
                 conv_alpha: Optional[float] = None, block_dims=None, block_alphas=None,
                 conv_block_dims=None, conv_block_alphas=None, modules_dim: Optional[dict] = None,
                 modules_alpha: Optional[dict] = None):
        self.dim, self.alpha = dim, alpha
        self.conv_dim, self.conv_alpha = conv_dim, conv_alpha
        self.block_dims, self.block_alphas = block_dims, block_alphas
        self.conv_block_dims, self.conv_block_alphas = conv_block_dims, conv_block_alphas
        self.modules_dim, self.modules_alpha = modules_dim, modules_alpha

    @property
    def wants_conv_blocks(self) -> bool:
        return self.modules_dim is not None or bool(self.conv_dim) or self.conv_block_dims is not None

    def rank(self, target: Target, is_sdxl: bool) -> Tuple[Optional[int], Optional[float]]:
        name = target.lora_name
        if self.modules_dim is not None:
            return self.modules_dim.get(name), (self.modules_alpha or {}).get(name)
        kxk = target.is_kxk_conv
        if not target.is_text_encoder and self.block_dims is not None:
            idx = block_index(name, is_sdxl)
            if idx >= 0:
                if not kxk:
                    return self.block_dims[idx], self.block_alphas[idx]
                if self.conv_block_dims is not None:
                    return self.conv_block_dims[idx], self.conv_block_alphas[idx]
                return None, None
        if not kxk:
            return self.dim, self.alpha
        if self.conv_dim:
            return self.conv_dim, self.conv_alpha
        return None, None


# ----------------------------------------------------------------------------------------------
# files


def read_lora_file(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a LoRA file (.safetensors, else a torch pickle read with weights_only)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: LoRA file not found")
    if path.endswith(".safetensors"):
        from library.models.safetensors_io import load_tensors

        return load_tensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise UserError(f"{path}: cannot read as a LoRA file ({type(e).__name__}); save it as .safetensors") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: not a LoRA state dict")
    return sd


def _as_list(text_encoder) -> List[torch.nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


# ----------------------------------------------------------------------------------------------
# the network


class LoRANetwork(torch.nn.Module):
    """LoRA adapters for the text encoder(s) and U-Net of one SD1/SD2/SDXL model."""

    # factory(lora_name, org_module, multiplier=, lora_dim=, alpha=, dropout=, rank_dropout=, module_dropout=, **module_kwargs)
    module_factory: Callable[..., LoRAModule] = staticmethod(make_lora_module)

    def __init__(self, text_encoder, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1.0,
                 dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None, conv_lora_dim: Optional[int] = None,
                 conv_alpha: Optional[float] = None, block_dims=None, block_alphas=None, conv_block_dims=None,
                 conv_block_alphas=None, modules_dim: Optional[dict] = None, modules_alpha: Optional[dict] = None,
                 block_lr_weight: Optional[List[float]] = None, module_kwargs: Optional[dict] = None):
        super().__init__()
        self.multiplier = multiplier
        self.is_sdxl = is_sdxl_unet(unet)
        self.block_lr_weight = block_lr_weight
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        plan = RankPlan(lora_dim, alpha, conv_lora_dim, conv_alpha, block_dims, block_alphas, conv_block_dims,
                        conv_block_alphas, modules_dim, modules_alpha)
        options = dict(multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                       module_dropout=module_dropout, **(module_kwargs or {}))
        te_targets = [t for group in lora_names.text_encoder_targets(_as_list(text_encoder), self.is_sdxl)
                      for t in group]
        unet_targets = lora_names.unet_targets(unet, plan.wants_conv_blocks) if unet is not None else []
        self.text_encoder_loras = self._create(te_targets, plan, options)
        self.unet_loras = self._create(unet_targets, plan, options)
        self.applied = False
        # Outside the module tree: only its config is used (renaming diffusers-named SDXL files).
        self._unet_holder = [unet]
        logger.info("LoRA: %d text encoder modules, %d U-Net modules", len(self.text_encoder_loras),
                    len(self.unet_loras))

    def _create(self, targets: Sequence[Target], plan: RankPlan, options: dict) -> List[LoRAModule]:
        loras = []
        for target in targets:
            dim, alpha = plan.rank(target, self.is_sdxl)
            if not dim:
                continue
            if target.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA module name {target.lora_name}")
            lora = self.module_factory(target.lora_name, target.module, lora_dim=dim, alpha=alpha, **options)
            # Registered here (sd-scripts does it in apply_to) so state_dict/load work before apply_to.
            self.add_module(target.lora_name, lora)
            loras.append(lora)
        return loras

    def all_loras(self) -> List[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # --- plugin surface ----------------------------------------------------------------------

    def prepare_network(self, args) -> None:
        """Hook called by the trainer with its args; nothing to prepare for LoRA."""

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None,
                              loraplus_text_encoder_lr_ratio=None) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for lora in self.all_loras():
            lora.enabled = is_enabled

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Patch the base modules; parts not applied (e.g. --network_train_unet_only) are dropped."""
        for keep, loras in ((apply_text_encoder, self.text_encoder_loras), (apply_unet, self.unet_loras)):
            if not keep:
                for lora in loras:
                    delattr(self, lora.lora_name)
                loras.clear()
        for lora in self.all_loras():
            lora.apply_to()
        self.applied = True

    def unapply(self) -> None:
        """Restore the base modules' own forward (the adapters stay in this network)."""
        for lora in self.all_loras():
            lora.unapply()
        self.applied = False

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: checkpointing is done by the base models."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        for param in self.get_trainable_params():
            param.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def get_trainable_params(self) -> List[torch.nn.Parameter]:
        return [p for lora in self.all_loras() for _, p in lora.trainable_named_parameters()]

    def is_mergeable(self) -> bool:
        return True

    # --- optimizer groups --------------------------------------------------------------------

    def get_lr_weight(self, lora: LoRAModule) -> float:
        if self.block_lr_weight is None:
            return 1.0
        idx = block_index(lora.lora_name, self.is_sdxl)
        return self.block_lr_weight[idx] if 0 <= idx < len(self.block_lr_weight) else 1.0

    @staticmethod
    def _groups(loras: Sequence[LoRAModule], lr: Optional[float], plus_ratio: Optional[float], description: str):
        plain, plus = [], []
        for lora in loras:
            for name, param in lora.trainable_named_parameters():
                (plus if plus_ratio and "lora_up" in name else plain).append(param)
        groups, descriptions = [], []
        for params, group_lr, suffix in ((plain, lr, ""), (plus, lr * plus_ratio if lr and plus_ratio else None, " plus")):
            if not params:
                continue
            if not group_lr:
                logger.info("%s%s: learning rate %s, parameters not trained", description, suffix, group_lr)
                continue
            groups.append({"params": params, "lr": group_lr})
            descriptions.append(description + suffix)
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """(param groups, descriptions). `text_encoder_lr` may be a list: one lr per text encoder."""
        groups, descriptions = [], []

        def add(result):
            groups.extend(result[0])
            descriptions.extend(result[1])

        if self.text_encoder_loras:
            ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
            if isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) > 0:
                lrs = list(text_encoder_lr)
                by_te: Dict[int, List[LoRAModule]] = {}
                for lora in self.text_encoder_loras:
                    by_te.setdefault(lora_names.te_index(lora.lora_name), []).append(lora)
                for i, loras in sorted(by_te.items()):
                    name = "textencoder" if len(by_te) == 1 else f"textencoder {i + 1}"
                    add(self._groups(loras, lrs[min(i, len(lrs) - 1)], ratio, name))
            else:
                if isinstance(text_encoder_lr, (list, tuple)):
                    text_encoder_lr = None
                lr = text_encoder_lr if text_encoder_lr is not None else default_lr
                add(self._groups(self.text_encoder_loras, lr, ratio, "textencoder"))

        if self.unet_loras:
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            lr = unet_lr if unet_lr is not None else default_lr
            if self.block_lr_weight is None:
                add(self._groups(self.unet_loras, lr, ratio, "unet"))
            else:
                by_block: Dict[int, List[LoRAModule]] = {}
                for lora in self.unet_loras:
                    by_block.setdefault(block_index(lora.lora_name, self.is_sdxl), []).append(lora)
                for idx, loras in sorted(by_block.items()):
                    block_lr = None if lr is None else lr * self.get_lr_weight(loras[0])
                    add(self._groups(loras, block_lr, ratio, f"unet_block{idx}"))
        return groups, descriptions

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        if text_encoder_lr is not None and not isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = [text_encoder_lr]
        return self.prepare_optimizer_params(text_encoder_lr or None, unet_lr, default_lr)

    # --- regularisation ----------------------------------------------------------------------

    def apply_max_norm_regularization(self, max_norm_value: float, device) -> Tuple[int, float, float]:
        """Scale down adapters whose ‖scale·ΔW‖ exceeds max_norm; (#scaled, mean norm, max norm)."""
        scaled, norms = 0, []
        with torch.no_grad():
            for lora in self.all_loras():
                down, up = lora.factors()
                delta = lora_delta(down.to(device, torch.float32), up.to(device, torch.float32)) * lora.scale
                raw = delta.norm()
                norm = raw.clamp(min=max_norm_value / 2)  # keeps the ratio finite for tiny updates
                ratio = float(norm.clamp(max=max_norm_value) / norm)
                if ratio != 1.0:
                    scaled += 1
                    lora.scale_factors(math.sqrt(ratio))  # both factors: their product shrinks by ratio
                norms.append(float(raw) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # --- weights -----------------------------------------------------------------------------

    def load_weights(self, file: str):
        """Load a LoRA file non-strictly; returns the (missing_keys, unexpected_keys) info."""
        weights_sd = read_lora_file(file)
        if self.is_sdxl:
            weights_sd = lora_names.sdxl_diffusers_to_sgm(weights_sd, self._unet_config_holder)
        info = self.load_state_dict(weights_sd, strict=False)
        if info.unexpected_keys:
            logger.warning("%s: %d keys match no module of this network, e.g. %s", file,
                           len(info.unexpected_keys), info.unexpected_keys[0])
        return info

    def state_dict_for_save(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        out = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            if dtype is not None:
                value = value.to(dtype, copy=True)  # never a view of a live parameter
            out[key] = value
        return out

    def save_weights(self, file: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> None:
        """.safetensors with metadata + sshs hashes (tensors in the order the hashes assume), else torch.save."""
        state_dict = self.state_dict_for_save(dtype)
        if os.path.splitext(file)[1] == ".safetensors":
            from library.models.safetensors_io import save_tensors

            metadata = {k: str(v) for k, v in (metadata or {}).items()}
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(state_dict, metadata)
            save_tensors({k: state_dict[k] for k in safetensors_order(state_dict)}, file, metadata)
        else:
            from library.models.checkpoint_io import save_pickle_checkpoint

            save_pickle_checkpoint(state_dict, file)

    def merge_to(self, text_encoder, unet, weights_sd: Dict[str, torch.Tensor], dtype=None, device=None) -> None:
        """Add the LoRA in `weights_sd` into the base weights (W += multiplier·scale·ΔW)."""
        if self.is_sdxl:
            weights_sd = lora_names.sdxl_diffusers_to_sgm(weights_sd, self._unet_config_holder)
        apply_te = any(k.startswith(lora_names.PREFIX_TE) for k in weights_sd)
        apply_unet = any(k.startswith(lora_names.PREFIX_UNET) for k in weights_sd)
        per_module: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, rest = key.partition(".")
            per_module.setdefault(name, {})[rest] = value
        loras = (self.text_encoder_loras if apply_te else []) + (self.unet_loras if apply_unet else [])
        merged = 0
        for lora in loras:
            sd = per_module.get(lora.lora_name)
            if sd and "lora_down.weight" in sd and "lora_up.weight" in sd:
                lora.merge_to(sd, dtype, device)
                merged += 1
        logger.info("merged %d LoRA modules", merged)

    # --- generation helpers (gen_img) --------------------------------------------------------

    def backup_weights(self) -> None:
        for lora in self.all_loras():
            org = lora.org_module
            if not hasattr(org, "_lora_org_weight"):
                org._lora_org_weight = org.weight.detach().clone()
                org._lora_restored = True

    def restore_weights(self) -> None:
        for lora in self.all_loras():
            org = lora.org_module
            if not getattr(org, "_lora_restored", True):
                with torch.no_grad():
                    org.weight.copy_(org._lora_org_weight)
                org._lora_restored = True

    def pre_calculation(self) -> None:
        """Merge every adapter into its base weight (restore_weights undoes it) and disable the adapters."""
        for lora in self.all_loras():
            lora.merge_to()
            lora.org_module._lora_restored = False
            lora.enabled = False

    @property
    def _unet_config_holder(self):
        return self._unet_holder[0]


# ----------------------------------------------------------------------------------------------
# plugin functions


def parse_loraplus(network: LoRANetwork, kwargs: dict) -> None:
    network.set_loraplus_lr_ratio(
        _arg(kwargs, "loraplus_lr_ratio", float),
        _arg(kwargs, "loraplus_unet_lr_ratio", float),
        _arg(kwargs, "loraplus_text_encoder_lr_ratio", float),
    )


def build_network(network_class, multiplier, network_dim, network_alpha, text_encoder, unet,
                  neuron_dropout=None, kwargs: Optional[dict] = None, module_kwargs: Optional[dict] = None):
    """create_network for LoRANetwork and its subclasses (DyLoRA, LoRA-FA)."""
    kwargs = kwargs or {}
    unknown = sorted(set(kwargs) - KNOWN_ARGS - set(module_kwargs or {}))
    if unknown:
        logger.warning("--network_args %s: not used by %s", ", ".join(unknown), network_class.__name__)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    is_sdxl = is_sdxl_unet(unet)
    conv_dim = _arg(kwargs, "conv_dim", int)
    conv_alpha = _arg(kwargs, "conv_alpha", float, 1.0 if conv_dim else None)
    block_lr_weight = block_lr_weights(is_sdxl, kwargs)
    dims = alphas = conv_dims = conv_alphas = None
    # sd-scripts reads conv_block_dims only together with block_dims or lr weights; alone it counts too.
    if any(kwargs.get(k) is not None for k in ("block_dims", "conv_block_dims")) or block_lr_weight is not None:
        n = num_blocks(is_sdxl)
        dims, alphas, conv_dims, conv_alphas = block_dims_and_alphas(kwargs, n, network_dim, network_alpha,
                                                                     conv_dim, conv_alpha)
        if block_lr_weight is not None:
            # A block that does not learn gets no modules at all.
            for i, weight in enumerate(block_lr_weight):
                if weight == 0:
                    dims[i] = 0
                    if conv_dims is not None:
                        conv_dims[i] = 0
    network = network_class(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=neuron_dropout, rank_dropout=_fraction(kwargs, "rank_dropout"),
        module_dropout=_fraction(kwargs, "module_dropout"), conv_lora_dim=conv_dim, conv_alpha=conv_alpha,
        block_dims=dims, block_alphas=alphas, conv_block_dims=conv_dims, conv_block_alphas=conv_alphas,
        block_lr_weight=block_lr_weight, module_kwargs=module_kwargs,
    )
    parse_loraplus(network, kwargs)
    return network


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """The trainer's entry point. `text_encoder`: one model or [te1, te2]; kwargs: --network_args strings."""
    return build_network(LoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                         neuron_dropout, kwargs)


def dims_from_weights(weights_sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Rank (lora_down rows) and alpha (missing ⇒ rank) of every module in a LoRA state dict."""
    dims, alphas = {}, {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            alphas[name] = float(value)
        elif rest == "lora_down.weight":
            dims[name] = int(value.shape[0])
    return dims, {name: alphas.get(name, float(dim)) for name, dim in dims.items()}


def build_network_from_weights(network_class, multiplier, file, text_encoder, unet, weights_sd=None,
                               kwargs: Optional[dict] = None, module_kwargs: Optional[dict] = None):
    kwargs = kwargs or {}
    if weights_sd is None:
        weights_sd = read_lora_file(file)
    if is_sdxl_unet(unet):
        weights_sd = lora_names.sdxl_diffusers_to_sgm(weights_sd, unet)
    dims, alphas = dims_from_weights(weights_sd)
    if not dims:
        raise UserError(f"{file or 'weights'}: no LoRA tensors (`*.lora_down.weight`); LyCORIS/LoHa files need "
                        f"their own network module")
    network = network_class(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                            module_kwargs=module_kwargs)
    network.unmatched_modules = sorted(set(dims) - set(network._modules))
    if network.unmatched_modules:
        logger.warning("%s: %d LoRA modules match nothing in this model, e.g. %s (wrong base model family?)",
                       file or "weights", len(network.unmatched_modules), network.unmatched_modules[0])
    parse_loraplus(network, kwargs)
    return network, weights_sd


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network shaped like the file (ranks and alphas from its tensors); weights are not loaded.

    Returns (network, weights_sd). `for_inference` needs no other module class here.
    """
    return build_network_from_weights(LoRANetwork, multiplier, file, text_encoder, unet, weights_sd, kwargs)
