"""Read and write Textual Inversion embedding files, in every format in use.

What we write is what sd-scripts writes (spec: textual-inversion-and-lllite.md §1.2):
* SD1/SD2: `{"emb_params": E}`, E = [N, 768] (SD1) / [N, 1024] (SD2);
* SDXL: `{"clip_l": E1, "clip_g": E2}`, [N, 768] and [N, 1280];
as safetensors (with modelspec metadata) or as a torch pickle (`.pt` / `.ckpt`). AUTOMATIC1111 loads
both: a one-tensor dict is its "diffusers concept" case, clip_l + clip_g its SDXL case. A1111's own
pickle layout (`string_to_param`, `name`, `step`, ...) can be written too (`save_embedding(style="a1111")`).

What we read (sd-scripts' `load_weights` rules, plus the generator's needs):
* SD1/SD2: the first tensor of the file, after unwrapping A1111's `string_to_param` (also an old
  torch `ParameterDict`); this covers diffusers' `learned_embeds` (`{token: [C]}`) too. A 1-D tensor
  is one vector.
* SDXL: `clip_l` and/or `clip_g`.
Pickles are opened with torch's weights-only loader, so no code in a downloaded file can run.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch

from library.models import safetensors_io
from library.models.checkpoint_io import sniff_format, torch_load_safely
from library.errors import UserError

logger = logging.getLogger(__name__)

SD_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")
A1111_STRING_TO_TOKEN = 265  # the id A1111 stores; it re-tokenises by file name when loading
STYLES = ("sd-scripts", "a1111")


# ---------------------------------------------------------------------------------------------
# reading


def _torch_load(path: str) -> object:
    # A1111 files from torch ≤ 1.11 pickled `string_to_param` as a ParameterDict module; allowing
    # that one class (its state is plain tensors) keeps the loader weights-only.
    return torch_load_safely(path, what="embedding", allow=(torch.nn.ParameterDict,))


def _unwrap_a1111(data: object) -> object:
    if isinstance(data, dict) and "string_to_param" in data:
        inner = data["string_to_param"]
        return getattr(inner, "_parameters", inner)  # torch 1.11 ParameterDict
    return data


def read_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of an embedding file as a flat dict, in file order, A1111's wrapper removed."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: embedding file not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: the embedding file is empty (0 bytes); re-download or re-save it")
    if sniff_format(path) == "safetensors":
        header = safetensors_io.read_header(path)
        tensors = safetensors_io.load_tensors(path, header=header)
        return {name: tensors[name] for name in header.tensors}  # header order, not data order
    data = _unwrap_a1111(_torch_load(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: not an embedding file (holds a {type(data).__name__}, not a dict of tensors)")
    tensors = {str(k): v.detach() for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors; it is not an embedding file")
    return tensors


def _as_rows(path: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or not tensor.is_floating_point():
        raise UserError(f"{path}: tensor {key!r} of shape {list(tensor.shape)} is not a list of embedding vectors")
    return tensor


def load_embedding(
    path: str, sdxl: bool, widths: Optional[Sequence[int]] = None, require_all: bool = False
) -> List[Optional[torch.Tensor]]:
    """One [N, C] tensor per text encoder (SDXL: [clip_l, clip_g], None where the file has none).

    widths: the text encoders' embedding widths; a file that does not fit is a UserError naming it.
    require_all: SDXL files must hold both encoders' vectors (the generator needs both).
    """
    tensors = read_tensors(path)
    if sdxl:
        found = [tensors.get(k) for k in SDXL_KEYS]
        if all(t is None for t in found) or (require_all and any(t is None for t in found)):
            need = "clip_l and clip_g" if require_all else "clip_l and/or clip_g"
            raise UserError(f"{path}: not an SDXL embedding (needs {need} tensors, has {sorted(tensors)}); "
                            "use an embedding made for SDXL")
        vectors = [None if t is None else _as_rows(path, k, t) for k, t in zip(SDXL_KEYS, found)]
    else:
        if any(k in tensors for k in SDXL_KEYS) and SD_KEY not in tensors:
            raise UserError(f"{path}: is an SDXL embedding (clip_l/clip_g), not one for SD1/SD2; "
                            "use an embedding made for this model")
        key = SD_KEY if SD_KEY in tensors else next(iter(tensors))
        vectors = [_as_rows(path, key, tensors[key])]
    present = [v for v in vectors if v is not None]
    if len({v.shape[0] for v in present}) > 1:
        raise UserError(f"{path}: clip_l and clip_g hold different numbers of vectors "
                        f"({vectors[0].shape[0]} and {vectors[1].shape[0]}); the file is inconsistent")
    if widths is not None:
        _check_widths(path, vectors, widths)
    return vectors


def _check_widths(path: str, vectors: Sequence[Optional[torch.Tensor]], widths: Sequence[int]) -> None:
    for i, (vector, width) in enumerate(zip(vectors, widths)):
        if vector is not None and vector.shape[1] != width:
            which = f" for text encoder {i + 1}" if len(widths) > 1 else ""
            raise UserError(
                f"{path}: its vectors are {vector.shape[1]} wide{which}, but this model's text encoder takes "
                f"{width}-wide vectors; use an embedding made for this model family"
            )


# ---------------------------------------------------------------------------------------------
# writing


def embedding_dict(vectors: Sequence[torch.Tensor], sdxl: bool) -> Dict[str, torch.Tensor]:
    """sd-scripts' layout: {"emb_params": E} or {"clip_l": E1, "clip_g": E2}."""
    if sdxl:
        if len(vectors) != 2:
            raise ValueError(f"an SDXL embedding needs 2 tensors (clip_l, clip_g), got {len(vectors)}")
        return dict(zip(SDXL_KEYS, vectors))
    if len(vectors) != 1:
        raise ValueError(f"an SD1/SD2 embedding has 1 tensor, got {len(vectors)}")
    return {SD_KEY: vectors[0]}


def _plain(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    # detach() turns a Parameter into a plain Tensor: A1111 recognises a one-tensor dict only when
    # the value's type is exactly torch.Tensor.
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()


def save_embedding(
    path: str,
    vectors: Sequence[torch.Tensor],
    sdxl: bool,
    *,
    metadata: Optional[Dict[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
    style: str = "sd-scripts",
    name: Optional[str] = None,
    step: Optional[int] = None,
) -> None:
    """Write an embedding; the container follows the extension (.safetensors, else a torch pickle).

    metadata: safetensors `__metadata__` (ignored for pickles, as sd-scripts does). style "a1111":
    A1111's pickle dict (SD1/SD2 only) with `name` (default: file stem) and `step`.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    tensors = {k: _plain(v, dtype) for k, v in embedding_dict(vectors, sdxl).items()}
    is_safetensors = path.endswith(".safetensors")
    if style == "a1111":
        if sdxl or is_safetensors:
            raise UserError(f"{path}: A1111's string_to_param layout exists only as a .pt pickle for SD1/SD2; "
                            "save SDXL or .safetensors embeddings in the sd-scripts layout")
        data: object = {
            "string_to_token": {"*": A1111_STRING_TO_TOKEN},
            "string_to_param": {"*": tensors[SD_KEY]},
            "name": name or os.path.splitext(os.path.basename(path))[0],
            "step": step,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
    else:
        data = tensors
    if is_safetensors:
        safetensors_io.save_tensors(tensors, path, metadata)
        return
    with safetensors_io.atomic_path(path) as tmp:
        torch.save(data, tmp)
