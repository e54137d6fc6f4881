"""Hashes and `ss_*` metadata helpers for LoRA files, as sd-scripts and the web UIs compute them.

* `sshs_hashes` precomputes the two hashes sd-webui-additional-networks would otherwise compute when
  it indexes a file: `sshs_model_hash` (sha256 of the safetensors data section) and
  `sshs_legacy_hash` (sha256 of bytes 0x100000..0x110000 of the serialisation, 8 hex). Both are
  defined on the bytes the `safetensors` package produces for the state dict with only the `ss_*`
  metadata, so we reproduce its tensor order and header length without building the bytes in memory.
* `legacy_model_hash` / `file_sha256`: A1111's old and new checkpoint hashes (`ss_sd_model_hash`,
  `ss_new_sd_model_hash`, `ss_vae_hash`, `ss_new_vae_hash`).
* small helpers for the string-valued `ss_*` metadata.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from library.models.safetensors_io import DTYPE_NAMES

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000

# The `safetensors` package writes tensors sorted by dtype (this order, widest first), then by name.
_DTYPE_ORDER = ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}

# Kept by `--no_metadata` and by the merge/resize tools.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def _dtype_name(t: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise ValueError(f"dtype {t.dtype} cannot be stored in safetensors") from None


def safetensors_order(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Names in the order the `safetensors` package lays out their data (dtype rank, then name)."""
    return sorted(tensors, key=lambda k: (_DTYPE_RANK[_dtype_name(tensors[k])], k))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _header_bytes(tensors: Mapping[str, torch.Tensor], order: List[str], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length + JSON header that `safetensors.torch.save(tensors, metadata)` writes.

    Its metadata map is a Rust HashMap, so the key order in the real header is random; the length
    (all that matters unless the header reaches 1 MiB) does not depend on it.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _dtype_name(t), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _WindowHash:
    """sha256 of the bytes [start, start+length) of a stream fed piece by piece."""

    def __init__(self, start: int, length: int):
        self.start, self.end = start, start + length
        self.pos = 0
        self.hash = hashlib.sha256()

    def update(self, data) -> None:
        lo, hi = max(self.start, self.pos), min(self.end, self.pos + len(data))
        if lo < hi:
            self.hash.update(data[lo - self.pos: hi - self.pos])
        self.pos += len(data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> Tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a state dict about to be saved with `metadata`.

    Only `ss_*` metadata enters the serialisation: user-editable keys (modelspec, sshs) would
    otherwise change the hash. Streams tensor by tensor; no file-sized buffer is made.
    """
    ss_meta = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    order = safetensors_order(tensors)
    model = hashlib.sha256()
    legacy = _WindowHash(LEGACY_OFFSET, LEGACY_LENGTH)
    legacy.update(_header_bytes(tensors, order, ss_meta))
    for name in order:
        data = _tensor_bytes(tensors[name])
        model.update(data)
        if legacy.pos < legacy.end:
            legacy.update(data)
    return model.hexdigest(), legacy.hexdigest()[:8]


def legacy_model_hash(path: str) -> str:
    """A1111's old model hash: sha256 of bytes 0x100000..0x110000 of the file, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]


def file_sha256(path: str, block: int = 1 << 20) -> str:
    """sha256 of the whole file (A1111's new model hash), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_data_sha256(path: str) -> str:
    """sha256 of a safetensors file's data section: what the indexers compare `sshs_model_hash` with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# ss_* values


def stringify(metadata: Mapping[str, object]) -> Dict[str, str]:
    """Every value as `str(v)`, the way sd-scripts writes them ("None", "True", "(512, 512)")."""
    return {k: str(v) for k, v in metadata.items()}


def base_model_version(family, v_parameterization: bool) -> str:
    """`ss_base_model_version`: sd_v1, sd_v2 (+ `_v` for v-prediction), sdxl_base_v1-0."""
    if family.is_sdxl:
        return "sdxl_base_v1-0"
    base = "sd_v2" if family.v2 else "sd_v1"
    return base + ("_v" if v_parameterization else "")


def minimum_metadata(metadata: Mapping[str, str]) -> Dict[str, str]:
    """The `ss_*` keys that `--no_metadata` and the LoRA tools keep."""
    return {k: metadata[k] for k in MINIMUM_KEYS if k in metadata}


def dims_and_alphas(weights_sd: Mapping[str, torch.Tensor]) -> Tuple[str, str]:
    """(`ss_network_dim`, `ss_network_alpha`) of a LoRA state dict; "Dynamic" when modules differ."""
    dims, alphas = set(), set()
    for key, value in weights_sd.items():
        if key.endswith(".lora_down.weight"):
            dims.add(int(value.shape[0]))
        elif key.endswith(".alpha"):
            alphas.add(float(value))
    dim = str(dims.pop()) if len(dims) == 1 else "Dynamic"
    if len(alphas) == 1:
        alpha = alphas.pop()
        alpha_str = str(int(alpha)) if alpha.is_integer() else str(alpha)
    else:
        alpha_str = "Dynamic"
    return dim, alpha_str


def network_args_metadata(network_args: Optional[Iterable[str]]) -> Optional[str]:
    """`ss_network_args`: JSON of the `k=v` strings given with `--network_args` (values stay strings)."""
    if not network_args:
        return None
    parsed = {}
    for item in network_args:
        key, sep, value = item.partition("=")
        parsed[key.strip()] = value.strip() if sep else "True"
    return json.dumps(parsed)
