"""Weight changes held in LoRA and LyCORIS files, computed from their factors with the plain formulas.

A network file stores, per adapted layer (`<module name>.<tensor>`), the factors of a change ΔW of
that layer's weight. This module turns one module's tensors into `scale·ΔW`, shaped like the layer's
weight, for every file form in use:

| kind  | tensors                                                   | ΔW                                   | scale      |
|-------|-----------------------------------------------------------|--------------------------------------|------------|
| lora  | `lora_down.weight`, `lora_up.weight` (+`lora_mid.weight`) | up∘down (Tucker core between)        | alpha / r  |
| loha  | `hada_w1_a/b`, `hada_w2_a/b` (+`hada_t1/t2`)              | (w1_a·w1_b) ⊙ (w2_a·w2_b)            | alpha / r  |
| lokr  | `lokr_w1` or `lokr_w1_a/b`; `lokr_w2` or `lokr_w2_a/b` (+`lokr_t2`) | w1 ⊗ w2                    | alpha / r, 1 when neither factor is decomposed |
| full  | `diff` (+`diff_b`)                                        | diff                                 | 1          |

`lora` covers sd-scripts' LoRA (LierLa, C3Lier), DyLoRA and LoRA-FA files and LyCORIS' LoCon; r is
the rank (rows of `lora_down`, rows of `hada_w1_b`, columns of `lokr_w1_a`/`lokr_w2_a`) and alpha
the module's `alpha` (the rank when absent or zero). Each module's scale is applied once: the LoKr
and LoHa `merge_to` of lycoris-lora 3.4.0 multiplies by it a second time (its factors' product is
already scaled), so a merged LyCORIS file there gets alpha/r times the change its dynamic forward
applies; ComfyUI and AUTOMATIC1111 use the plain formulas, as here. A `dora_scale` tensor (DoRA,
weight decomposition) rescales the merged weight's columns or rows to the stored norms
(`merge_weight`). Everything is computed in float32.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from library.errors import UserError

LORA, LOHA, LOKR, FULL = "lora", "loha", "lokr", "full"
# Tensor names of the module kinds this module cannot turn into a weight change, with their names.
_UNSUPPORTED = (
    (("oft_blocks", "oft_diag"), "OFT/BOFT (orthogonal fine-tuning)"),
    (("on_input",), "(IA)^3"),
    (("a1.weight", "a2.weight", "b1.weight", "b2.weight"), "GLoRA"),
    (("w_norm", "b_norm"), "norm-layer"),
)


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW = up ∘ down, shaped like the base weight ([out, in] or [out, in, k, k])."""
    if down.dim() == 2:
        return up.flatten(1) @ down
    if up.dim() == 2 or up.shape[2:] == (1, 1):
        # a 1x1 up only mixes channels: k x k down then up is one matrix product over [in·k·k]
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def fit_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Reshape [r, in] <-> [r, in, 1, 1] when a file and a model disagree only by 1x1 dims.

    SD2 models loaded from single files by kohya use 1x1 conv projections, ours use Linear.
    """
    shape = tuple(shape)
    if tuple(t.shape) == shape or t.numel() != math.prod(shape):
        return t
    squeeze = lambda s: tuple(d for i, d in enumerate(s) if not (i >= 2 and d == 1))  # noqa: E731
    if squeeze(t.shape) == squeeze(shape):
        return t.reshape(shape)
    return t


def group_modules(tensors: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """`{module name: {tensor name: tensor}}` from a network file's `<module>.<tensor>` keys."""
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, dot, rest = key.partition(".")
        if dot:
            modules.setdefault(name, {})[rest] = value
    return modules


