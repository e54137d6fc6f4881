"""Latent cache: VAE latents of training samples, kept in memory or on disk, keyed on content.

Every entry is named by a key, the sha256 of everything its value depends on:

* the image file's **content hash** (sha256 of its bytes; memoised per file by size, mtime, ctime
  and inode, so unchanged files are not re-read on later runs);
* the crop plan (original size, resized size, bucket, left, top), the flip flag, and whether an
  alpha mask is stored with it;
* the **VAE identity**: sha256 of the names, dtypes, shapes and bytes of every encoder-side VAE
  tensor (`encoder.*`, `quant_conv.*`; the decoder does not affect latents), computed once per run;
* the storage dtype and `PIXEL_PIPELINE_VERSION` (bump it when `image_transforms` changes pixels).

A changed image, crop, flip or VAE therefore gives a new key: a cache is never stale, and an
unchanged sample is never encoded twice. Values are unscaled latents (the trainer multiplies by
`family.latent_scale`), one fixed sample `mean + std * noise` of the VAE posterior, as sd-scripts
caches `latent_dist.sample()`; the noise comes from a generator seeded by the key, so the same
key always holds the same numbers.

On disk each entry is one small safetensors file (`latents` [C,h,w], optional `alpha_mask` [H,W]
uint8; metadata: format, key, image path, crop, CRC32 of the data) at
`<root>/latents/<key[:2]>/<key>.safetensors`. `<root>` is `--cache_dir`, or by default a
`.sdtrain_cache` folder inside each image's folder. Writes go to a temporary file that is renamed
into place (atomic); there is no per-file fsync (5 ms each would dominate), so a crash can at worst
leave a damaged entry, which the checks below find and recompute. Before encoding, existing entries
get a header check (format, key, tensor shapes, file size; `--skip_cache_check`: existence only);
every read verifies the CRC. A damaged entry is re-encoded with a warning, never a crash.

This module also holds what the text-encoder output cache shares (entry files, stores, content
hashes, fingerprints, cache flags) and the sample enumeration used by the cache tools. torch is
imported lazily so that argument parsers can import `add_cache_arguments` cheaply. docs/caches.md
describes the design and the measurements behind it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import struct
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from library.bucketing import BucketAssigner, BucketSettings, CropPlan
from library.errors import UserError

logger = logging.getLogger(__name__)

CACHE_FOLDER = ".sdtrain_cache"  # default disk cache root inside each image folder
BESIDE_IMAGES = ":beside-images:"  # cache location meaning "<image folder>/.sdtrain_cache"
HASH_MEMO_FILE = "file_hashes.json"
LATENTS_KIND = "latents"
LATENT_FORMAT = "sdtrain.latents.v1"
PIXEL_PIPELINE_VERSION = 1
_SHOWN = 5  # damaged entries named individually in warnings


# ---------------------------------------------------------------------------------------------
# Command-line flags


def _add_once(parser: argparse.ArgumentParser, group, flag: str, **kwargs) -> None:
    """Add a flag unless the parser already has it (the dataset and SDXL groups define some of these)."""
    if flag not in parser._option_string_actions:
        group.add_argument(flag, **kwargs)


def add_cache_arguments(parser: argparse.ArgumentParser, support_text_encoder_caching: bool = True) -> None:
    """sd-scripts' caching flags plus `--cache_dir`; flags already on `parser` are left alone."""
    g = parser.add_argument_group("caching")
    _add_once(parser, g, "--cache_latents", action="store_true",
              help="encode every image once and keep the latents in memory (no color_aug/random_crop)")
    _add_once(parser, g, "--cache_latents_to_disk", action="store_true",
              help="cache latents on disk, reused by later runs (implies --cache_latents)")
    _add_once(parser, g, "--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    _add_once(parser, g, "--skip_cache_check", action="store_true",
              help="trust existing disk cache entries without opening them (damaged ones are still "
              "recomputed when read)")
    if support_text_encoder_caching:
        _add_once(parser, g, "--cache_text_encoder_outputs", action="store_true",
                  help="encode each caption once (text encoders frozen; no caption shuffle/dropout/wildcards)")
        _add_once(parser, g, "--cache_text_encoder_outputs_to_disk", action="store_true",
                  help="cache text encoder outputs on disk (implies --cache_text_encoder_outputs)")
    _add_once(parser, g, "--cache_dir", type=str, default=None,
              help=f"folder for disk caches (default: a {CACHE_FOLDER} folder inside each image folder)")


