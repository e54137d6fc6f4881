"""Cache entry store: the entry files and folders both caches (latents, text-encoder outputs) keep.

An entry is one small safetensors file: named tensors plus string metadata (format, key, what it
was made from, and a CRC32 of the data section), at `<root>/<kind>/<key[:2]>/<key>.safetensors`.
An `EntryStore` says where the entries of one kind live: in a dict for this run only, in one
folder (`--cache_dir`), or `BESIDE_IMAGES`, a `.sdtrain_cache` folder inside each image's folder.

Writes go to a temporary file that is renamed into place (atomic); there is no per-file fsync
(5 ms each would dominate), so a crash can at worst leave a damaged entry. `check_entry` is the
cheap header check made before filling a cache (format, key, tensor shapes, file size);
`read_entry` also verifies the CRC. `plan_fill` decides which entries a fill must compute (and,
with several processes, which of them this process computes) and counts them in `CacheStats`.
torch is imported lazily: argument parsers import this module through the cache flags.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

CACHE_FOLDER = ".sdtrain_cache"  # default disk cache root inside each image folder
BESIDE_IMAGES = ":beside-images:"  # cache location meaning "<image folder>/.sdtrain_cache"
HASH_MEMO_FILE = "file_hashes.json"
_SHOWN = 5  # damaged entries named individually in warnings


# ---------------------------------------------------------------------------------------------
# Entry files: one safetensors file per entry


class CorruptEntry(Exception):
    """An entry file exists but cannot be trusted; the message says why."""


_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint8": "U8", "float64": "F64"}
_ITEM_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "F64": 8}


def safetensors_dtype(dtype) -> str:
    """The safetensors name ("F32", ...) of a torch dtype used in entries."""
    return _DTYPE_NAMES[str(dtype).replace("torch.", "")]


def _torch_dtype(name: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
            "F64": torch.float64}[name]


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a unique temporary file beside `path`, then rename it over `path`."""
    temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        try:
            os.remove(temp)
        except OSError:
            pass
        raise


def encode_entry(tensors: dict, metadata: dict) -> bytes:
    """A safetensors file image: CPU tensors plus string metadata and a CRC32 of the data section."""
    header: dict = {}
    chunks = []
    offset = 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = safetensors_dtype(tensor.dtype)
        raw = tensor.reshape(-1).view(_torch_dtype("U8")).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    header["__metadata__"] = {**{k: str(v) for k, v in metadata.items()}, "crc32": str(zlib.crc32(data))}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors wants the data 8-byte aligned
    return struct.pack("<Q", len(head)) + head + data


def write_entry(path: str, tensors: dict, metadata: dict) -> None:
    try:
        write_bytes_atomic(path, encode_entry(tensors, metadata))
    except PermissionError:
        raise UserError(
            f"cannot write cache entry {path}: permission denied; pass --cache_dir with a writable folder"
        ) from None


