"""Streaming reader and writer for the safetensors format (written atomically: library/models/atomic_writes.py).

The reader parses the header itself and checks it against the file size, so a truncated download
is reported before any tensor is read. A tensor that needs no dtype conversion is not read at all:
it is a zero-copy view of a private, copy-on-write memory map of the file (`zero_copy`, the default
on POSIX systems), with a storage of its own that covers exactly its bytes. Its pages come from the
page cache when first touched, and an in-place change (a training step) copies the touched page
into the process's own memory: the file is never written. Tensors that are converted, or that
would sit at an address where a fresh tensor would not (see `_FRESH_ALIGNMENT`), are read one
tensor at a time: no full-file buffer. A converted tensor is read into one reused buffer and
converted from there; any other goes straight into its final buffer. Files written
here are standard safetensors files that the `safetensors` package reads.

A mapped file stays as it was when loaded if it is *replaced* (a new file renamed over it, as every
save here and most downloaders do: the mapping keeps the old inode), or deleted. A file overwritten
*in place* (truncated and rewritten) while a process still holds tensors mapped from it is not
safe: untouched pages would show the new bytes, or, past a shorter file's end, kill the process
with SIGBUS. The `safetensors` package's `load_file` and `torch.load(mmap=True)` map files the
same way. `zero_copy=False` gives tensors that own their memory.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from library.errors import UserError
from library.models.atomic_writes import atomic_path  # noqa: F401 - also imported from here

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
# Zero-copy loading where it is safe: POSIX keeps a mapped file readable when it is replaced or
# deleted; Windows would refuse to replace or delete a mapped file (a save over the loaded model).
ZERO_COPY_DEFAULT = os.name == "posix"
# The address alignment torch gives a fresh CPU tensor. Some float32 kernels round differently at
# other alignments (BLAS sgemv, as in a U-Net's time embedding at batch 1, gives last-bit
# differences at addresses that are not 16-byte aligned), so a mapped float32/float64 tensor must
# sit where a fresh one would. Half-precision tensors may sit at any element boundary: their CPU
# kernels load unaligned and compute in float32, and give identical results at every 2-byte offset
# (tested); integers and booleans are exact whatever the kernel does.
_FRESH_ALIGNMENT = 64
_ANY_ELEMENT_ALIGNMENT = (torch.float16, torch.bfloat16) + tuple(
    dt for dt in DTYPES.values() if not dt.is_floating_point
)


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
    zero_copy: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """Read tensors (all, or those `select` accepts) as CPU tensors.

    Floating-point tensors are converted to `dtype` when given (a dtype, or a function of the
    tensor name returning one or None); integer tensors keep theirs. With `zero_copy` (None:
    `ZERO_COPY_DEFAULT`), a tensor kept in its stored dtype at a suitably aligned offset is a view
    of a private copy-on-write map of the file (see the module docstring); others are read into
    fresh tensors. Either way the values are the file's, bit for bit.
    """
    header = header or read_header(path)
    zero_copy = ZERO_COPY_DEFAULT if zero_copy is None else zero_copy
    names = [k for k in header.tensors if select is None or select(k)]
    names.sort(key=lambda k: header.tensors[k].begin)  # sequential reads
    out = {}
    mapped = None  # the file's private map, made at the first tensor that can use it
    staging = None  # bytes of a tensor to convert
    with open(path, "rb", buffering=0) as f:
        for name in names:
            info = header.tensors[name]
            src_dtype = DTYPES[info.dtype]
            itemsize = src_dtype.itemsize
            nbytes = info.end - info.begin
            if nbytes != math.prod(info.shape) * itemsize:
                raise UserError(f"{path}: tensor {name!r} size does not match its shape; the file is damaged")
            want = dtype(name) if callable(dtype) else dtype
            convert = want is not None and src_dtype.is_floating_point and want != src_dtype
            offset = header.data_start + info.begin
            alignment = itemsize if src_dtype in _ANY_ELEMENT_ALIGNMENT else _FRESH_ALIGNMENT
            if zero_copy and nbytes and not convert and offset % alignment == 0:
                if mapped is None:
                    mapped = _map_private(path, f, header, names)
                    zero_copy = mapped is not False
                if mapped is not False:
                    t = torch.empty(0, dtype=src_dtype)
                    out[name] = t.set_(mapped[offset:offset + nbytes], 0, info.shape)
                    continue
            if convert:  # read through one reused buffer: fresh memory per tensor faults in page by page
                if staging is None or staging.numel() < nbytes:
                    staging = torch.empty(nbytes, dtype=torch.uint8)
                t = staging[:nbytes].view(src_dtype).view(info.shape)
            else:
                t = torch.empty(info.shape, dtype=src_dtype)
            if nbytes:
                f.seek(offset)
                if f.readinto(_as_bytes(t)) != nbytes:
                    raise UserError(f"{path}: file is truncated at tensor {name!r}; re-download or re-save it")
            out[name] = t.to(want) if convert else t
    return out


def _map_private(path: str, f, header: SafetensorsHeader, names) -> "torch.UntypedStorage | bool":
    """A private (MAP_PRIVATE: copy-on-write, never written back) map of the whole file, or False
    where the file system cannot map it. Pages are read only when touched."""
    size = os.fstat(f.fileno()).st_size
    needed = header.data_start + max(header.tensors[k].end for k in names)
    if size < needed:  # shrank since the header was read: mapped pages past the end would SIGBUS
        raise UserError(f"{path}: file is truncated ({size} bytes, needs {needed}); re-download or re-save it")
    try:
        mapped = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
        now, ours = os.stat(path), os.fstat(f.fileno())
    except (RuntimeError, OSError):
        return False  # e.g. a file system without mmap: read into fresh tensors instead
    if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
        return False  # replaced since it was opened: read the file the header came from
    return mapped


class MappedPages:
    """Gives the resident pages of zero-copy tensors back to the kernel once they are no longer used.

    A weight converted after a zero-copy load (quantised to fp8, `library.models.frozen_weights`)
    leaves its source's pages resident in the private map: they count in the process's RSS, beside
    the converted copy, for as long as any tensor of the file lives. `release(tensor)` drops the
    whole pages inside a tensor's bytes (MADV_DONTNEED). Only for a tensor that lies in a private map
    of a file (read from /proc/self/maps when this object is made): a later read of a dropped page
    would read the file again, not zeros. Elsewhere (ordinary memory, other systems) it does nothing.
    The caller guarantees that nothing reads the tensor's values afterwards (a page changed in place
    since the load would be lost)."""

    _MADV_DONTNEED = 4

    def __init__(self):
        self.ranges = []
        self._madvise = None
        if not sys.platform.startswith("linux"):
            return
        try:
            with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
                for line in maps:
                    fields = line.split()
                    # address perms offset device inode [path]: private ('p'), backed by a file (inode)
                    if len(fields) >= 6 and fields[1].endswith("p") and fields[4] != "0":
                        start, end = (int(a, 16) for a in fields[0].split("-"))
                        self.ranges.append((start, end))
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError, ValueError):
            self.ranges = []

    def release(self, tensor: torch.Tensor) -> int:
        """Drop the pages of `tensor` if it is a mapped file's; the bytes given back (0 if none)."""
        if not self.ranges or tensor.device.type != "cpu" or not tensor.is_contiguous() or not tensor.numel():
            return 0
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return 0
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages only: neighbours keep theirs
        if last <= first or self._madvise(first, last - first, self._MADV_DONTNEED) != 0:
            return 0
        return last - first


