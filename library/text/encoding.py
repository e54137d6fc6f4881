"""Turn captions and prompts into U-Net conditioning, the way sd-scripts does (spec: text-encoding.md).

* Long prompts: a caption of up to 75·n tokens (n = 1, 2, 3 for `--max_token_length` unset/150/225) is
  cut into n chunks of 77 ids, each wrapped in BOS…EOS, encoded in one batch, and re-assembled into
  75n + 2 states (first BOS, 75 content states per chunk, last state of the last chunk).
* Layer selection (`--clip_skip`): SD1/SD2 take `hidden_states[-k]` and apply the final layer norm
  (k = 1 is `last_hidden_state`); SDXL takes the penultimate layer of both encoders without it and
  concatenates them. SDXL's pooled vector is TE2's final-LN state at the first EOS of chunk 0, projected.
* SDXL vector conditioning: time ids (original size, crop, target size) and the 2816-d `y`.
* Prompt weighting (A1111 `(word:1.2)` syntax): training multiplies the content states by the weights;
  generation keeps every chunk's BOS/EOS (77n states) and, by default, restores the mean afterwards.

One code path serves every family: the chunk fix-ups written for zero-padding tokenizers are no-ops
when PAD is EOS, and the per-family differences (default layer, final LN, pooled output) are data.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from library.text.prompt_syntax import parse_prompt_attention
from library.errors import UserError

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 77  # CLIP's context: BOS + 75 content tokens + EOS
CHUNK_CONTENT = CHUNK_LENGTH - 2
# --max_token_length → number of chunks. sd-scripts offers None/150/225; 75 is accepted as "None".
_CHUNKS_BY_MAX_TOKEN_LENGTH = {None: 1, 75: 1, 150: 2, 225: 3}
NORMALIZE_MODES = ("original", "abs", "none")
SIZE_EMBED_DIM = 256  # per scalar of the SDXL time ids


@dataclass
class Conditioning:
    """What the U-Net gets from the text: cross-attention context and (SDXL) the pooled TE2 vector."""

    context: torch.Tensor  # (B, tokens, C): C = 768 SD1, 1024 SD2, 2048 SDXL
    pooled: Optional[torch.Tensor] = None  # (B, 1280) for SDXL, else None


@dataclass(frozen=True)
class SelectionRule:
    """Which hidden state a family's U-Net was trained on."""

    default_clip_skip: int  # used when --clip_skip is unset; 1 = last layer
    final_layer_norm: bool  # apply the encoder's final LN to the selected layer
    clip_skip_in_training: bool  # sd-scripts' trainer honours --clip_skip for this family


def selection_rule(family) -> SelectionRule:
    """SD1/SD2 (LDM) use the last layer + final LN; SDXL (SGM) the penultimate layer without it."""
    # families.py has no field for this yet; SDXL is the one family whose conditioner differs.
    if family.is_sdxl:
        return SelectionRule(default_clip_skip=2, final_layer_norm=False, clip_skip_in_training=False)
    return SelectionRule(default_clip_skip=1, final_layer_norm=True, clip_skip_in_training=True)


def training_clip_skip(family, clip_skip: Optional[int]) -> tuple[Optional[int], Optional[str]]:
    """The clip_skip a trainer should pass to `encode`, and a warning to log (or None), as sd-scripts does."""
    if clip_skip is None:
        return None, None
    if not selection_rule(family).clip_skip_in_training:
        return None, f"--clip_skip is ignored when training {family.title}: it always uses the penultimate layers"
    if any(spec.dropped_openclip_layers for spec in family.text_encoders):
        return clip_skip, (
            f"--clip_skip {clip_skip} with {family.title}: its text encoder already ends at OpenCLIP's penultimate "
            "layer, so clip_skip 2 goes one layer deeper than the model was trained with"
        )
    return clip_skip, None


# ---------------------------------------------------------------------------------------------
# Tokenizing and chunking