def module_kind(parts: Dict[str, torch.Tensor], name: str = "module") -> str:
    """lora | loha | lokr | full, or a UserError naming a form with no weight-change formula here."""
    if "lora_down.weight" in parts and "lora_up.weight" in parts:
        return LORA
    if all(f"hada_w{i}_{s}" in parts for i in (1, 2) for s in "ab"):
        return LOHA
    if ("lokr_w1" in parts or "lokr_w1_a" in parts) and ("lokr_w2" in parts or "lokr_w2_a" in parts):
        return LOKR
    if "diff" in parts:
        return FULL
    for keys, title in _UNSUPPORTED:
        if any(k in parts for k in keys):
            raise UserError(f"{name}: a {title} module; only LoRA/LoCon, LoHa, LoKr and full-weight (diff) "
                            "modules can be merged into weights")
    raise UserError(f"{name}: unknown network module tensors {sorted(parts)}; not a LoRA or LyCORIS module")


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32)


def _alpha(parts: Dict[str, torch.Tensor], rank: int) -> float:
    alpha = parts.get("alpha")
    if alpha is None:
        return float(rank)
    alpha = float(alpha.detach().float())
    return float(rank) if alpha == 0 else alpha


def module_rank(parts: Dict[str, torch.Tensor], kind: Optional[str] = None) -> Optional[int]:
    """The rank r of `alpha / r` (None for forms without one)."""
    kind = kind or module_kind(parts)
    if kind == LORA:
        return int(parts["lora_down.weight"].shape[0])
    if kind == LOHA:
        return int(parts["hada_w1_b"].shape[0])
    if kind == LOKR:  # `_b` is [r, ...] with and without a Tucker core; both factors share r
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in parts:
                return int(parts[key].shape[0])
        return None  # neither factor decomposed: the product is the change itself
    return None


def module_scale(parts: Dict[str, torch.Tensor], kind: Optional[str] = None) -> float:
    """alpha / r of the module (1 for forms without a rank)."""
    kind = kind or module_kind(parts)
    rank = module_rank(parts, kind)
    return 1.0 if rank is None else _alpha(parts, rank) / rank


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] from a core [r, r, k, k] and mode factors a [r, out], b [r, in]."""
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def _raw_delta(parts: Dict[str, torch.Tensor], kind: str, device) -> torch.Tensor:
    """ΔW before scaling, in whatever shape the factors give (fitted to the layer by the caller)."""
    g = lambda key: _f32(parts[key], device)  # noqa: E731
    if kind == LORA:
        down, up = g("lora_down.weight"), g("lora_up.weight")
        if "lora_mid.weight" in parts:  # LoCon Tucker: 1x1 down, k x k core, 1x1 up
            return _tucker(g("lora_mid.weight"), up.flatten(1).t(), down.flatten(1))
        if down.dim() == 4 and up.dim() == 2:
            up = up[:, :, None, None]
        return lora_delta(down, up)
    if kind == LOHA:
        if "hada_t1" in parts:
            return (_tucker(g("hada_t1"), g("hada_w1_a"), g("hada_w1_b"))
                    * _tucker(g("hada_t2"), g("hada_w2_a"), g("hada_w2_b")))
        return (g("hada_w1_a") @ g("hada_w1_b")) * (g("hada_w2_a") @ g("hada_w2_b"))
    if kind == LOKR:
        w1 = g("lokr_w1") if "lokr_w1" in parts else g("lokr_w1_a") @ g("lokr_w1_b")
        if "lokr_w2" in parts:
            w2 = g("lokr_w2")
        elif "lokr_t2" in parts:
            w2 = _tucker(g("lokr_t2"), g("lokr_w2_a"), g("lokr_w2_b"))
        else:
            w2 = g("lokr_w2_a") @ g("lokr_w2_b").flatten(1)
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1.contiguous(), w2.contiguous())
    return g("diff")


def _squeezed(shape) -> tuple:
    return tuple(d for i, d in enumerate(shape) if not (i >= 2 and d == 1))


def _fits(raw: tuple, shape: tuple, kind: str) -> bool:
    """Whether a change of shape `raw` can be reshaped to `shape` (see `fit_shape`; LyCORIS keeps
    the conv factors of LoHa/LoKr flattened to [out, in·k·k])."""
    if raw == shape:
        return True
    if math.prod(raw) != math.prod(shape):
        return False
    return _squeezed(raw) == _squeezed(shape) or (kind in (LOHA, LOKR) and raw[0] == shape[0])


def _fit(delta: torch.Tensor, shape: tuple, kind: str) -> Optional[torch.Tensor]:
    return delta.reshape(shape) if _fits(tuple(delta.shape), shape, kind) else None


def _misfit(name: str, delta_shape, shape) -> UserError:
    return UserError(f"{name}: its weight change has shape {tuple(delta_shape)}, the model's layer "
                     f"{tuple(shape)}; the file was made for another model")


def _raw_shape(parts: Dict[str, torch.Tensor], kind: str) -> Tuple[int, ...]:
    """The shape `_raw_delta` returns, from the factors' shapes alone."""
    s = {k: tuple(v.shape) for k, v in parts.items()}
    if kind == LORA:
        down, up = s["lora_down.weight"], s["lora_up.weight"]
        if "lora_mid.weight" in s:
            return (up[0], down[1], *s["lora_mid.weight"][2:])
        return (up[0], *down[1:])
    if kind == LOHA:
        if "hada_t1" in s:
            return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
        return (s["hada_w1_a"][0], s["hada_w1_b"][1])
    if kind == LOKR:
        w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        elif "lokr_t2" in s:
            w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
        else:
            w2 = (s["lokr_w2_a"][0], math.prod(s["lokr_w2_b"][1:]))
        w1 = w1 + (1,) * (len(w2) - len(w1))
        return tuple(a * b for a, b in zip(w1, w2))
    return s["diff"]


