"""Text-encoder output cache: the conditioning of each distinct caption, encoded once.

An entry holds what `TextConditioner.encode` returns for one caption: `context` (75n+2, C) and, for
SDXL, `pooled` (1280,). Its key is the sha256 of the caption text *after* caption processing,
the number of 75-token chunks (`--max_token_length`), the effective clip_skip, weighted-caption
mode, the storage dtype and the **encoder identity**: family, every tokenizer (class, vocabulary
and special ids) and a sampled fingerprint of every text encoder (names, dtypes, shapes, and 4096
evenly spaced elements of each tensor; hashing all bytes of SDXL's encoders would take seconds).
Identical captions share one entry, so a DreamBooth folder captioned only by its class tokens is
encoded once.

Caching is only correct when a sample's caption text never changes between fetches:
`text_encoder_cache_blockers` lists the settings that break this (caption shuffle, dropout,
token warm-up, tag dropout, wildcards) and `check_text_encoder_caching` turns them into a
UserError. Entries are stored like latents (see `library.caching.store`): memory, one folder, or
`<image folder>/.sdtrain_cache/text_encoder_outputs/` beside each sample's image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from typing import Iterable, NamedTuple, Optional, Sequence

from library.caching.keys import cache_key, state_fingerprint
from library.caching.store import (
    CacheStats,
    CorruptEntry,
    EntryStore,
    check_entry,
    plan_fill,
    read_entry,
    safetensors_dtype,
    warn_damaged,
    write_entry,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

TEXT_KIND = "text_encoder_outputs"
TEXT_FORMAT = "sdtrain.text_encoder_outputs.v1"
FINGERPRINT_SAMPLE = 4096  # elements hashed per text-encoder tensor


# ---------------------------------------------------------------------------------------------
# When caching is allowed


def text_encoder_cache_blockers(config) -> list:
    """Settings of a resolved dataset config that make a sample's caption differ between fetches."""
    blockers = list(config.text_encoder_cache_blockers())
    for d, dataset in enumerate(config.datasets, 1):
        for s, subset in enumerate(dataset.subsets, 1):
            if subset.enable_wildcard:
                blockers.append(f"enable_wildcard (dataset #{d}, subset #{s})")
    return blockers


def check_text_encoder_caching(config, train_text_encoder: bool = False) -> None:
    """UserError when text-encoder outputs cannot be cached for this run."""
    if train_text_encoder:
        raise UserError(
            "--cache_text_encoder_outputs needs frozen text encoders; drop it or train the U-Net only "
            "(e.g. --network_train_unet_only)"
        )
    blockers = text_encoder_cache_blockers(config)
    if blockers:
        raise UserError(
            "text encoder outputs cannot be cached: captions change between steps because of " + ", ".join(blockers)
            + "; turn these off or drop the caching flag"
        )


def fixed_caption(caption: str, subset) -> str:
    """The text a training run tokenizes for a caption when nothing random is enabled."""
    from library.data.captions import process_caption

    return process_caption(caption, subset, 1, random.Random(0))


# ---------------------------------------------------------------------------------------------
# Identity of the text side of a model


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    specials = [type(tokenizer).__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                tokenizer.pad_token_id, getattr(tokenizer, "model_max_length", None)]
    return hashlib.sha256(json.dumps([specials, vocab], ensure_ascii=False).encode("utf-8")).hexdigest()


def text_encoder_identity(conditioner) -> str:
    """Family, tokenizers and (sampled) encoder weights of a `TextConditioner`."""
    from library.models.frozen_weights import compute_dtype

    parts = [conditioner.family.name]
    parts += [tokenizer_fingerprint(t) for t in conditioner.tokenizers]
    # weights held in half precision are hashed as the float32 values they compute with
    parts += [state_fingerprint(e, sample=FINGERPRINT_SAMPLE, dtype=compute_dtype(e)) for e in conditioner.text_encoders]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache


class TextSample(NamedTuple):
    """A processed caption; image_path only chooses the folder of a cache kept beside the images."""

    caption: str
    image_path: Optional[str] = None


def _as_text_sample(item) -> TextSample:
    if isinstance(item, str):
        return TextSample(item)
    return TextSample(item[0], item[1] if len(item) > 1 else None)


class TextEncoderOutputCache:
    """Conditioning of captions, encoded once, in memory (cache_dir None) or on disk.

    max_token_length / clip_skip / weighted are passed to `conditioner.encode` exactly as the
    trainer would (clip_skip already filtered by `text_encoding.training_clip_skip`).
    """

    def __init__(self, conditioner, cache_dir: Optional[str] = None, batch_size: int = 8, dtype=None, *,
                 max_token_length: Optional[int] = None, clip_skip: Optional[int] = None, weighted: bool = False,
                 skip_check: bool = False):
        import torch
        from library.text.encoding import chunk_count, selection_rule

        self.conditioner = conditioner
        self.family = conditioner.family
        self.batch_size = max(1, int(batch_size))
        self.dtype = dtype or torch.float32
        self.max_token_length = max_token_length
        self.clip_skip = clip_skip
        self.weighted = weighted
        self.skip_check = skip_check
        self.store = EntryStore(cache_dir, TEXT_KIND)
        self.chunks = chunk_count(max_token_length)
        effective_clip_skip = clip_skip if clip_skip is not None else selection_rule(self.family).default_clip_skip
        self._key_parts = {
            "kind": TEXT_FORMAT, "chunks": self.chunks, "clip_skip": effective_clip_skip, "weighted": bool(weighted),
            "encoders": text_encoder_identity(conditioner), "dtype": str(self.dtype),
        }
        self._expected = self._expected_tensors()
        self.stats = CacheStats()
        self._warned_fallback = False

    def _expected_tensors(self) -> dict:
        dtype = safetensors_dtype(self.dtype)
        width = sum(int(e.config.hidden_size) for e in self.conditioner.text_encoders)
        expected = {"context": (dtype, (75 * self.chunks + 2, width))}
        projected = [e for spec, e in zip(self.family.text_encoders, self.conditioner.text_encoders) if spec.with_projection]
        if projected:
            expected["pooled"] = (dtype, (int(projected[0].config.projection_dim),))
        return expected

    def key(self, caption: str) -> str:
        return cache_key({**self._key_parts, "caption": caption})

    def entry_path(self, caption: str, image_path: Optional[str] = None) -> Optional[str]:
        return None if self.store.in_memory else self.store.path_for(self.key(caption), image_path)

    # --- filling ----------------------------------------------------------------------------

    def ensure(self, items: Iterable, *, process_index: int = 0, num_processes: int = 1) -> CacheStats:
        """Encode every caption without a valid entry; items are captions or `TextSample`s."""
        start = time.perf_counter()
        samples = [_as_text_sample(i) for i in items]
        stats = CacheStats(requested=len(samples))
        keyed = [(self.key(sample.caption), sample.image_path, sample) for sample in samples]
        missing, damaged = plan_fill(self.store, keyed, stats, process_index, num_processes, self._check)
        warn_damaged(damaged, "text encoder output")
        self._encode(missing)
        stats.encoded = len(missing)
        stats.seconds = time.perf_counter() - start
        self.stats.add(stats)
        return stats

    def _check(self, path: str, key: str, sample: TextSample) -> Optional[str]:
        if self.skip_check:
            return None if os.path.exists(path) else "missing"
        return check_entry(path, key, TEXT_FORMAT, self._expected)

    def _encode(self, missing: list) -> None:
        if not missing:
            return
        if self.conditioner is None:
            raise UserError("text encoder outputs are not cached and the encoders were released; cache them first")
        import torch

        # Encode each distinct caption once even when several folders store a copy.
        by_caption: dict = {}
        for key, sample in missing:
            by_caption.setdefault(sample.caption, []).append((key, sample))
        captions = list(by_caption)
        for start in range(0, len(captions), self.batch_size):
            batch = captions[start : start + self.batch_size]
            with torch.no_grad():
                cond = self.conditioner.encode(batch, self.max_token_length, self.clip_skip, weighted=self.weighted)
            for row, caption in enumerate(batch):
                context = cond.context[row].float().cpu().to(self.dtype)
                pooled = None if cond.pooled is None else cond.pooled[row].float().cpu().to(self.dtype)
                for key, sample in by_caption[caption]:
                    self._put(key, sample, context, pooled)

    def _put(self, key: str, sample: TextSample, context, pooled) -> None:
        if self.store.in_memory:
            self.store.memory[key] = (context, pooled)
            return
        path = self.store.path_for(key, sample.image_path)
        self.store.prepare_dir(path)
        tensors = {"context": context}
        if pooled is not None:
            tensors["pooled"] = pooled
        write_entry(path, tensors, {"format": TEXT_FORMAT, "key": key, "caption": sample.caption})

    # --- reading ----------------------------------------------------------------------------

    def load(self, caption: str, image_path: Optional[str] = None) -> tuple:
        """(context (T, C), pooled (P,) or None) of one caption; encoded on a miss when possible."""
        key = self.key(caption)
        sample = TextSample(caption, image_path)
        if self.store.in_memory:
            if key not in self.store.memory:
                self._encode([(key, sample)])
            return self.store.memory[key]
        path = self.store.path_for(key, image_path)
        try:
            tensors = read_entry(path, key, TEXT_FORMAT, self._expected)
        except FileNotFoundError:
            if self.conditioner is None:
                raise UserError(f"caption {caption[:60]!r}: its text encoder outputs are not cached ({path}); run "
                                f"tools/cache_text_encoder_outputs.py with the same settings") from None
            self._encode([(key, sample)])
            tensors = read_entry(path, key, TEXT_FORMAT, self._expected)
        except (CorruptEntry, OSError) as e:
            if self.conditioner is None:
                raise UserError(f"{path}: damaged text encoder output cache entry ({e}); delete it and cache again") from None
            logger.warning("%s: damaged text encoder output cache entry (%s); encoding it again", path, e)
            self._encode([(key, sample)])
            tensors = read_entry(path, key, TEXT_FORMAT, self._expected)
        return tensors["context"], tensors.get("pooled")

    def get(self, caption: str, image_path: Optional[str] = None):
        """`Conditioning` of one caption without a batch axis: context (T, C), pooled (P,) or None."""
        from library.text.encoding import Conditioning

        context, pooled = self.load(caption, image_path)
        return Conditioning(context, pooled)

    def provide(self, sample, caption: str):
        """`text_provider` of the training dataset: the caption's `Conditioning` (no batch axis), or
        None when it is not cached and the encoders are released."""
        try:
            return self.get(caption, getattr(sample, "path", None))
        except UserError as e:
            if self.conditioner is not None:
                raise
            if not self._warned_fallback:
                logger.warning("%s; encoding this and any other uncached caption during training", e)
                self._warned_fallback = True
            return None

    def get_batch(self, captions: Sequence[str], image_paths: Optional[Sequence[Optional[str]]] = None):
        """`Conditioning` of a batch: context (B, T, C), pooled (B, P) or None."""
        import torch
        from library.text.encoding import Conditioning

        paths = image_paths if image_paths is not None else [None] * len(captions)
        loaded = [self.load(c, p) for c, p in zip(captions, paths)]
        pooled = None if loaded[0][1] is None else torch.stack([p for _, p in loaded])
        return Conditioning(torch.stack([c for c, _ in loaded]), pooled)

    def release_encoders(self) -> None:
        """Drop the reference to the text encoders; later misses then raise a UserError."""
        self.conditioner = None
