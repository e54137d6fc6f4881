"""Reading state dicts from any file a user may hand us: safetensors, or pickled `.ckpt/.pt/.pth/.bin`.

Pickles are opened with `torch.load(weights_only=True)`, which refuses any object other than tensors
and plain containers: a file that would run code is rejected and nothing in it runs. The format is
chosen from the file's bytes, not its name, so a mis-named file still gets the right reader or a
clear error.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from library.models import safetensors_io
from library.errors import UserError


@dataclass
class Checkpoint:
    path: str
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    extra: Dict[str, object] = field(default_factory=dict)  # non-tensor values of a pickle (epoch, global_step)
    format: str = "safetensors"  # "safetensors" | "pickle"


def sniff_format(path: str) -> str:
    """'safetensors', 'zip-pickle', 'pickle' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        return "zip-pickle"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); re-download or re-save it")


def torch_load_safely(path: str, mmap: bool = False, what: str = "checkpoint", allow: tuple = ()) -> object:
    """`torch.load(weights_only=True)` with one-line errors; `allow`: extra classes known to hold only
    tensors (e.g. the ParameterDict of old A1111 embeddings).

    torch's own texts run over several lines, carry terminal colour codes and suggest
    `weights_only=False`; none of that reaches the user: a pickle asking for code is named by the
    global it asks for, anything else unreadable is a damaged file."""
    import warnings

    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol ..." for a damaged file
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if wanted:
            raise UserError(
                f"{path}: refused to load this {what}: the pickle asks for {wanted.group(1)}, not only tensors; "
                "loading it could run code. Use a file you made, or convert it to .safetensors with a tool you trust"
            ) from None
        raise UserError(f"{path}: cannot read this {what} ({_short_reason(e)}); the file is truncated or damaged") from None


def _short_reason(error: Exception) -> str:
    """A few words on why torch could not read a file, without its advice or colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if not isinstance(error, (RuntimeError, OSError)) or "weights_only" in text:
        return "not a readable PyTorch file"
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _flatten_pickle(obj: object, path: str) -> tuple:
    """Return (tensors, extra) from a loaded pickle, unwrapping {"state_dict": ...} containers."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a model checkpoint (holds a {type(obj).__name__}, not a dict of tensors)")
    extra = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, (dict, torch.Tensor))}
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor) and not isinstance(v, dict):
            extra.setdefault(k, v)
    if not tensors:
        raise UserError(f"{path}: holds no tensors; it is not a model file")
    return tensors, extra


def read_checkpoint(
    path: str, dtype=None, select: Optional[Callable[[str], bool]] = None, *, zero_copy: Optional[bool] = None
) -> Checkpoint:
    """Load tensors (optionally only the keys `select` accepts), floating ones converted to `dtype`
    (a dtype, or a function of the key returning one or None).

    zero_copy: None (default) lets tensors that keep their stored dtype be copy-on-write views of a
    private memory map of the file (safetensors where `safetensors_io.ZERO_COPY_DEFAULT`, zip
    pickles always, as `torch.load(mmap=True)`); changing them never changes the file, and a file
    replaced by a rename while they live is not seen. False: every tensor owns its memory and
    nothing stays tied to the file (for a caller that will overwrite the file in place). True:
    map safetensors files on any system.
    """
    _check_exists(path)
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; expected a checkpoint file")
    kind = sniff_format(path)
    if kind == "safetensors":
        header = safetensors_io.read_header(path)
        tensors = safetensors_io.load_tensors(path, dtype=dtype, select=select, header=header, zero_copy=zero_copy)
        return Checkpoint(path, tensors, header.metadata, {}, "safetensors")
    if kind in ("zip-pickle", "pickle"):
        mmap = kind == "zip-pickle" and zero_copy is not False
        tensors, extra = _flatten_pickle(torch_load_safely(path, mmap=mmap), path)
        if select is not None:
            tensors = {k: v for k, v in tensors.items() if select(k)}
        if dtype is not None:
            for k, v in tensors.items():
                want = dtype(k) if callable(dtype) else dtype
                if want is not None and v.is_floating_point():
                    tensors[k] = v.to(want)
        return Checkpoint(path, tensors, {}, extra, "pickle")
    if path.endswith(".safetensors"):
        raise UserError(f"{path}: not a valid safetensors file; is it truncated or another format?")
    raise UserError(f"{path}: not a model file (neither safetensors nor a PyTorch checkpoint)")


def check_finite(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """UserError naming the file and the first tensor holding NaN/inf (a damaged file, or one saved from a
    diverged training): caught when the file is read, not blamed on the images steps later."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{path}: tensor {key} holds {bad} NaN/inf value(s) of {tensor.numel()}; the file is "
                            "damaged or was saved from a diverged training; use another file")


def read_keys(path: str) -> Dict[str, tuple]:
    """Key -> shape without reading tensor data where the format allows it."""
    _check_exists(path)
    kind = sniff_format(path)
    if kind == "safetensors":
        return {k: v.shape for k, v in safetensors_io.read_header(path).tensors.items()}
    ckpt = read_checkpoint(path)
    return {k: tuple(v.shape) for k, v in ckpt.tensors.items()}


def save_pickle_checkpoint(state: Dict[str, object], path: str) -> None:
    """torch.save to `path` atomically."""
    with safetensors_io.atomic_path(path) as tmp:
        torch.save(state, tmp)


class TensorSource:
    """A checkpoint read tensor by tensor, for tools that stream: `names` in file order, `shape(name)`,
    `dtype(name)` without reading data, `read(name)` one tensor. A safetensors file is read one
    tensor at a time into fresh memory (nothing stays mapped); a pickle is memory-mapped where the
    format allows (zip), else loaded whole."""

    def __init__(self, path: str):
        _check_exists(path)
        if os.path.isdir(path):
            raise UserError(f"{path}: is a folder; expected a checkpoint file")
        self.path = path
        kind = sniff_format(path)
        self._reader = None
        self._tensors: Dict[str, torch.Tensor] = {}
        self.extra: Dict[str, object] = {}
        if kind == "safetensors":
            self._reader = safetensors_io.TensorReader(path)
            header = self._reader.header
            self.names = sorted(header.tensors, key=lambda k: header.tensors[k].begin)
            self.metadata = header.metadata
            self.format = "safetensors"
        elif kind in ("zip-pickle", "pickle"):
            self._tensors, self.extra = _flatten_pickle(torch_load_safely(path, mmap=kind == "zip-pickle"), path)
            self.names = list(self._tensors)
            self.metadata = {}
            self.format = "pickle"
        else:
            read_checkpoint(path)  # raises the one-line error for this kind of file
            raise UserError(f"{path}: not a model file")

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._tensors = {}

    def shape(self, name: str) -> tuple:
        if self._reader is not None:
            return tuple(self._reader.header.tensors[name].shape)
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if self._reader is not None:
            return safetensors_io.DTYPES[self._reader.header.tensors[name].dtype]
        return self._tensors[name].dtype

    def shapes(self) -> Dict[str, tuple]:
        return {name: self.shape(name) for name in self.names}

    def read(self, name: str) -> torch.Tensor:
        if self._reader is not None:
            return self._reader.read(name)
        return self._tensors[name]
