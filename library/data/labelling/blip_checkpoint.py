"""sd-scripts' BLIP caption checkpoint (`model_large_caption.pth`) as a transformers BLIP model.

sd-scripts ran Salesforce's own BLIP code on `{"model": state_dict}` checkpoints; that code no longer
runs on current transformers (spec §12). The same weights fit `BlipForConditionalGeneration` after
renaming the vision keys as transformers' BLIP conversion does (`visual_encoder.blocks.N.attn.qkv`
→ `vision_model.encoder.layers.N.self_attn.qkv`, ...); the text decoder's keys are the same.

The architecture is read from the tensor shapes (widths, depths, patch and image size; heads are
width / 64, true of BLIP's ViT-B/L and BERT-base), so base and large checkpoints both load. The
tokenizer is `bert-base-uncased` plus the `[DEC]` and `[ENC]` tokens, as in BLIP; it is read from
the local Hugging Face cache (sd-scripts fetched it there too), never downloaded. The file is read
with `torch.load(weights_only=True)`: a pickle holding code is refused.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

TOKENIZER_ID = "bert-base-uncased"
HEAD_WIDTH = 64
# Buffers and tied weights the checkpoint may lack; transformers fills them.
_MAY_BE_MISSING = re.compile(r"(position_ids|cls\.predictions\.decoder\.(weight|bias))$")

_VISION_RENAMES = [  # applied in order to keys under visual_encoder.
    (r"^visual_encoder\.", "vision_model.encoder."),
    (r"\.blocks\.", ".layers."),
    (r"\.attn\.proj\.", ".self_attn.projection."),
    (r"\.attn\.", ".self_attn."),
    (r"\.norm1\.", ".layer_norm1."),
    (r"\.norm2\.", ".layer_norm2."),
    (r"^vision_model\.encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^vision_model\.encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^vision_model\.encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
]


def rename_key(key: str) -> str:
    if not key.startswith("visual_encoder."):
        return key
    for pattern, replacement in _VISION_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def read_checkpoint(path: str) -> dict:
    """The renamed state dict of a BLIP `.pth` (`{"model": state_dict}` or a bare state dict)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the pickle, RuntimeError/EOFError for damage
        raise UserError(f"--caption_weights {path}: cannot read it as a weights-only checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use a transformers "
                        "BLIP folder instead") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or "visual_encoder.pos_embed" not in state:
        raise UserError(f"--caption_weights {path}: not a BLIP caption checkpoint (no visual_encoder.pos_embed)")
    return {rename_key(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _count(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state) if m})


def config_from_state(state: dict, tokenizer):
    """A BlipConfig with the checkpoint's shapes and the tokenizer's special ids."""
    from transformers import BlipConfig

    pos = state["vision_model.embeddings.position_embedding"]
    width, positions = pos.shape[-1], pos.shape[1]
    patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((positions - 1) ** 0.5)
    words = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    text_layer = "text_decoder.bert.encoder.layer."
    vision = dict(hidden_size=width, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_count(state, "vision_model.encoder.layers."),
                  num_attention_heads=max(1, width // HEAD_WIDTH), image_size=grid * patch, patch_size=patch,
                  layer_norm_eps=1e-6)  # BLIP's ViT uses 1e-6 (transformers' default is 1e-5)
    text = dict(vocab_size=words.shape[0], hidden_size=words.shape[1],
                intermediate_size=state[text_layer + "0.intermediate.dense.weight"].shape[0],
                num_hidden_layers=_count(state, text_layer),
                num_attention_heads=max(1, words.shape[1] // HEAD_WIDTH),
                max_position_embeddings=state["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0],
                encoder_hidden_size=state[text_layer + "0.crossattention.self.key.weight"].shape[1],
                bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return BlipConfig(vision_config=vision, text_config=text)


def blip_tokenizer(source: str = TOKENIZER_ID):
    """BLIP's tokenizer: BERT's WordPiece plus `[DEC]` (bos) and `[ENC]`, from a folder or the local cache."""
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"the BLIP tokenizer ({source}) is not in the local Hugging Face cache: download it with "
                        f"`hf download {source} vocab.txt tokenizer.json tokenizer_config.json config.json` "
                        "(nothing is downloaded at run time), or pass a transformers BLIP folder as --caption_weights") \
            from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_blip_checkpoint(path: str):
    """(BlipForConditionalGeneration, BlipProcessor) from an sd-scripts BLIP checkpoint."""
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    state = read_checkpoint(path)
    tokenizer = blip_tokenizer()
    config = config_from_state(state, tokenizer)
    if len(tokenizer) != config.text_config.vocab_size:
        raise UserError(f"--caption_weights {path}: its vocabulary has {config.text_config.vocab_size} entries, the "
                        f"tokenizer {TOKENIZER_ID} + [DEC] [ENC] has {len(tokenizer)}; they do not belong together")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init, only slower
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = BlipForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _MAY_BE_MISSING.search(k)]
    if missing:
        raise UserError(f"--caption_weights {path}: {len(missing)} weights missing (e.g. {missing[0]}); "
                        "not a BLIP caption checkpoint")
    if unexpected:
        logger.warning(f"{os.path.basename(path)}: {len(unexpected)} entries not used (e.g. {unexpected[0]})")
    model.tie_weights()
    size = config.vision_config.image_size
    # BLIP's caption transform: bicubic to size×size, [0, 1], CLIP mean/std: BlipImageProcessor's defaults.
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    return model.eval(), processor