@dataclass(frozen=True)
class CacheSettings:
    """The caching flags of a run, resolved (`*_to_disk` implies caching)."""

    latents: bool = False
    latents_to_disk: bool = False
    text_encoder_outputs: bool = False
    text_encoder_outputs_to_disk: bool = False
    vae_batch_size: int = 1
    skip_check: bool = False
    cache_dir: Optional[str] = None

    @classmethod
    def from_args(cls, args) -> "CacheSettings":
        batch = getattr(args, "vae_batch_size", 1)
        batch = 1 if batch is None else int(batch)
        if batch < 1:
            raise UserError(f"--vae_batch_size {batch}: must be at least 1")
        to_disk = bool(getattr(args, "cache_latents_to_disk", False))
        te_to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
        return cls(
            latents=to_disk or bool(getattr(args, "cache_latents", False)),
            latents_to_disk=to_disk,
            text_encoder_outputs=te_to_disk or bool(getattr(args, "cache_text_encoder_outputs", False)),
            text_encoder_outputs_to_disk=te_to_disk,
            vae_batch_size=batch,
            skip_check=bool(getattr(args, "skip_cache_check", False)),
            cache_dir=getattr(args, "cache_dir", None),
        )

    def latent_location(self) -> Optional[str]:
        """`cache_dir` argument for LatentCache: None (memory), a folder, or BESIDE_IMAGES."""
        return disk_location(self.cache_dir) if self.latents_to_disk else None

    def text_encoder_location(self) -> Optional[str]:
        return disk_location(self.cache_dir) if self.text_encoder_outputs_to_disk else None


def disk_location(cache_dir: Optional[str]) -> str:
    """Where disk caches go: the given folder, else BESIDE_IMAGES."""
    return os.path.abspath(cache_dir) if cache_dir else BESIDE_IMAGES


# ---------------------------------------------------------------------------------------------
# Content hashes of image files


def _stat_signature(st: os.stat_result) -> list:
    # ctime cannot be set by users, so an edit that restores mtime is still noticed.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise UserError(f"{path}: cannot read image file ({e.strerror or e})") from None


def _no_memo(path: str) -> None:
    return None


class FileHasher:
    """sha256 of file contents, memoised by (size, mtime_ns, ctime_ns, inode).

    `memo_file_for(path)` names the JSON file that remembers a file's hash across runs (None: keep it
    in memory only). The stat is taken before the bytes are read, so a file edited while it is
    hashed is hashed again next time rather than trusted.
    """

    def __init__(self, memo_file_for: Optional[Callable[[str], Optional[str]]] = None, workers: int = 4):
        self.memo_file_for = memo_file_for or _no_memo  # a named function keeps the hasher picklable
        self.workers = workers
        self._known: dict = {}  # abspath -> (signature, digest)
        self._loaded: set = set()
        self._dirty: dict = {}  # memo file -> {abspath: record}
        self.hashed = 0  # files whose bytes were read (for stats and tests)

    def digest(self, path: str) -> str:
        return self.digest_many([path])[0]

    def digest_many(self, paths: Sequence[str]) -> list:
        """Content digests of many files; unknown or changed files are hashed on a thread pool."""
        absolute = [os.path.abspath(p) for p in paths]
        results: dict = {}
        todo: dict = {}
        for path in dict.fromkeys(absolute):
            try:
                signature = _stat_signature(os.stat(path))
            except OSError as e:
                raise UserError(f"{path}: cannot read image file ({e.strerror or e})") from None
            self._load_memo(path)
            known = self._known.get(path)
            if known is not None and known[0] == signature:
                results[path] = known[1]
            else:
                todo[path] = signature
        if todo:
            names = list(todo)
            if len(names) > 1 and self.workers > 1:
                # hashlib releases the GIL on large buffers, so threads hash in parallel.
                with ThreadPoolExecutor(self.workers) as pool:
                    digests = list(pool.map(_sha256_file, names))
            else:
                digests = [_sha256_file(n) for n in names]
            for name, digest in zip(names, digests):
                self._remember(name, todo[name], digest)
                results[name] = digest
            self.hashed += len(names)
        return [results[p] for p in absolute]

    def _load_memo(self, path: str) -> None:
        memo = self.memo_file_for(path)
        if memo is None or memo in self._loaded:
            return
        self._loaded.add(memo)
        for name, record in _read_memo(memo).items():
            self._known.setdefault(name, (record[:4], record[4]))

    def _remember(self, path: str, signature: list, digest: str) -> None:
        self._known[path] = (signature, digest)
        memo = self.memo_file_for(path)
        if memo is not None:
            self._dirty.setdefault(memo, {})[path] = signature + [digest]

    def save(self) -> None:
        """Write new hashes to their memo files (merged with what other processes wrote meanwhile)."""
        for memo, records in self._dirty.items():
            merged = _read_memo(memo)
            merged.update(records)
            try:
                _write_bytes_atomic(memo, json.dumps({"version": 1, "files": merged}).encode("utf-8"))
            except OSError as e:  # the memo only saves time; losing it is not an error
                logger.warning("%s: cannot save file hashes (%s)", memo, e.strerror or e)
        self._dirty.clear()