def save_tensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically, streaming one tensor at a time (no whole-file buffer)."""
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data")
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_tensors(path, entries, tensors.__getitem__, metadata)


def write_tensors(path: str, entries: Sequence[Tuple[str, torch.dtype, tuple]],
                  produce: Callable[[str], torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically from (name, dtype, shape) entries, asking `produce(name)`
    for each tensor only when it is written: a tool can compute and drop one tensor at a time, so
    the file's size never has to fit in memory. A produced tensor must match its entry."""
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings: {bad}")
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format wants the data section 8-byte aligned
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, dtype, shape in entries:
                t = produce(name).detach()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r}: produced {t.dtype} {tuple(t.shape)}, announced {dtype} {shape}")
                if t.device.type != "cpu":
                    t = t.cpu()
                f.write(_as_bytes(t.contiguous()))
                del t
            f.flush()
            os.fsync(f.fileno())


class TensorReader:
    """The tensors of one safetensors file, read one at a time into fresh memory.

    For tools that stream a checkpoint tensor by tensor: nothing stays mapped, so memory holds only
    the tensors the caller keeps.
    """

    def __init__(self, path: str, header: Optional[SafetensorsHeader] = None):
        self.path = path
        self.header = header or read_header(path)
        self._file = open(path, "rb", buffering=0)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        dtype = DTYPES[info.dtype]
        nbytes = info.end - info.begin
        if nbytes != math.prod(info.shape) * dtype.itemsize:
            raise UserError(f"{self.path}: tensor {name!r} size does not match its shape; the file is damaged")
        t = torch.empty(info.shape, dtype=dtype)
        if nbytes:
            self._file.seek(self.header.data_start + info.begin)
            if self._file.readinto(_as_bytes(t)) != nbytes:
                raise UserError(f"{self.path}: file is truncated at tensor {name!r}; re-download or re-save it")
        return t


def iter_names(path: str) -> Iterable[str]:
    return read_header(path).tensors.keys()
