"""resize_lora.py: change the rank of a LoRA by SVD, to a fixed rank or per module by a dynamic rule.

Per module: `P = up·down` in float32 (the change without its scale), its SVD (through the factors,
exact, without forming P: `networks.lora_svd.svd_of_product`), keep k singular directions
(`networks.lora_svd.select_rank`), `up = U_k·S_k`, `down = Vh_k`, and the new alpha `scale·k`, so the
change the module applies (`alpha/rank · up·down`) stays the best rank-k approximation of the old one.
Factor pairs are found as `lora_down`/`lora_up` (sd-scripts), `lora_A`/`lora_B` (PEFT) or `down`/`up`
(ControlLoRA) with `.weight` or bare; a LoCon Tucker core (`lora_mid`) is folded in. Other keys are
copied. Fixes over sd-scripts: dynamic ranks are the smallest meeting the rule, a fixed rank never
exceeds the old rank or the matrix, 1×1 convs use `--new_rank` (they are not `conv_dim` modules), and
`ss_network_dim/alpha/args`, ModelSpec and the hashes describe the file written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from library.errors import UserError
from library.models import modelspec, network_deltas
from networks import lora_files, lora_svd

logger = logging.getLogger(__name__)

PAIRS = (("lora_down", "lora_up"), ("lora_A", "lora_B"), ("down", "up"))


@dataclass
class Pair:
    module: str
    down_key: str
    up_key: str
    mid_key: Optional[str] = None


@dataclass
class ResizeResult:
    tensors: Dict[str, torch.Tensor]
    old_max_rank: int
    fro_retained: List[float] = field(default_factory=list)


def find_pairs(tensors: Dict[str, torch.Tensor], path: str) -> List[Pair]:
    lycoris = [k for k in tensors if ".hada_" in k or ".lokr_" in k]
    if lycoris:
        raise UserError(f"{path}: holds LyCORIS LoHa/LoKr modules (e.g. {lycoris[0]}); resize_lora.py takes LoRA "
                        "files (lora_down/lora_up, lora_A/lora_B or down/up pairs)")
    pairs = []
    for key in tensors:
        parts = key.split(".")
        for down, up in PAIRS:
            if len(parts) >= 2 and parts[-2] == down and parts[-1] == "weight":
                module, suffix = ".".join(parts[:-2]), ".weight"
            elif parts[-1] == down and len(parts) >= 2:
                module, suffix = ".".join(parts[:-1]), ""
            else:
                continue
            up_key = f"{module}.{up}{suffix}"
            if up_key in tensors:
                mid = f"{module}.lora_mid.weight"
                pairs.append(Pair(module, key, up_key, mid if mid in tensors else None))
            break
    if not pairs:
        raise UserError(f"{path}: no LoRA factor pairs (lora_down/lora_up, lora_A/lora_B, down/up); not a LoRA file")
    return pairs


def _svd(tensors, pair: Pair, device):
    """(shape of the layer weight, U, S, Vh of up·down): through the factors, or for a Tucker core
    through the formed product."""
    parts = {"lora_down.weight": tensors[pair.down_key], "lora_up.weight": tensors[pair.up_key]}
    if pair.mid_key:
        parts["lora_mid.weight"] = tensors[pair.mid_key]
    shape = network_deltas.delta_shape(parts, pair.module)
    if pair.mid_key:
        return (shape, *lora_svd.svd(network_deltas.delta_weight(parts, shape, pair.module, device), device))
    up, down = parts["lora_up.weight"].flatten(1), parts["lora_down.weight"].flatten(1)
    return (shape, *lora_svd.svd_of_product(up, down, device))


def resize(tensors: Dict[str, torch.Tensor], path: str, new_rank: int, new_conv_rank: Optional[int],
           method: Optional[str] = None, param: Optional[float] = None, device=None, verbose: bool = False,
           progress: bool = True) -> ResizeResult:
    from tqdm import tqdm

    pairs = find_pairs(tensors, path)
    replaced = {k for p in pairs for k in (p.down_key, p.up_key, p.mid_key) if k}
    out = {k: v for k, v in tensors.items() if k not in replaced}
    result = ResizeResult(out, max(int(tensors[p.down_key].shape[0]) for p in pairs))
    for pair in tqdm(pairs, desc="resizing", unit="module", disable=not progress or verbose):
        old_rank = int(tensors[pair.down_key].shape[0])
        alpha_key = f"{pair.module}.alpha"
        alpha = float(tensors[alpha_key]) if alpha_key in tensors else float(old_rank)
        scale = (alpha or old_rank) / old_rank
        shape, u, s, vh = _svd(tensors, pair, device)
        kxk = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        cap = (new_conv_rank or new_rank) if kxk else new_rank
        k = lora_svd.select_rank(s, cap, method, param, available=old_rank)
        down, up = lora_svd.factors(u, s, vh, k, shape)
        down_key, up_key = pair.down_key, pair.up_key
        if pair.mid_key:  # the Tucker form becomes a plain k x k LoRA module
            down_key, up_key = f"{pair.module}.lora_down.weight", f"{pair.module}.lora_up.weight"
        out[down_key], out[up_key] = down, up
        out[alpha_key] = torch.tensor(scale * k)
        kept, fro, ratio = lora_svd.retained(s, k)
        result.fro_retained.append(fro)
        if verbose:
            extra = f", dim: {k}, alpha: {scale * k:g}" if method else ""
            print(f"{pair.module:75} | sum(S) retained: {kept:.1%}, fro retained: {fro:.1%}, "
                  f"max(S) ratio: {ratio:0.1f}{extra}")
    if verbose and result.fro_retained:
        values = torch.tensor([v for v in result.fro_retained if v == v], dtype=torch.float64)
        std = float(values.std()) if values.numel() > 1 else 0.0
        print(f"fro retained: mean {float(values.mean()):.1%}, std {std:.1%}")
    return result


def resized_metadata(source: lora_files.LoraFile, tensors: Dict[str, torch.Tensor], save_to: str,
                     new_rank: int, new_conv_rank: Optional[int], method: Optional[str], param: Optional[float],
                     old_max_rank: int) -> Dict[str, str]:
    """The input's metadata with the ranks, network args, comment, ModelSpec title/date of the output."""
    meta = {k: v for k, v in source.metadata.items() if not k.startswith("sshs_")}
    comment = meta.get("ss_training_comment", "")
    if method:
        note = f"Dynamic resize with {method}: {param} from {old_max_rank}"
    else:
        note = f"dimension is resized from {old_max_rank} to {new_rank}"
        if new_conv_rank is not None:
            note += f" (conv: {new_conv_rank})"
    meta["ss_training_comment"] = f"{note}; {comment}" if comment else note
    dim, alpha, conv_dim, conv_alpha = lora_files.rank_summary(tensors)
    meta["ss_network_dim"], meta["ss_network_alpha"] = dim, alpha
    args = _json(meta.get("ss_network_args"))
    if conv_dim is not None or "conv_dim" in args:
        args["conv_dim"], args["conv_alpha"] = conv_dim or "None", conv_alpha or "None"
    if args:
        meta["ss_network_args"] = json.dumps(args)
    meta.setdefault("ss_network_module", "networks.lora")
    family, v_param = lora_files.lora_family([source])
    spec = modelspec.build_metadata(family, v_param, lora_files.title_of(save_to), kind="lora")
    for key, value in spec.items():  # the input's own ModelSpec fields stay; what changed is updated
        if key not in meta or key in ("modelspec.title", "modelspec.date", "modelspec.implementation_version"):
            meta[key] = value
    return meta


def _json(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def check_rule(method: Optional[str], param: Optional[float]) -> Tuple[Optional[str], Optional[float]]:
    if method is None:
        if param is not None:
            raise UserError("--dynamic_param needs --dynamic_method")
        return None, None
    if param is None or param <= 0:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param > 0")
    if method in ("sv_fro", "sv_cumulative") and param > 1:
        raise UserError(f"--dynamic_param {param}: {method} takes a share between 0 and 1")
    if method == "sv_ratio" and param < 1:
        raise UserError(f"--dynamic_param {param}: sv_ratio takes a ratio of at least 1 (largest / kept singular value)")
    return method, param