def _read_memo(memo: str) -> dict:
    try:
        with open(memo, "rb") as f:
            data = json.loads(f.read())
        files = data["files"]
        return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 5}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        logger.warning("%s: unreadable file-hash memo; images will be hashed again", memo)
        return {}


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


def _write_bytes_atomic(path: str, data: bytes) -> None:
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
        _write_bytes_atomic(path, encode_entry(tensors, metadata))
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
# Identities of models


def _tensor_bytes(tensor, sample: Optional[int]) -> bytes:
    """Raw bytes of a tensor, or of `sample` evenly spaced elements plus the last one."""
    import torch

    flat = tensor.detach().reshape(-1)
    if sample is not None and flat.numel() > sample:
        step = flat.numel() // sample
        flat = torch.cat([flat[::step][:sample], flat[-1:]])
    flat = flat.to("cpu").contiguous()
    return flat.view(torch.uint8).numpy().tobytes()


def state_fingerprint(module, prefixes: Optional[tuple] = None, sample: Optional[int] = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of a module's state dict, optionally only some prefixes.

    sample=None hashes every byte; an int hashes that many evenly spaced elements of each tensor.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device; a cache needs real weights")
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor, sample))
    return digest.hexdigest()


def vae_identity(vae) -> str:
    """Everything about a VAE that changes its latents: encoder weights (all bytes) and dtype, tiling."""
    weights = state_fingerprint(vae, prefixes=("encoder.", "quant_conv."))
    tiling = bool(getattr(vae, "use_tiling", False))
    return hashlib.sha256(f"{type(vae).__name__}|{weights}|tiling={tiling}".encode()).hexdigest()


