"""Averaging the gradients of one optimizer step over its micro-batches and over processes.

The loop reduces gradients itself, after the backward passes of a step, instead of wrapping the
model in DistributedDataParallel: any module layout works (patched forwards, LoRA injected into
frozen layers, third-party network modules), and a step's micro-batches need no `no_sync` context.

Two rules matter for training results:

* A tensor that got no gradient in any process keeps none, so the optimizer leaves it alone (no
  weight decay on modules the forward never runs, such as the text encoder's last layer with
  `--clip_skip 2`). A tensor that got one in some processes only counts as zero in the others.
* Every process divides by the step's micro-batch count over all processes before the sum, so the
  result is the mean even when processes ran different numbers of micro-batches, and half-precision
  gradients (`--full_fp16`, `--full_bf16`) are summed at the scale of the mean, not P times it.

The reduction runs in the gradients' own dtype, in buckets of at most `BUCKET_BYTES` (one copy of
a bucket at a time, not of every gradient), so the extra memory stays small even for a full
fine-tune of SDXL.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

BUCKET_BYTES = 64 << 20  # per all-reduce call; large enough that call latency is negligible


def average_gradients(params: Sequence[torch.Tensor], micro_batches: int, num_processes: int = 1,
                      bucket_bytes: int = BUCKET_BYTES) -> None:
    """Turn the summed gradients of this process's `micro_batches` into the step's mean over all
    micro-batches of all `num_processes` processes (each process calls this with the same `params`)."""
    count = float(micro_batches)
    if num_processes > 1:
        count = _agree_on_gradients(params, count)
    grads = [p.grad for p in params if p.grad is not None]
    if count > 1 and grads:  # one micro-batch in all: the sum is the mean already
        torch._foreach_div_(grads, count)
    if num_processes > 1:
        _all_reduce_in_buckets(grads, bucket_bytes)


def _agree_on_gradients(params: Sequence[torch.Tensor], count: float) -> float:
    """One small all-reduce: which tensors got a gradient in any process (those get a zero gradient
    where they have none, so every process reduces the same tensors in the same order) and the
    micro-batch count of all processes, which this returns."""
    import torch.distributed as dist

    device = next((p.device for p in params), torch.device("cpu"))
    flags = torch.tensor([float(p.grad is not None) for p in params] + [count], dtype=torch.float32, device=device)
    dist.all_reduce(flags)
    *used, total = flags.tolist()
    for p, anywhere in zip(params, used):
        if anywhere and p.grad is None:
            p.grad = torch.zeros_like(p)
    return total


def buckets(grads: Sequence[torch.Tensor], bucket_bytes: int) -> List[List[torch.Tensor]]:
    """Consecutive gradients grouped by dtype and device, each group at most `bucket_bytes` (a
    larger tensor is a group of its own)."""
    groups: List[List[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = groups[-1] if groups else None
        if last is None or last[0].dtype != g.dtype or last[0].device != g.device or size + nbytes > bucket_bytes:
            groups.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return groups


def _all_reduce_in_buckets(grads: Sequence[torch.Tensor], bucket_bytes: int) -> None:
    import torch.distributed as dist

    for group in buckets(grads, bucket_bytes):
        if len(group) == 1 and group[0].is_contiguous():
            dist.all_reduce(group[0])  # in place, no copy
            continue
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