def delta_shape(parts: Dict[str, torch.Tensor], name: str = "module") -> Tuple[int, ...]:
    """The shape of the factors' product (a LoRA's layer shape; LyCORIS LoHa/LoKr give conv changes
    flattened to [out, in·k·k] unless a Tucker core carries the kernel)."""
    return tuple(_raw_shape(parts, module_kind(parts, name)))


def check_fits(parts: Dict[str, torch.Tensor], shape: Iterable[int], name: str = "module") -> None:
    """A UserError when the module's change cannot take the shape of a layer weight of `shape`
    (shapes only: nothing is computed)."""
    shape = tuple(shape)
    kind = module_kind(parts, name)
    raw = tuple(_raw_shape(parts, kind))
    if not _fits(raw, shape, kind):
        raise _misfit(name, raw, shape)


def delta_weight(parts: Dict[str, torch.Tensor], shape: Iterable[int], name: str = "module",
                 device=None) -> torch.Tensor:
    """scale·ΔW of one module in float32, shaped like a layer weight of `shape`."""
    shape = tuple(shape)
    kind = module_kind(parts, name)
    raw = _raw_delta(parts, kind, device)
    delta = _fit(raw, shape, kind)
    if delta is None:
        raise _misfit(name, raw.shape, shape)
    scale = module_scale(parts, kind)
    return delta * scale if scale != 1.0 else delta


def delta_bias(parts: Dict[str, torch.Tensor], device=None) -> Optional[torch.Tensor]:
    """The bias change of a full-weight module (`diff_b`), else None."""
    bias = parts.get("diff_b")
    return None if bias is None else _f32(bias, device)


def _dora(weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """weight · dora_scale / ‖weight‖, the norm taken per output row or per input column as the
    stored scale's shape says (LyCORIS writes [out, 1, ...] or [1, in, ...])."""
    scale = dora_scale.to(weight.device, torch.float32)
    if scale.shape[0] == weight.shape[0] and scale.numel() == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(scale.shape)
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(scale.shape)
    return weight * (scale / (norm + torch.finfo(torch.float32).eps))


def merge_weight(weight: torch.Tensor, parts: Dict[str, torch.Tensor], multiplier: float,
                 name: str = "module") -> torch.Tensor:
    """weight + multiplier·scale·ΔW in float32 (a new tensor); with DoRA, the weight moved by
    `multiplier` of the way from the base to the decomposed result, as ComfyUI merges it."""
    base = weight.detach().to(torch.float32)
    delta = delta_weight(parts, base.shape, name, base.device)
    if "dora_scale" not in parts:
        return base + delta * multiplier
    return base + multiplier * (_dora(base + delta, parts["dora_scale"]) - base)