def cache_key(parts: dict) -> str:
    """sha256 of a canonical JSON of the parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def sample_noise(key: str, shape: tuple):
    """The fixed N(0, 1) noise of one entry: a generator seeded from its key."""
    import torch

    generator = torch.Generator().manual_seed(int(key[:15], 16))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


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


def _wait_all(futures: list) -> None:
    for future in futures:
        future.result()  # re-raises a failed write here


# ---------------------------------------------------------------------------------------------
# Latent cache


class LatentSample(NamedTuple):
    """One training sample's pixels: an image, how it is resized and cropped, flipped or not.

    alpha_mask: also store the sample's alpha mask (masked-loss training).
    """

    path: str
    plan: CropPlan
    flip: bool = False
    alpha_mask: bool = False


class LatentEntry(NamedTuple):
    latents: Any  # (C, h, w) unscaled, storage dtype
    alpha_mask: Any = None  # (H, W) float32 in [0, 1], when the sample asked for it


def as_latent_sample(sample) -> LatentSample:
    """Accept any descriptor with `path`, `plan`, `flip` (and optionally `alpha_mask`)."""
    if isinstance(sample, LatentSample):
        return sample
    return LatentSample(str(sample.path), CropPlan(*sample.plan), bool(getattr(sample, "flip", False)),
                        bool(getattr(sample, "alpha_mask", False)))


def with_flips(samples: Iterable[LatentSample]) -> list:
    """Each sample and its horizontally flipped twin (for flip_aug)."""
    out = []
    for s in samples:
        out += [s._replace(flip=False), s._replace(flip=True)]
    return out


class LatentCache:
    """Latents of training samples, encoded once and kept in memory or on disk.

    cache_dir: None keeps entries in memory for this run; a folder, or BESIDE_IMAGES, keeps them on
    disk for later runs too. dtype: storage dtype of the latents (default float32, as sd-scripts).
    skip_check: `ensure` only tests that entry files exist (reads still verify them).
    """

    def __init__(self, vae, family=None, cache_dir: Optional[str] = None, vae_batch_size: int = 1, dtype=None,
                 *, skip_check: bool = False, load_workers: Optional[int] = None):
        import torch

        self.vae = vae
        self.family = family
        self.batch_size = max(1, int(vae_batch_size))
        self.dtype = dtype or torch.float32
        self.skip_check = skip_check
        self.load_workers = load_workers or min(4, os.cpu_count() or 1)
        self.store = EntryStore(cache_dir, LATENTS_KIND)
        # Memory caches hash contents too (no memo across runs): the VAE costs far more than hashing,
        # and equal keys make memory and disk caches hold the very same numbers.
        self.hasher = FileHasher(None if self.store.in_memory else self.store.memo_file)
        self.vae_id = vae_identity(vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsamples = len(vae.config.block_out_channels) - 1
        self.stats = CacheStats()  # running totals over all calls
        self._warned_fallback = False

    # --- keys and paths ---------------------------------------------------------------------

    def _key(self, sample: LatentSample, content: str) -> str:
        plan = sample.plan
        return cache_key({
            "kind": LATENT_FORMAT, "pixels": PIXEL_PIPELINE_VERSION, "content": content,
            "original": [int(v) for v in plan.original_size], "resized": [int(v) for v in plan.resized_size],
            "bucket": [int(v) for v in plan.bucket], "left": int(plan.left), "top": int(plan.top),
            "flip": bool(sample.flip), "alpha": bool(sample.alpha_mask), "vae": self.vae_id, "dtype": str(self.dtype),
        })

    def key(self, sample) -> str:
        sample = as_latent_sample(sample)
        return self._key(sample, self.hasher.digest(sample.path))

    def keys(self, samples: Sequence[LatentSample]) -> list:
        contents = self.hasher.digest_many([s.path for s in samples])
        return [self._key(s, c) for s, c in zip(samples, contents)]

    def entry_path(self, sample) -> Optional[str]:
        """The file of a sample's entry (None for a memory cache)."""
        sample = as_latent_sample(sample)
        return None if self.store.in_memory else self.store.path_for(self.key(sample), sample.path)

    def _expected(self, sample: LatentSample) -> dict:
        bw, bh = sample.plan.bucket
        latent_dtype = safetensors_dtype(self.dtype)
        shape = (self.latent_channels, bh >> self.downsamples, bw >> self.downsamples)
        expected = {"latents": (latent_dtype, shape)}
        if sample.alpha_mask:
            expected["alpha_mask"] = ("U8", (bh, bw))
        return expected

    # --- filling ----------------------------------------------------------------------------

    def ensure(self, samples: Iterable, *, process_index: int = 0, num_processes: int = 1) -> CacheStats:
        """Make sure every sample has a valid entry, encoding the missing and damaged ones.

        With several processes sharing a disk cache, process p handles the distinct samples whose
        index is p modulo num_processes (then synchronise before reading). Memory caches always
        encode everything they need.
        """
        start = time.perf_counter()
        samples = [as_latent_sample(s) for s in samples]
        hashed_before = self.hasher.hashed
        stats = CacheStats(requested=len(samples))
        keyed = [(key, sample.path, sample) for key, sample in zip(self.keys(samples), samples)]
        missing, damaged = plan_fill(self.store, keyed, stats, process_index, num_processes, self._check)
        warn_damaged(damaged, "latent")
        if missing:
            self._encode(missing)
        stats.encoded = len(missing)
        self.hasher.save()
        stats.hashed_files = self.hasher.hashed - hashed_before
        stats.seconds = time.perf_counter() - start
        self.stats.add(stats)
        return stats

    def _check(self, path: str, key: str, sample: LatentSample) -> Optional[str]:
        if self.skip_check:
            return None if os.path.exists(path) else "missing"
        return check_entry(path, key, LATENT_FORMAT, self._expected(sample))

    def _batches(self, missing: list) -> list:
        """Missing entries grouped by bucket (one VAE call per batch); flip twins stay together."""
        ordered = sorted(missing, key=lambda ks: (ks[1].plan.bucket, ks[1].path, ks[1].plan, ks[1].flip))
        batches, current = [], []
        for item in ordered:
            if current and (current[0][1].plan.bucket != item[1].plan.bucket or len(current) == self.batch_size):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    def _encode(self, missing: list) -> None:
        if self.vae is None:
            raise UserError("latents are not cached and the VAE was released; run the caching step before training")
        batches = self._batches(missing)
        writes: deque = deque()  # per batch, the futures of its entry writes
        with ThreadPoolExecutor(self.load_workers) as pool:
            pending = self._submit_pixels(pool, batches[0])
            for i, batch in enumerate(batches):
                loaded = pending
                if i + 1 < len(batches):
                    pending = self._submit_pixels(pool, batches[i + 1])  # decode ahead while the VAE runs
                writes.append([pool.submit(self._put, *item) for item in self._encode_batch(batch, loaded)])
                while len(writes) > 2:  # bounds the latents waiting to be written
                    _wait_all(writes.popleft())
            while writes:
                _wait_all(writes.popleft())

    @staticmethod
    def _submit_pixels(pool: ThreadPoolExecutor, batch: list) -> dict:
        """Decode each (image, crop) once; flipped twins reuse the unflipped pixels."""
        from library.image_transforms import training_pixels_and_alpha

        futures = {}
        for _, s in batch:
            base = (s.path, s.plan, s.alpha_mask)
            if base not in futures:
                futures[base] = pool.submit(training_pixels_and_alpha, s.path, s.plan, False, s.alpha_mask)
        return futures

    def _encode_batch(self, batch: list, futures: dict) -> list:
        """VAE-encode one batch; returns the `_put` arguments of its entries."""
        import torch

        pixels, masks = [], []
        for _, s in batch:
            image, mask = futures[(s.path, s.plan, s.alpha_mask)].result()
            pixels.append(image.flip(-1) if s.flip else image)
            masks.append(None if mask is None else (mask.flip(-1) if s.flip else mask))
        parameter = next(self.vae.parameters())
        with torch.no_grad():
            posterior = self.vae.encode(torch.stack(pixels).to(parameter.device, parameter.dtype)).latent_dist
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        entries = []
        for row, ((key, sample), mask) in enumerate(zip(batch, masks)):
            latents = mean[row] + std[row] * sample_noise(key, tuple(mean.shape[1:]))
            if not torch.isfinite(latents).all():
                raise UserError(
                    f"{sample.path}: the VAE produced NaN/inf latents (usual with a half-precision VAE); "
                    f"use --no_half_vae"
                )
            entries.append((key, sample, latents.to(self.dtype), mask))
        return entries

    def _put(self, key: str, sample: LatentSample, latents, mask) -> None:
        import torch

        mask_u8 = None if mask is None else torch.round(mask.float() * 255).to(torch.uint8)
        if self.store.in_memory:
            self.store.memory[key] = (latents, mask_u8)
            return
        path = self.store.path_for(key, sample.path)
        self.store.prepare_dir(path)
        tensors = {"latents": latents}
        if mask_u8 is not None:
            tensors["alpha_mask"] = mask_u8
        plan = sample.plan
        write_entry(path, tensors, {
            "format": LATENT_FORMAT, "key": key, "image": os.path.abspath(sample.path),
            "original_size": ",".join(map(str, plan.original_size)), "crop_ltrb": ",".join(map(str, plan.crop_ltrb)),
            "flip": str(bool(sample.flip)).lower(),
        })

    # --- reading ----------------------------------------------------------------------------

    def load(self, sample) -> LatentEntry:
        """The entry of one sample; encodes it on a miss (or if damaged) when the VAE is still there."""
        sample = as_latent_sample(sample)
        key = self.key(sample)
        if self.store.in_memory:
            if key not in self.store.memory:
                self._encode([(key, sample)])
            latents, mask = self.store.memory[key]
            return LatentEntry(latents, None if mask is None else mask.float() / 255)
        path = self.store.path_for(key, sample.path)
        try:
            tensors = read_entry(path, key, LATENT_FORMAT, self._expected(sample))
        except FileNotFoundError:
            if self.vae is None:
                raise UserError(f"{sample.path}: its latents are not in the cache ({path}); run the caching step "
                                f"(tools/cache_latents.py) with the same settings") from None
            self._encode([(key, sample)])
            tensors = read_entry(path, key, LATENT_FORMAT, self._expected(sample))
        except (CorruptEntry, OSError) as e:
            if self.vae is None:
                raise UserError(f"{path}: damaged latent cache entry ({e}); delete it and cache again") from None
            logger.warning("%s: damaged latent cache entry (%s); encoding it again", path, e)
            self._encode([(key, sample)])
            tensors = read_entry(path, key, LATENT_FORMAT, self._expected(sample))
        mask = tensors.get("alpha_mask")
        return LatentEntry(tensors["latents"], None if mask is None else mask.float() / 255)

    def get(self, sample):
        """Unscaled latents (C, h, w) of one sample."""
        return self.load(sample).latents

    def provide(self, sample) -> Optional[dict]:
        """`latent_provider` of the training dataset: {"latents", "alpha_mask"}, or None when the sample
        is not cached (or damaged) and the VAE is released, so the dataset falls back to pixels."""
        try:
            entry = self.load(sample)
        except UserError as e:
            if self.vae is not None:
                raise
            if not self._warned_fallback:  # once: a damaged cache would otherwise flood the log
                logger.warning("%s; using pixels for this and any other uncached sample", e)
                self._warned_fallback = True
            return None
        return {"latents": entry.latents, "alpha_mask": entry.alpha_mask}

    def __contains__(self, sample) -> bool:
        sample = as_latent_sample(sample)
        key = self.key(sample)
        if self.store.in_memory:
            return key in self.store.memory
        return check_entry(self.store.path_for(key, sample.path), key, LATENT_FORMAT, self._expected(sample)) is None

    def release_vae(self) -> None:
        """Drop the reference to the VAE (after `ensure`); later misses then raise a UserError."""
        self.vae = None


