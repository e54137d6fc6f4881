"""Weighted sums of checkpoints (tools/merge_models.py), streamed tensor by tensor.

`W = Σ r_i · W_i` per key of the first model, computed in `precision` and written in `save_dtype`
(model-formats.md §8): keys only later models have are skipped; a key some later model lacks counts
that model's ratio on the first model's value, so every key's weights still sum to Σ r_i. Legacy SD1
text-encoder keys (without `text_model.`) are matched with the current ones. With `unet_only` the
VAE and text-encoder keys are copied from the first model. Integer tensors (position ids) are copied,
never averaged, and tensors whose shapes differ stop the merge before anything is written. Memory:
one tensor of each input at a time.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Dict, List, Optional, Sequence

import torch

from library.errors import UserError
from library.models import checkpoint_io, safetensors_io

logger = logging.getLogger(__name__)

_NOT_UNET = ("first_stage_model", "cond_stage_model", "conditioner.")
_LEGACY_TE = "cond_stage_model.transformer."


def normalized_key(key: str) -> str:
    """The key with a legacy SD1 text-encoder path given its `text_model.` level."""
    if key.startswith(_LEGACY_TE) and key[len(_LEGACY_TE):].startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return _LEGACY_TE + "text_model." + key[len(_LEGACY_TE):]
    return key


def weighted_sum(paths: Sequence[str], ratios: Sequence[float], output: str, precision: torch.dtype = torch.float32,
                 save_dtype: torch.dtype = torch.float32, unet_only: bool = False, device="cpu",
                 metadata: Optional[Dict[str, str]] = None, show_skipped: bool = False, progress: bool = True) -> int:
    """Write the weighted sum to `output` (safetensors); returns the number of tensors written."""
    from tqdm import tqdm

    with ExitStack() as stack:
        sources = [stack.enter_context(checkpoint_io.TensorSource(p)) for p in paths]
        first = sources[0]
        names: List[Dict[str, str]] = [{normalized_key(k): k for k in s.names} for s in sources]
        for source, index in zip(sources[1:], names[1:]):
            skipped = [k for k in index if k not in names[0]]
            if skipped:
                logger.info("%s: %d keys not in the first model are skipped%s", source.path, len(skipped),
                            f": {', '.join(skipped)}" if show_skipped else "")
            for key, original in index.items():
                first_key = names[0].get(key)
                if first_key is not None and source.shape(original) != first.shape(first_key):
                    raise UserError(f"{source.path}: {original} has shape {source.shape(original)}, the first model "
                                    f"{first.shape(first_key)}; the checkpoints are different models")

        def out_dtype(key: str) -> torch.dtype:
            dtype = first.dtype(key)
            return save_dtype if dtype.is_floating_point else dtype

        bar = tqdm(total=len(first.names), desc="merging", unit="tensor", disable=not progress)

        def produce(key: str) -> torch.Tensor:
            bar.update(1)
            base = first.read(key)
            if not base.is_floating_point() or (unet_only and any(p in key for p in _NOT_UNET)):
                return base.to(out_dtype(key))
            norm = normalized_key(key)
            total = None
            for source, index, ratio in zip(sources, names, ratios):
                tensor = source.read(index[norm]) if norm in index else base
                term = tensor.to(device=device, dtype=precision) * ratio
                total = term if total is None else total + term
            return total.to("cpu", out_dtype(key))

        entries = [(k, out_dtype(k), first.shape(k)) for k in first.names]
        safetensors_io.write_tensors(output, entries, produce, metadata)
        bar.close()
    return len(entries)
