"""Text-encoder weights: HF CLIP configs, models and the OpenCLIP <-> HF CLIP conversion.

The canonical in-memory form of a text encoder's weights is the "classic" HF naming that every
file in the ecosystem uses (`text_model.embeddings.…`, `text_model.encoder.layers.N.…`,
`text_model.final_layer_norm.…` and, for projection models, `text_projection.weight`). This
module converts between that form and

* the module paths of the installed transformers (5.x flattened `CLIPTextModel` drops the
  `text_model.` level; `CLIPTextModelWithProjection` keeps it),
* HF-CLIP single-file sections (legacy keys without `text_model.`, the `position_ids` buffer),
* OpenCLIP text towers (SD2 ViT-H, SDXL bigG) in single files.

Unlike sd-scripts, the SDXL `text_projection` is transposed on the way in and out: OpenCLIP
computes `x @ P`, an HF Linear computes `x @ W.T`, so `W = P.T`.

Tensors are renamed, split into views or concatenated; nothing is copied except where the
layout really changes (the transposed projection is returned contiguous so it can be saved
with safetensors; `in_proj` is rebuilt with `torch.cat`).
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch

from library.errors import UserError

VOCAB_SIZE = 49408
MAX_POSITIONS = 77
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = 1  # HF default; our tokenizers choose their own padding, the model never reads it

CLASSIC_ROOT = "text_model."
PROJECTION_KEY = "text_projection.weight"
POSITION_IDS_KEY = "text_model.embeddings.position_ids"
_TOKEN_EMBEDDING = "embeddings.token_embedding.weight"

# OpenCLIP resblock suffix -> classic encoder-layer suffix (in_proj is handled separately).
_RESBLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Order of a resblock's keys in OpenCLIP state dicts (kept so written files match the originals).
_RESBLOCK_ORDER = (
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
    "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)
# Order of a classic encoder layer's keys (the HF module registration order).
_LAYER_ORDER = (
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
    "self_attn.v_proj.bias", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.out_proj.weight", "self_attn.out_proj.bias", "layer_norm1.weight",
    "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "layer_norm2.weight", "layer_norm2.bias",
)
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_RESBLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
_LEGACY_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


# ----------------------------------------------------------------------------------------------
# configs and models


def _make_config(spec, hidden: int, intermediate: int, layers: int, vocab: int = VOCAB_SIZE,
                 positions: int = MAX_POSITIONS, projection_dim: Optional[int] = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        hidden_act=spec.hidden_act,
        # Unused by CLIPTextModel; set to the width so a config round-trips through the weights.
        projection_dim=projection_dim if projection_dim is not None else hidden,
        bos_token_id=BOS_TOKEN_ID,
        # Not 2: with eos_token_id == 2 transformers pools at argmax(ids), which picks a
        # textual-inversion token (id > 49407) instead of the EOS. With 49407 it pools at the first EOS.
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def clip_config(spec, size: str = "full"):
    """HF `CLIPTextConfig` for a family text encoder at "full" or "tiny" size."""
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', not {size!r}")
    dims = spec.full if size == "full" else spec.tiny
    hidden = dims["hidden_size"]
    return _make_config(spec, hidden, dims["intermediate_size"], dims["num_hidden_layers"],
                        projection_dim=hidden)


def _layer_indices(classic_sd: dict) -> set:
    return {int(m.group(1)) for k in classic_sd if (m := _LAYER_RE.match(k))}


def _require(sd: dict, key: str, what: str):
    if key not in sd:
        raise UserError(f"{what}: key {key!r} is missing; the file is not a complete CLIP text encoder")
    return sd[key]


def infer_clip_config(classic_sd: dict, spec):
    """`CLIPTextConfig` read from the tensor shapes of classic-named weights (act from `spec`)."""
    what = f"{spec.role} text encoder"
    token = _require(classic_sd, "text_model.embeddings.token_embedding.weight", what)
    positions = _require(classic_sd, "text_model.embeddings.position_embedding.weight", what)
    fc1 = _require(classic_sd, "text_model.encoder.layers.0.mlp.fc1.weight", what)
    layers = _layer_indices(classic_sd)
    if layers != set(range(len(layers))):
        raise UserError(f"{what}: encoder layers are not numbered 0..N-1 (found {sorted(layers)})")
    hidden = token.shape[1]
    projection = classic_sd.get(PROJECTION_KEY)
    if spec.with_projection and projection is None:
        raise UserError(f"{what}: key {PROJECTION_KEY!r} is missing; SDXL's second text encoder needs it")
    return _make_config(
        spec, hidden, fc1.shape[0], len(layers), vocab=token.shape[0], positions=positions.shape[0],
        projection_dim=projection.shape[0] if projection is not None else hidden,
    )


def text_encoder_class(spec):
    """The transformers class that holds this text encoder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel


def build_text_encoder(config, spec, device="meta", dtype: Optional[torch.dtype] = None):
    """CLIPTextModel(WithProjection) for `config`; on "meta" no memory is used and nothing is initialised.

    A meta model becomes usable through `load_into_model`.
    """
    cls = text_encoder_class(spec)
    if str(device) == "meta":
        with torch.device("meta"):
            model = cls(config)
    else:
        model = cls(config).to(device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# classic names <-> installed transformers module paths


def _model_root(model) -> str:
    """Prefix the installed transformers puts before `embeddings.token_embedding.weight`."""
    for key in model.state_dict().keys():
        if key.endswith(_TOKEN_EMBEDDING):
            return key[: -len(_TOKEN_EMBEDDING)]
    raise ValueError(f"{type(model).__name__} has no {_TOKEN_EMBEDDING} parameter")


def classic_to_model_keys(classic_sd: dict, model) -> dict:
    """Rename classic keys to `model.state_dict()` keys (drops a `position_ids` entry)."""
    root = _model_root(model)
    out = {}
    for key, value in classic_sd.items():
        if key == POSITION_IDS_KEY:
            continue
        if key.startswith(CLASSIC_ROOT):
            key = root + key[len(CLASSIC_ROOT):]
        out[key] = value
    return out


def model_to_classic_keys(model_sd: dict, model) -> dict:
    """Rename `model.state_dict()` keys to classic keys (drops a `position_ids` entry)."""
    root = _model_root(model)
    out = {}
    for key, value in model_sd.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key != PROJECTION_KEY and key.startswith(root):
            key = CLASSIC_ROOT + key[len(root):]
        out[key] = value
    return out


def materialise_position_ids(model) -> None:
    # Non-persistent buffers are never in a state dict, so a meta-built model still has them on meta.
    for name, buf in list(model.named_buffers()):
        if not name.endswith("position_ids"):
            continue
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        device = owner.position_embedding.weight.device
        setattr(owner, "position_ids", torch.arange(buf.shape[-1], device=device)[None])


def load_into_model(model, classic_sd: dict, dtype: Optional[torch.dtype] = None) -> None:
    """Put classic-named weights into `model` by assignment (no copies unless `dtype` casts).

    Every parameter must be supplied; `position_ids` is rebuilt as arange so meta-built models work.
    """
    sd = classic_to_model_keys(classic_sd, model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    expected = set(model.state_dict().keys())
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"{type(model).__name__} weights do not match the model: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' …' if len(unexpected) > 5 else ''}; the file is for a different text encoder"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    materialise_position_ids(model)
    if not any(t.is_meta for t in sd.values()):
        leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftovers:
            raise RuntimeError(f"tensors still on the meta device after loading: {leftovers[:5]}")


# ----------------------------------------------------------------------------------------------
# HF-CLIP single-file sections


def normalize_clip_keys(sd: dict) -> dict:
    """Classic keys from an HF-CLIP single-file section (prefix already removed).

    Legacy keys without `text_model.` are rewritten; `text_model.embeddings.position_ids`
    (int64 [1,77] in older files, sometimes float or corrupted) is dropped.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith(_LEGACY_ROOTS):
            key = CLASSIC_ROOT + key
        if key == POSITION_IDS_KEY:
            continue
        out[key] = value
    return out


def classic_to_clip_section(classic_sd: dict) -> dict:
    """HF-CLIP single-file section (no prefix) with a fresh int64 `position_ids` first, as released files have."""
    positions = classic_sd["text_model.embeddings.position_embedding.weight"].shape[0]
    out = {POSITION_IDS_KEY: torch.arange(positions, dtype=torch.int64)[None]}
    out.update((k, v) for k, v in classic_sd.items() if k != POSITION_IDS_KEY)
    return out


# ----------------------------------------------------------------------------------------------
# OpenCLIP text towers


def _resblock_count(sd: dict, what: str) -> int:
    indices = {int(m.group(1)) for k in sd if (m := _RESBLOCK_RE.match(k))}
    if not indices or indices != set(range(len(indices))):
        raise UserError(f"{what}: transformer.resblocks.N keys missing or not numbered 0..N-1")
    return len(indices)


def _split_resblock(sd: dict, i: int, what: str) -> dict:
    src = f"transformer.resblocks.{i}."
    dst = f"text_model.encoder.layers.{i}."
    parts = {}
    for kind in ("weight", "bias"):
        packed = _require(sd, f"{src}attn.in_proj_{kind}", what)
        # chunk along dim 0 gives contiguous views of the packed tensor: no copy.
        for name, part in zip("qkv", packed.chunk(3, dim=0)):
            parts[f"self_attn.{name}_proj.{kind}"] = part
    for old, new in _RESBLOCK_RENAMES.items():
        parts[new] = _require(sd, src + old, what)
    return {dst + suffix: parts[suffix] for suffix in _LAYER_ORDER}


def openclip_to_classic(sd: dict, spec) -> tuple[dict, dict]:
    """OpenCLIP text tower (keys without prefix) -> (classic weights, extras).

    extras holds, under their original keys, the tensors the HF model has no place for:
    `logit_scale` and, for SD2, the dropped last resblock and `text_projection`. For SDXL the
    projection becomes `text_projection.weight = text_projection.T`, returned contiguous
    (a copy) so it can be saved directly. A nested `text_projection.weight` (Playground v2,
    written by a plain Diffusers->SGM rename) is already in HF layout and is taken as is.
    """
    what = f"{spec.role} text encoder (OpenCLIP)"
    n_blocks = _resblock_count(sd, what)
    kept = n_blocks - spec.dropped_openclip_layers
    if kept < 1:
        raise UserError(f"{what}: only {n_blocks} resblocks; expected more than {spec.dropped_openclip_layers}")
    known = set(_OPENCLIP_TOP) | {"text_projection", "text_projection.weight", "logit_scale"}
    unexpected = [k for k in sd if k not in known and not _RESBLOCK_RE.match(k)]
    if unexpected:
        raise UserError(f"{what}: unexpected keys {unexpected[:5]}; not an OpenCLIP text tower")

    classic = {
        "text_model.embeddings.token_embedding.weight": _require(sd, "token_embedding.weight", what),
        "text_model.embeddings.position_embedding.weight": _require(sd, "positional_embedding", what),
    }
    for i in range(kept):
        classic.update(_split_resblock(sd, i, what))
    classic["text_model.final_layer_norm.weight"] = _require(sd, "ln_final.weight", what)
    classic["text_model.final_layer_norm.bias"] = _require(sd, "ln_final.bias", what)

    extras = {k: v for k, v in sd.items()
              if (m := _RESBLOCK_RE.match(k)) and int(m.group(1)) >= kept}
    if "logit_scale" in sd:
        extras["logit_scale"] = sd["logit_scale"]
    if spec.with_projection:
        if "text_projection" in sd:
            classic[PROJECTION_KEY] = sd["text_projection"].t().contiguous()
        else:
            classic[PROJECTION_KEY] = _require(sd, "text_projection.weight", what)
    else:
        for key in ("text_projection", "text_projection.weight"):
            if key in sd:
                extras[key] = sd[key]
    return classic, extras


def openclip_classic_sources(keys) -> dict:
    """classic key -> (OpenCLIP key, part) for the encoder-layer and top-level weights of an OpenCLIP
    text tower (keys without prefix): part is None for a tensor taken as is, else 0/1/2 for the q/k/v
    third of the packed `attn.in_proj_*` (rows [part·d, (part+1)·d)). Every resblock is listed, also
    the ones the HF model drops; the projection is left out (it is transposed, not renamed)."""
    out = {}
    for key in keys:
        m = _RESBLOCK_RE.match(key)
        if m:
            layer, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rpartition("_")[2]
                for part, name in enumerate("qkv"):
                    out[f"{layer}self_attn.{name}_proj.{kind}"] = (key, part)
            elif rest in _RESBLOCK_RENAMES:
                out[layer + _RESBLOCK_RENAMES[rest]] = (key, None)
        elif key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = (key, None)
    return out


def _pack_layer(classic_sd: dict, i: int, what: str) -> dict:
    src = f"text_model.encoder.layers.{i}."
    dst = f"transformer.resblocks.{i}."
    out = {}
    for suffix in _RESBLOCK_ORDER:
        if suffix.startswith("attn.in_proj_"):
            kind = suffix.rpartition("_")[2]
            qkv = [_require(classic_sd, f"{src}self_attn.{n}_proj.{kind}", what) for n in "qkv"]
            out[dst + suffix] = torch.cat(qkv, dim=0)
        else:
            out[dst + suffix] = _require(classic_sd, src + _RESBLOCK_RENAMES[suffix], what)
    return out


def classic_to_openclip(classic_sd: dict, spec, extras: Optional[dict] = None) -> dict:
    """Exact inverse of `openclip_to_classic` (keys in OpenCLIP order, no prefix).

    Missing extras are synthesised in the dtype/device of the other weights: dropped resblocks
    = copies of the last kept block, SD2 `text_projection` = identity, `logit_scale` = ln(100).
    """
    what = f"{spec.role} text encoder"
    extras = extras or {}
    layers = _layer_indices(classic_sd)
    if not layers or layers != set(range(len(layers))):
        raise UserError(f"{what}: text_model.encoder.layers.N keys missing or not numbered 0..N-1")
    kept = len(layers)
    token = _require(classic_sd, "text_model.embeddings.token_embedding.weight", what)
    like = dict(dtype=token.dtype, device=token.device)
    hidden = token.shape[1]

    blocks = {}
    for i in range(kept):
        blocks.update(_pack_layer(classic_sd, i, what))
    last = f"transformer.resblocks.{kept - 1}."
    for i in range(kept, kept + spec.dropped_openclip_layers):
        for suffix in _RESBLOCK_ORDER:
            key = f"transformer.resblocks.{i}.{suffix}"
            # clone: safetensors refuses two keys sharing one storage.
            blocks[key] = extras[key] if key in extras else blocks[last + suffix].clone()

    out = {"positional_embedding": _require(classic_sd, "text_model.embeddings.position_embedding.weight", what)}
    if spec.with_projection:
        out["text_projection"] = _require(classic_sd, PROJECTION_KEY, what).t().contiguous()
    elif "text_projection.weight" in extras and "text_projection" not in extras:
        out["text_projection.weight"] = extras["text_projection.weight"]
    else:
        out["text_projection"] = extras.get("text_projection")
        if out["text_projection"] is None:
            out["text_projection"] = torch.eye(hidden, **like)
    out["logit_scale"] = extras.get("logit_scale")
    if out["logit_scale"] is None:
        out["logit_scale"] = torch.tensor(math.log(100.0), **like)
    out.update(blocks)
    out["token_embedding.weight"] = token
    out["ln_final.weight"] = _require(classic_sd, "text_model.final_layer_norm.weight", what)
    out["ln_final.bias"] = _require(classic_sd, "text_model.final_layer_norm.bias", what)
    return out