def _parse_header(raw: bytes, file_size: int, path: str) -> tuple:
    if len(raw) < 8:
        raise CorruptEntry(f"only {file_size} bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n == 0 or 8 + n > file_size:
        raise CorruptEntry("truncated header")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]))
        metadata = header.pop("__metadata__")
        specs = {
            name: (info["dtype"], tuple(info["shape"]), int(info["data_offsets"][0]), int(info["data_offsets"][1]))
            for name, info in header.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptEntry("damaged header") from None
    return n, metadata, specs


def _check_specs(specs: dict, metadata: dict, n: int, file_size: int, key: str, fmt: str, expected: dict) -> None:
    if metadata.get("format") != fmt:
        raise CorruptEntry(f"not a {fmt} entry")
    if metadata.get("key") != key:
        raise CorruptEntry("its key does not match its file name")
    data_size = 0
    for name, (dtype, shape, begin, end) in specs.items():
        count = 1
        for side in shape:
            count *= side
        if dtype not in _ITEM_SIZES or end - begin != count * _ITEM_SIZES[dtype] or begin < 0:
            raise CorruptEntry(f"tensor {name!r} does not match its shape")
        data_size = max(data_size, end)
    if 8 + n + data_size != file_size:
        raise CorruptEntry(f"file size {file_size} differs from the {8 + n + data_size} bytes its header describes")
    for name, (dtype, shape) in expected.items():
        if name not in specs:
            raise CorruptEntry(f"tensor {name!r} is missing")
        got_dtype, got_shape = specs[name][:2]
        if got_dtype != dtype or (shape is not None and got_shape != tuple(shape)):
            raise CorruptEntry(f"tensor {name!r} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape or [])}")


def check_entry(path: str, key: str, fmt: str, expected: dict) -> Optional[str]:
    """Cheap check of an entry's header: None when fine, "missing", or the reason it is damaged.

    expected: {tensor name: (safetensors dtype, shape or None)} that must be present.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if 0 < n <= file_size:
                    head += f.read(n)
        n, metadata, specs = _parse_header(head, file_size, path)
        _check_specs(specs, metadata, n, file_size, key, fmt, expected)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except CorruptEntry as e:
        return str(e)
    return None


def read_entry(path: str, key: str, fmt: str, expected: dict) -> dict:
    """Tensors of an entry, after checking header, shapes and CRC; raises FileNotFoundError or CorruptEntry."""
    import torch

    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        buffer = bytearray(file_size)
        if f.readinto(buffer) != file_size:
            raise CorruptEntry("short read")
    n, metadata, specs = _parse_header(buffer, file_size, path)
    _check_specs(specs, metadata, n, file_size, key, fmt, expected)
    start = 8 + n
    if str(zlib.crc32(memoryview(buffer)[start:])) != metadata.get("crc32"):
        raise CorruptEntry("its data does not match its checksum")
    out = {}
    for name, (dtype, shape, begin, end) in specs.items():
        count = (end - begin) // _ITEM_SIZES[dtype]
        out[name] = torch.frombuffer(buffer, dtype=_torch_dtype(dtype), count=count, offset=start + begin).reshape(shape)
    return out


class EntryStore:
    """Where the entries of one kind live: a dict (location None), one folder, or beside each image."""

    def __init__(self, location: Optional[str], kind: str):
        self.location = location
        self.kind = kind
        self.memory: dict = {}
        self._made: set = set()

    @property
    def in_memory(self) -> bool:
        return self.location is None

    def root(self, image_path: Optional[str]) -> str:
        if self.location == BESIDE_IMAGES:
            if image_path is None:
                raise ValueError("a cache beside the images needs the image path of every entry")
            return os.path.join(os.path.dirname(os.path.abspath(image_path)), CACHE_FOLDER)
        return self.location

    def path_for(self, key: str, image_path: Optional[str]) -> str:
        return os.path.join(self.root(image_path), self.kind, key[:2], key + ".safetensors")

    def prepare_dir(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory not in self._made:
            try:
                os.makedirs(directory, exist_ok=True)
            except PermissionError:
                raise UserError(
                    f"cannot create cache folder {directory}: permission denied; pass --cache_dir with a writable folder"
                ) from None
            self._made.add(directory)

    def memo_file(self, image_path: str) -> Optional[str]:
        if self.in_memory:
            return None
        root = self.root(image_path)
        self.prepare_dir(os.path.join(root, HASH_MEMO_FILE))
        return os.path.join(root, HASH_MEMO_FILE)

# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class CacheStats:
    """What one `ensure` call found and did (counts of distinct entries unless said otherwise)."""

    requested: int = 0  # samples passed in, duplicates included
    unique: int = 0
    hits: int = 0  # valid entries already there
    encoded: int = 0  # entries computed now (missing + damaged)
    damaged: int = 0  # entries found damaged and recomputed
    other_process: int = 0  # left to other processes (multi-process caching)
    hashed_files: int = 0  # image files whose bytes were hashed
    seconds: float = 0.0

    def add(self, other: "CacheStats") -> None:
        for name in ("requested", "unique", "hits", "encoded", "damaged", "other_process", "hashed_files", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self, what: str) -> str:
        parts = [f"{self.unique} {what}", f"{self.hits} cached", f"{self.encoded} encoded"]
        if self.damaged:
            parts.append(f"{self.damaged} damaged and redone")
        if self.other_process:
            parts.append(f"{self.other_process} left to other processes")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


def plan_fill(store: "EntryStore", keyed: Iterable, stats: CacheStats, process_index: int, num_processes: int,
              check: Callable) -> tuple:
    """Split (key, image_path, sample) items into the entries to encode, counting hits in `stats`.

    Duplicates collapse to one entry (per cache folder when the cache lives beside the images).
    With several processes on a disk cache, process p takes the distinct entries whose index is p
    modulo num_processes. check(path, key, sample) -> None (valid), "missing" or a damage reason.
    Returns (missing [(key, sample)], damaged [(path, reason)])."""
    unique: dict = {}
    for key, image_path, sample in keyed:
        where = None if store.in_memory else store.root(image_path)
        unique.setdefault((key, where), (image_path, sample))
    stats.unique = len(unique)
    missing, damaged = [], []
    for index, ((key, _), (image_path, sample)) in enumerate(unique.items()):
        if store.in_memory:
            if key in store.memory:
                stats.hits += 1
            else:
                missing.append((key, sample))
            continue
        if num_processes > 1 and index % num_processes != process_index:
            stats.other_process += 1
            continue
        path = store.path_for(key, image_path)
        reason = check(path, key, sample)
        if reason is None:
            stats.hits += 1
            continue
        if reason != "missing":
            damaged.append((path, reason))
        missing.append((key, sample))
    stats.damaged = len(damaged)
    return missing, damaged


def warn_damaged(damaged: list, what: str) -> None:
    for path, reason in damaged[:_SHOWN]:
        logger.warning("%s: damaged %s cache entry (%s); encoding it again", path, what, reason)
    if len(damaged) > _SHOWN:
        logger.warning("... and %d more damaged %s cache entries, encoded again", len(damaged) - _SHOWN, what)