def chunk_count(max_token_length: Optional[int]) -> int:
    """Number of 77-id chunks for a `--max_token_length` value (None/75 → 1, 150 → 2, 225 → 3)."""
    try:
        return _CHUNKS_BY_MAX_TOKEN_LENGTH[max_token_length]
    except (KeyError, TypeError):
        raise UserError(
            f"--max_token_length {max_token_length!r} is not supported; use 150 or 225, or leave it unset for 75"
        ) from None


def _slice_chunks(sequence: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 75n+2, ...) → (B, n, 77, ...): chunk c = [first] + sequence[75c+1 : 75c+76] + [last]."""
    first, last = sequence[:, :1], sequence[:, -1:]
    chunks = [
        torch.cat([first, sequence[:, 1 + CHUNK_CONTENT * c : 1 + CHUNK_CONTENT * (c + 1)], last], dim=1)
        for c in range(n)
    ]
    return torch.stack(chunks, dim=1)


def _fix_chunk_specials(chunks: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Give every chunk a proper EOS when the tokenizer pads with a non-EOS id (SD2, SDXL TE2).

    A chunk whose content runs to its end gets EOS as its last id; a chunk with no content becomes
    BOS EOS PAD…. When PAD is EOS both rules change nothing, so SD1 goes through here unchanged.
    """
    chunks = chunks.clone()
    before_last = chunks[..., -2]
    runs_to_end = (before_last != eos_id) & (before_last != pad_id)
    chunks[..., -1] = torch.where(runs_to_end, torch.full_like(before_last, eos_id), chunks[..., -1])
    empty = chunks[..., 1] == pad_id
    chunks[..., 1] = torch.where(empty, torch.full_like(before_last, eos_id), chunks[..., 1])
    return chunks