# ---------------------------------------------------------------------------------------------
# Samples of a dataset config, for the cache tools


@dataclass
class CacheItem:
    """One image of a dataset with the centre crop a training run gives it."""

    path: str
    plan: CropPlan
    caption: str  # raw caption (see `library.captions.process_caption`)
    subset: Any  # SubsetParams
    dataset_index: int = 0

    def latent_samples(self) -> list:
        sample = LatentSample(self.path, self.plan, False, bool(self.subset.alpha_mask))
        return with_flips([sample]) if self.subset.flip_aug else [sample]


def bucket_settings(dataset) -> BucketSettings:
    if dataset.resolution is None:
        raise UserError("no resolution set for a dataset; pass --resolution (or set resolution in the dataset config)")
    return BucketSettings.from_flags(
        dataset.resolution, dataset.enable_bucket, dataset.min_bucket_reso, dataset.max_bucket_reso,
        dataset.bucket_reso_steps, dataset.bucket_no_upscale,
    )


def image_sizes(paths: Sequence[str], num_workers: int = 2) -> list:
    """(w, h) of each file from its header; one UserError lists the unusable files."""
    from library.image_files import scan_images

    infos = scan_images(paths, num_workers=num_workers)
    bad = [f"{i.path}: {i.reason}" for i in infos if not i.ok]
    if bad:
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise UserError(f"{len(bad)} unusable image(s): {'; '.join(bad[:_SHOWN])}{more}")
    return [i.size for i in infos]


