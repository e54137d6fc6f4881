"""Streaming reader and writer for the safetensors format, and atomic file writes.

The reader parses the header itself and reads each tensor straight into its final buffer
(converting dtype per tensor when asked), so loading a checkpoint costs the bytes of the result and
nothing more: no memory map that later turns into a second copy, no full-file buffer. It also
checks the header against the file size, so a truncated download is reported before any tensor
is read. Files written here are standard safetensors files that the `safetensors` package reads.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch

from library.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple
    begin: int  # offset in the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]
    data_start: int


def read_header(path: str) -> SafetensorsHeader:
    """Parse and validate the header; raises UserError for anything that is not a complete file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file ({size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise UserError(f"{path}: not a valid safetensors file (bad header length); is it truncated or another format?")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: safetensors header is not valid JSON; the file is damaged, re-download or re-save it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: malformed header entry for tensor {name!r}; the file is damaged") from None
        if dtype not in DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if end > data_size:
            raise UserError(
                f"{path}: file is truncated ({size} bytes, tensor {name!r} needs {8 + n + end}); re-download or re-save it"
            )
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)


def read_metadata(path: str) -> Dict[str, str]:
    return read_header(path).metadata


def _as_bytes(t: torch.Tensor):
    """A writable/readable byte view of a contiguous CPU tensor (works for bf16 and 0-d tensors)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def load_tensors(
    path: str,
    dtype=None,
    select: Optional[Callable[[str], bool]] = None,
    header: Optional[SafetensorsHeader] = None,
) -> Dict[str, torch.Tensor]:
    """Read tensors (all, or those `select` accepts) into fresh CPU tensors.

    Floating-point tensors are converted to `dtype` when given (a dtype, or a function of the
    tensor name returning one or None); integer tensors keep theirs.
    """
    header = header or read_header(path)
    names = [k for k in header.tensors if select is None or select(k)]
    names.sort(key=lambda k: header.tensors[k].begin)  # sequential reads
    out = {}
    with open(path, "rb", buffering=0) as f:
        for name in names:
            info = header.tensors[name]
            src_dtype = DTYPES[info.dtype]
            t = torch.empty(info.shape, dtype=src_dtype)
            nbytes = info.end - info.begin
            if nbytes != t.numel() * t.element_size():
                raise UserError(f"{path}: tensor {name!r} size does not match its shape; the file is damaged")
            if nbytes:
                f.seek(header.data_start + info.begin)
                if f.readinto(_as_bytes(t)) != nbytes:
                    raise UserError(f"{path}: file is truncated at tensor {name!r}; re-download or re-save it")
            want = dtype(name) if callable(dtype) else dtype
            if want is not None and t.is_floating_point() and t.dtype != want:
                t = t.to(want)
            out[name] = t
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    A crash or kill while writing leaves any previous file at `path` untouched.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; saved models get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_tensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically, streaming one tensor at a time (no whole-file buffer)."""
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings: {bad}")
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    order = list(tensors)
    for name in order:
        t = tensors[name]
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format wants the data section 8-byte aligned
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                t = tensors[name].detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                f.write(_as_bytes(t.contiguous()))
            f.flush()
            os.fsync(f.fileno())


def iter_names(path: str) -> Iterable[str]:
    return read_header(path).tensors.keys()
