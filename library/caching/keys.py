"""Cache keys: the content hashes and weight fingerprints cache entries are named by.

A cache key is `cache_key(parts)`, the sha256 of a canonical JSON of everything an entry's value
depends on. Two kinds of parts are expensive and live here:

* `FileHasher`: the sha256 of an image file's bytes, memoised per file by size, mtime, ctime and
  inode (in memory, and across runs in a `file_hashes.json` memo beside the entries), so
  unchanged files are not re-read;
* `state_fingerprint`: the sha256 of the names, dtypes, shapes and bytes (all, or evenly spaced
  samples) of a module's tensors, the identity of a VAE or text encoder.

torch is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from library.caching.store import write_bytes_atomic
from library.errors import UserError

logger = logging.getLogger(__name__)


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
                write_bytes_atomic(memo, json.dumps({"version": 1, "files": merged}).encode("utf-8"))
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
# Identities of models


def _tensor_bytes(tensor, sample: Optional[int], dtype=None) -> bytes:
    """Raw bytes of a tensor (as `dtype`), or of `sample` evenly spaced elements plus the last one."""
    import torch

    flat = tensor.detach().reshape(-1)
    if sample is not None and flat.numel() > sample:
        step = flat.numel() // sample
        flat = torch.cat([flat[::step][:sample], flat[-1:]])
    flat = flat.to("cpu", dtype if dtype is not None and flat.is_floating_point() else flat.dtype).contiguous()
    return flat.view(torch.uint8).numpy().tobytes()


def state_fingerprint(module, prefixes: Optional[tuple] = None, sample: Optional[int] = None, dtype=None) -> str:
    """sha256 over (name, dtype, shape, bytes) of a module's state dict, optionally only some prefixes.

    sample=None hashes every byte; an int hashes that many evenly spaced elements of each tensor.
    dtype: hash floating tensors as if cast to it (a module whose weights are held in half precision
    and one read in float32 from the same file compute alike, so they fingerprint alike).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device; a cache needs real weights")
        shown = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        digest.update(f"{name}|{shown}|{list(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor, sample, dtype))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Keys


def cache_key(parts: dict) -> str:
    """sha256 of a canonical JSON of the parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