def plan_centre_crops(paths: Sequence[str], sizes: Sequence[tuple], settings: BucketSettings) -> list:
    """CropPlans with centre crops, as training without random_crop makes them."""
    assigner = BucketAssigner(settings)
    assignments = assigner.assign([s[0] for s in sizes], [s[1] for s in sizes])
    plans = []
    for i, (path, size) in enumerate(zip(paths, sizes)):
        if not assignments.valid[i]:
            assigner.select(size[0], size[1], path)  # raises the UserError that explains it
        a = assignments[i]
        left = (a.resized[0] - a.bucket[0]) // 2
        top = (a.resized[1] - a.bucket[1]) // 2
        plans.append(CropPlan(tuple(size), a.resized, a.bucket, left, top))
    return plans


def collect_cache_items(config, num_workers: int = 2) -> list:
    """Every image of every dataset (training and validation) with its crop plan, in config order.

    Images listed twice (repeats, several subsets) appear once per dataset/subset pair; sizes come
    from metadata when known, else from the file header.
    """
    from library.dataset_sources import collect_entries

    items = []
    for d, (dataset, sources) in enumerate(zip(config.datasets, collect_entries(config))):
        settings = bucket_settings(dataset)
        entries = sources.train + sources.validation
        unknown = [e.path for e in entries if e.image_size is None]
        probed = dict(zip(unknown, image_sizes(unknown, num_workers))) if unknown else {}
        sizes = [e.image_size or probed[e.path] for e in entries]
        plans = plan_centre_crops([e.path for e in entries], sizes, settings)
        seen = set()
        for entry, plan in zip(entries, plans):
            identity = (entry.path, entry.subset_index)
            if identity in seen:
                continue
            seen.add(identity)
            items.append(CacheItem(entry.path, plan, entry.caption, dataset.subsets[entry.subset_index], d))
    return items