def chunk_ids(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Padded ids (B, 75n+2) → chunked ids (B, n, 77), with the pad≠eos fix-ups."""
    n = (ids.shape[1] - 2) // CHUNK_CONTENT
    if ids.shape[1] != CHUNK_CONTENT * n + 2 or n < 1:
        raise ValueError(f"ids of length {ids.shape[1]} are not 75·n + 2 long")
    return _fix_chunk_specials(_slice_chunks(ids, n), eos_id, pad_id)


def _as_list(texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def tokenize(tokenizer, texts: Sequence[str], max_token_length: Optional[int] = None) -> torch.Tensor:
    """Captions → LongTensor (B, n, 77) of chunked ids, as sd-scripts' training tokenizer makes them."""
    n = chunk_count(max_token_length)
    ids = tokenizer(
        _as_list(texts), padding="max_length", truncation=True, max_length=CHUNK_CONTENT * n + 2,
        return_tensors="pt",
    ).input_ids
    return chunk_ids(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Content ids of a prompt (no BOS/EOS) and the weight of each, from its `(word:w)` fragments."""
    fragments = parse_prompt_attention(text)
    # verbose=False: fragments are not truncated here, so the tokenizer would warn about > 77 ids.
    encoded = tokenizer([fragment for fragment, _ in fragments], add_special_tokens=False, verbose=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for fragment_ids, (_, weight) in zip(encoded, fragments):
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
    return ids, weights


def _pad_weighted(tokenizer, tokens: list[tuple[list[int], list[float]]], n: int):
    """[BOS] + ids + [EOS] + [PAD…] (length 75n+2) with weight 1 on every special id, then chunked."""
    length = CHUNK_CONTENT * n + 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, weight_rows = [], []
    for ids, weights in tokens:
        ids, weights = ids[: length - 2], weights[: length - 2]
        rows.append([bos] + ids + [eos] + [pad] * (length - 2 - len(ids)))
        weight_rows.append([1.0] + weights + [1.0] * (length - 1 - len(weights)))
    ids = chunk_ids(torch.tensor(rows, dtype=torch.long), eos, pad)
    return ids, _slice_chunks(torch.tensor(weight_rows, dtype=torch.float32), n)


def _tokenize_prompts(tokenizer, texts) -> list[tuple[list[int], list[float]]]:
    return [_weighted_tokens(tokenizer, text) for text in _as_list(texts)]


def _warn_if_truncated(tokens, n: int) -> None:
    longest = max((len(ids) for ids, _ in tokens), default=0)
    if longest > CHUNK_CONTENT * n:
        logger.warning(
            f"prompt truncated to {CHUNK_CONTENT * n} tokens (it has {longest}); raise the chunk limit to keep it"
        )


def tokenize_weighted(tokenizer, texts: Sequence[str], max_token_length: Optional[int] = None):
    """Weighted captions → (ids (B, n, 77), weights (B, n, 77)) for `--weighted_captions` training."""
    n = chunk_count(max_token_length)
    tokens = _tokenize_prompts(tokenizer, texts)
    _warn_if_truncated(tokens, n)
    return _pad_weighted(tokenizer, tokens, n)


# ---------------------------------------------------------------------------------------------
# Running an encoder


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5: CLIPTextModel holds the transformer's parts directly, the projection model keeps `.text_model`.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def _forward(text_encoder, ids: torch.Tensor):
    """Run the encoder once over all chunks: ids (B, n, 77) → outputs for B·n rows, with every layer."""
    device = next(text_encoder.parameters()).device
    flat = ids.reshape(-1, ids.shape[-1]).to(device)
    return text_encoder(input_ids=flat, output_hidden_states=True, return_dict=True)


def _select_layer(text_encoder, output, clip_skip: int, apply_final_layer_norm: bool) -> torch.Tensor:
    layers = len(output.hidden_states) - 1  # hidden_states[0] is the embedding output
    if not 1 <= clip_skip <= layers:
        raise UserError(
            f"--clip_skip {clip_skip} is out of range: the text encoder has {layers} layers (use 1..{layers})"
        )
    states = output.hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(states) if apply_final_layer_norm else states


def reassemble_chunks(states: torch.Tensor, n: int) -> torch.Tensor:
    """Chunk states (B·n, 77, C) → (B, 75n+2, C): first BOS, each chunk's 75 content slots, last slot."""
    per_chunk = states.reshape(-1, n, CHUNK_LENGTH, states.shape[-1])
    content = per_chunk[:, :, 1 : CHUNK_LENGTH - 1].flatten(1, 2)
    return torch.cat([per_chunk[:, 0, :1], content, per_chunk[:, -1, -1:]], dim=1)


def encode_hidden(text_encoder, ids: torch.Tensor, clip_skip: Optional[int], final_layer_norm: bool) -> torch.Tensor:
    """Chunked ids (B, n, 77) → re-assembled states (B, 75n+2, C) of layer -clip_skip (None = last)."""
    output = _forward(text_encoder, ids)
    states = _select_layer(text_encoder, output, 1 if clip_skip is None else clip_skip, final_layer_norm)
    return reassemble_chunks(states, ids.shape[1])


def pooled_at_first_eos(text_encoder, output, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Projected final-LN state of chunk 0 at its first EOS (0 if none): robust to TI ids above EOS."""
    n = ids.shape[1]
    last = output.last_hidden_state.reshape(ids.shape[0], n, CHUNK_LENGTH, -1)[:, 0]
    first_chunk = ids[:, 0].to(last.device)
    position = (first_chunk == eos_id).int().argmax(dim=-1)
    return text_encoder.text_projection(last[torch.arange(last.shape[0], device=last.device), position])


# `original` rescales by (mean before weighting) / (mean after). That ratio means something only when both
# means stand clear of 0: an encoder whose final layer norm has no bias (or a near-symmetric output) has a
# mean that is rounding noise, and the ratio is then an arbitrary number (0/0 = NaN, a huge or negative
# factor). Below this share of the mean |x| a mean counts as vanishing, and the row is rescaled by its
# mean |x| instead (the `abs` rule), which keeps the magnitude the rescale is there to keep.
VANISHING_MEAN = 1e-3


def _apply_weights(states: torch.Tensor, weights: torch.Tensor, normalize: str) -> torch.Tensor:
    """Multiply states (B, T, C) by per-token weights (B, T); optionally restore each row's mean.

    A row whose weights are all 1 is returned as it is: it is the unweighted encoding, whatever the mode.
    """
    weights = weights.to(device=states.device, dtype=states.dtype)
    weighted = states * weights.unsqueeze(-1)
    if normalize == "none":
        return weighted
    before_abs, after_abs = _row_mean(states, "abs"), _row_mean(weighted, "abs")
    ratio = torch.where(after_abs > 0, before_abs / after_abs.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    if normalize == "original":
        before, after = _row_mean(states, "original"), _row_mean(weighted, "original")
        floor = torch.minimum(before_abs, after_abs) * VANISHING_MEAN
        usable = (before.abs() > floor) & (after.abs() > floor) & (before.sign() == after.sign())
        ratio = torch.where(usable, before / torch.where(usable, after, 1.0), ratio)
        weighted_rows = ~(weights == 1).all(dim=1)
        if bool((weighted_rows & ~usable).any()):
            _note_vanishing_mean()
    ratio = torch.where((weights == 1).all(dim=1), 1.0, ratio)
    return weighted * ratio.to(states.dtype)[:, None, None]


_noted = []


def _note_vanishing_mean() -> None:
    if not _noted:  # once per process: the same model gives it for many prompts
        _noted.append(True)
        logger.info("--emb_normalize_mode original: this text encoder's mean output is ~0, so weighted prompts "
                    "are rescaled to their mean |x| instead (as --emb_normalize_mode abs does)")


def _row_mean(states: torch.Tensor, normalize: str) -> torch.Tensor:
    values = states.float()
    return (values.abs() if normalize == "abs" else values).mean(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# A family's conditioner


class TextConditioner:
    """The text side of a model: its tokenizers and encoders, encoding the way the family was trained."""

    def __init__(self, family, tokenizers: Sequence, text_encoders: Sequence):
        if not len(tokenizers) == len(text_encoders) == len(family.text_encoders):
            raise ValueError(
                f"{family.title} needs {len(family.text_encoders)} tokenizers and text encoders, "
                f"got {len(tokenizers)} and {len(text_encoders)}"
            )
        self.family = family
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.rule = selection_rule(family)

    def _clip_skip(self, clip_skip: Optional[int]) -> int:
        if clip_skip is None:
            return self.rule.default_clip_skip
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise UserError(f"--clip_skip must be a whole number ≥ 1 (1 = last layer), not {clip_skip!r}")
        return clip_skip

    def _encode_chunks(self, ids_list, clip_skip: Optional[int]):
        """Per encoder: selected states (B·n, 77, C_i); plus the pooled vector of the projection encoder."""
        clip_skip = self._clip_skip(clip_skip)
        states, pooled = [], None
        encoders = zip(self.family.text_encoders, self.tokenizers, self.text_encoders, ids_list)
        for spec, tokenizer, encoder, ids in encoders:
            output = _forward(encoder, ids)
            states.append(_select_layer(encoder, output, clip_skip, self.rule.final_layer_norm))
            if spec.with_projection:
                pooled = pooled_at_first_eos(encoder, output, ids, tokenizer.eos_token_id)
        return states, pooled

    # --- training ---------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_token_length: Optional[int] = None) -> list[torch.Tensor]:
        """Chunked ids (B, n, 77), one tensor per text encoder."""
        return [tokenize(tokenizer, texts, max_token_length) for tokenizer in self.tokenizers]

    def tokenize_weighted(self, texts: Sequence[str], max_token_length: Optional[int] = None) -> list[tuple]:
        """(ids, weights), both (B, n, 77), one pair per text encoder."""
        return [tokenize_weighted(tokenizer, texts, max_token_length) for tokenizer in self.tokenizers]

    def encode_tokens(self, ids_list, clip_skip: Optional[int] = None, weights_list=None) -> Conditioning:
        """Training encode of pre-tokenized chunks → context (B, 75n+2, C); weights multiply content states."""
        states, pooled = self._encode_chunks(ids_list, clip_skip)
        n = ids_list[0].shape[1]
        pieces = [reassemble_chunks(s, n) for s in states]
        if weights_list is not None:
            # BOS and the last slot carry weight 1, so this touches only positions [75i+1, 75i+76).
            pieces = [
                p * reassemble_chunks(w.reshape(-1, CHUNK_LENGTH, 1), n).to(p) for p, w in zip(pieces, weights_list)
            ]
        return Conditioning(torch.cat(pieces, dim=-1), pooled)

    def encode(
        self, texts: Sequence[str], max_token_length: Optional[int] = None, clip_skip: Optional[int] = None,
        weighted: bool = False,
    ) -> Conditioning:
        """Captions → training conditioning; `weighted` parses `(word:w)` weights (`--weighted_captions`)."""
        if not weighted:
            return self.encode_tokens(self.tokenize(texts, max_token_length), clip_skip)
        pairs = self.tokenize_weighted(texts, max_token_length)
        return self.encode_tokens([ids for ids, _ in pairs], clip_skip, [w for _, w in pairs])

    # --- generation -------------------------------------------------------------------------

    def encode_weighted(
        self, texts: Sequence[str], max_embeddings_multiples: Optional[int] = 1, clip_skip: Optional[int] = None,
        normalize: str = "original",
    ) -> Conditioning:
        """Prompts → generation conditioning as gen_img builds it: context (B, 77n, C), every chunk with its BOS/EOS.

        n = chunks needed by the longest prompt of the batch, at most `max_embeddings_multiples`; pass the
        prompts and negative prompts in one call so they get the same length. `normalize`: "original"
        rescales each row (per encoder) to its unweighted mean, "abs" to its mean |x|, "none" only multiplies.
        """
        limit = 1 if max_embeddings_multiples is None else max_embeddings_multiples
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UserError(
                f"--max_embeddings_multiples must be a whole number ≥ 1, not {max_embeddings_multiples!r}"
            )
        if normalize not in NORMALIZE_MODES:
            raise UserError(f"--emb_normalize_mode {normalize!r} is not one of {', '.join(NORMALIZE_MODES)}")
        ids_list, weights_list = [], []
        for tokenizer in self.tokenizers:
            tokens = _tokenize_prompts(tokenizer, texts)
            _warn_if_truncated(tokens, limit)
            longest = min(max(len(ids) for ids, _ in tokens), CHUNK_CONTENT * limit)
            n = max(1, min(limit, (longest - 1) // CHUNK_CONTENT + 1))
            ids, weights = _pad_weighted(tokenizer, tokens, n)
            ids_list.append(ids)
            weights_list.append(weights)
        states, pooled = self._encode_chunks(ids_list, clip_skip)
        batch = ids_list[0].shape[0]
        pieces = [
            _apply_weights(s.reshape(batch, -1, s.shape[-1]), w.reshape(batch, -1), normalize)
            for s, w in zip(states, weights_list)
        ]
        return Conditioning(torch.cat(pieces, dim=-1), pooled)


# ---------------------------------------------------------------------------------------------
# SDXL vector conditioning


def sdxl_time_ids(original_size_hw, crop_top_left, target_size_hw, dtype=torch.int64) -> torch.Tensor:
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w): (6,) for pairs, (B, 6) for (B, 2) tensors."""
    parts = [torch.as_tensor(x, dtype=dtype) for x in (original_size_hw, crop_top_left, target_size_hw)]
    return torch.cat(torch.broadcast_tensors(*parts), dim=-1)


def size_embeddings(time_ids: torch.Tensor) -> torch.Tensor:
    """Each scalar → 256-d [cos, sin] sinusoid (period base 10000), concatenated: (..., 6) → (..., 1536)."""
    half = SIZE_EMBED_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=time_ids.device) / half)
    args = time_ids.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten(-2)


def sdxl_vector_cond(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's `y`: pooled TE2 (B, 1280) + size embeddings of the time ids (6 or B×6) → (B, 2816)."""
    embedded = size_embeddings(time_ids.to(pooled.device))
    if embedded.ndim == 1:
        embedded = embedded.expand(pooled.shape[0], -1)
    return torch.cat([pooled, embedded.to(pooled.dtype)], dim=-1)
