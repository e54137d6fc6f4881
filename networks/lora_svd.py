"""Low-rank factors of a weight change by SVD, for the SVD merge, resize and extraction tools.

A change given as factors (a LoRA, a sum of LoRAs) is decomposed through QR of its factors
(`svd_of_product`), exactly and without forming the full matrix; a dense change (extraction, a
full-weight module) through a plain SVD.

`factorize` returns the best rank-k approximation of ΔW in the Frobenius norm (Eckart-Young):
`up = U_k·diag(S_k)`, `down = Vh_k`, in sd-scripts' layout (k×k convs: down [k, in, kh, kw], up
[out, k, 1, 1]; the kernel is flattened into the input side). The SVD runs in float32 on the
device asked for (CUDA with `--device cuda`), one layer at a time. `select_rank` picks k for a fixed
target or by one of resize_lora.py's dynamic rules, as the smallest rank that meets the rule
(sd-scripts' counts are one higher, PR #2194) and never more than the change's own rank.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def svd(delta: torch.Tensor, device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ΔW flattened to [out, in·kh·kw], in float32 on `device`."""
    matrix = delta.detach().to(device=device, dtype=torch.float32).reshape(delta.shape[0], -1)
    return torch.linalg.svd(matrix, full_matrices=False)


def svd_of_product(up: torch.Tensor, down: torch.Tensor, device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of up @ down (up [out, r], down [r, n]) without forming it when r is below both
    sizes: with up = Q1·R1 and downᵀ = Q2·R2, up·down = Q1·(R1·R2ᵀ)·Q2ᵀ, so the SVD of the r×r
    middle gives the exact singular values and vectors at O((out+n)·r²) cost."""
    up = up.detach().to(device=device, dtype=torch.float32)
    down = down.detach().to(device=device, dtype=torch.float32)
    r = up.shape[1]
    if r >= min(up.shape[0], down.shape[1]):
        return torch.linalg.svd(up @ down, full_matrices=False)
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.t())
    u, s, vh = torch.linalg.svd(r1 @ r2.t())
    return q1 @ u, s, vh @ q2.t()


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation, without its input-size limit."""
    flat = values.flatten().sort().values
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    return flat[lo] + (pos - lo) * (flat[hi] - flat[lo])


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, shape,
            clamp_quantile: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of rank k shaped for a layer weight of `shape`, on the CPU in float32.

    clamp_quantile: both factors clipped to ± that quantile of their joint entries (extraction's
    outlier guard; 1 or None leaves the optimum untouched)."""
    up = u[:, :k] * s[:k]
    down = vh[:k]
    if clamp_quantile is not None and clamp_quantile < 1:
        bound = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    if len(shape) == 4:
        down = down.reshape(k, shape[1], shape[2], shape[3])
        up = up.reshape(shape[0], k, 1, 1)
    return down.cpu().contiguous(), up.cpu().contiguous()


def select_rank(s: torch.Tensor, cap: int, method: Optional[str] = None, param: Optional[float] = None,
                available: Optional[int] = None) -> int:
    """k for singular values `s` (descending): `cap` (fixed), or the smallest rank meeting a dynamic
    rule, capped at `cap`. Never above `available` (the change's rank) or len(s); at least 1."""
    n = s.numel()
    limit = min(cap, n, available or n)
    if n == 0 or float(s[0]) <= 1e-12:
        return 1
    if method is None:
        return max(1, limit)
    s = s.double()
    if method == "sv_ratio":  # keep the singular values above s0 / param
        k = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":  # share of the sum of singular values
        k = int(torch.searchsorted(s.cumsum(0) / s.sum(), torch.tensor([param], dtype=s.dtype))) + 1
    elif method == "sv_fro":  # share of the Frobenius norm
        energy = ((s * s).cumsum(0) / (s * s).sum()).sqrt()
        k = int(torch.searchsorted(energy, torch.tensor([param], dtype=s.dtype))) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    return max(1, min(k, limit))


def retained(s: torch.Tensor, k: int) -> Tuple[float, float, float]:
    """(share of Σ|S| kept, share of the Frobenius norm kept, S0/S_{k-1}) for `--verbose`."""
    s = s.double().abs()
    total, total_sq = float(s.sum()), float((s * s).sum())
    kept = float(s[:k].sum()) / total if total else 1.0
    fro = (float((s[:k] * s[:k]).sum()) / total_sq) ** 0.5 if total_sq else 1.0
    ratio = float(s[0] / s[k - 1]) if float(s[k - 1]) else float("inf")
    return kept, fro, ratio