def latent_samples_of(items: Iterable[CacheItem]) -> list:
    """Distinct latent samples of cache items (flip twins included where flip_aug is on)."""
    return list(dict.fromkeys(s for item in items for s in item.latent_samples()))


# ---------------------------------------------------------------------------------------------
# Loading only the VAE (the cache tools need nothing else)


def detect_model_family(model_path: str, *, v2: Optional[bool] = None, sdxl: Optional[bool] = None):
    """The family of a checkpoint or diffusers folder, from its keys/configs only (checked against flags)."""
    from library import checkpoint_io, detect
    from library.model_loading import resolve_family

    if not os.path.exists(model_path):
        raise UserError(f"{model_path}: no such file or folder (models are never downloaded; pass a local checkpoint)")
    if os.path.isdir(model_path):
        return resolve_family(detect.detect_diffusers_folder(model_path), model_path, v2, sdxl)
    keys = list(checkpoint_io.read_keys(model_path))
    return resolve_family(detect.detect_single_file(model_path, keys), model_path, v2, sdxl)


def load_vae_for_caching(model_path: str, family, vae_path: Optional[str] = None, dtype=None):
    """The VAE of a checkpoint or diffusers folder (or `vae_path`), reading only the VAE's tensors."""
    from library import checkpoint_io, detect, vae_convert
    from library.model_loading import build_vae, load_vae

    if vae_path or os.path.isdir(model_path):
        return load_vae(vae_path or model_path, family, dtype)
    prefix = detect.VAE_PREFIX
    tensors = checkpoint_io.read_checkpoint(model_path, dtype=dtype, select=lambda k: k.startswith(prefix)).tensors
    if not tensors:
        raise UserError(f"{model_path}: the checkpoint has no VAE ({prefix}*); pass one with --vae")
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return build_vae(vae_convert.ldm_to_diffusers(tensors), family)
