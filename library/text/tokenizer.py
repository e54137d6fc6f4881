"""Offline CLIP tokenizers for every text encoder of a model family.

No model hub is used. A tokenizer comes, in this order, from the Diffusers folder being trained
(`tokenizer/`, `tokenizer_2/`), from `--tokenizer_cache_dir` (same folder names as sd-scripts, so a
cache prepared by sd-scripts works here and the other way round), or is rebuilt from the BPE file
that `open_clip` ships, exactly as CLIP's reference `SimpleTokenizer` derives its vocabulary. The
result is always a regular transformers `CLIPTokenizer` with the family's padding rule applied
(see the spec, text-encoding §1) and CLIP's text cleaning (lower case, whitespace, the common ftfy
fixes that sd-scripts' tokenizer applied).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
import unicodedata

from library.errors import UserError

MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
ZERO_PAD_TOKEN = "!"  # id 0: the first byte-level base token
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
_NUM_MERGES = 49152 - 256 - 2

# Cache folder per text-encoder role: `<hub id with / replaced by _>`, as sd-scripts names them.
CACHE_FOLDER_BY_ROLE = {
    "clip_l": "openai_clip-vit-large-patch14",
    "openclip_h": "stabilityai_stable-diffusion-2",
    "openclip_g": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
}


# ---------------------------------------------------------------------------------------------
# Vocabulary derived from open_clip's BPE file


def _bpe_file_path() -> str:
    # find_spec locates the package without executing its __init__ (which imports torch and timm).
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, _BPE_FILE)
        if os.path.isfile(path):
            return path
    raise UserError(
        f"cannot build the CLIP tokenizer offline: {_BPE_FILE} not found (is open_clip_torch installed?); "
        "install open_clip_torch or pass --tokenizer_cache_dir with saved tokenizers"
    )


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in CLIP's order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_order = list(printable)
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_order.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary (token → id, 49408 entries) and BPE merges in rank order. Treat as read-only."""
    path = _bpe_file_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise UserError(
            f"{path} is not CLIP's BPE file (expected {_NUM_MERGES} merge lines); reinstall open_clip_torch"
        )
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


# ---------------------------------------------------------------------------------------------
# Text cleaning

# ftfy's Latin ligature / digraph table (ftfy.fix_latin_ligatures).
_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}
# Entities other than &amp; come first so that "&amp;lt;" is unescaped once, like html.unescape.
_HTML_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#39;", "'"), ("&apos;", "'"),
                  ("&nbsp;", "\u00a0"), ("&amp;", "&"))


def _width_map() -> dict[str, str]:
    """ftfy.fix_character_width: half/full-width forms → normal width, ideographic space → space."""
    mapping = {"\u3000": " "}
    for code in range(0xFF01, 0xFFF0):
        char = chr(code)
        normal = unicodedata.normalize("NFKC", char)
        if normal != char:
            mapping[char] = normal
    return mapping


def clip_normalizer():
    """The `tokenizers` normalizer used by every tokenizer this module returns.

    transformers' CLIPTokenizer only does NFC, whitespace collapsing and lower-casing. sd-scripts ran
    the slow tokenizer, which first applied ftfy.fix_text (as CLIP's reference does); the ftfy fixes
    that change real captions (curly quotes, full-width characters as typed with Japanese input
    methods, ligatures, HTML entities) are reproduced here with serialisable replace rules.
    Not reproduced: mojibake repair, and ftfy's exception of keeping entities when the text holds a
    literal "<".
    """
    from tokenizers import Regex, normalizers

    steps = [normalizers.Replace(entity, text) for entity, text in _HTML_ENTITIES]
    steps.append(normalizers.NFC())
    steps.append(normalizers.Replace(Regex("[\u02bc\u2018-\u201b]"), "'"))
    steps.append(normalizers.Replace(Regex("[\u201c-\u201f]"), '"'))
    steps += [normalizers.Replace(src, dst) for src, dst in (_width_map() | _LIGATURES).items()]
    steps.append(normalizers.Replace(Regex(r"\s+"), " "))
    steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


# ---------------------------------------------------------------------------------------------
# Building, checking, loading


def _apply_family_rules(tokenizer, pad_with_zero: bool, source: str):
    """Force what the spec fixes regardless of source: padding, length 77, CLIP cleaning."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (BOS_TOKEN, EOS_TOKEN, ZERO_PAD_TOKEN)}
    expected = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, ZERO_PAD_TOKEN: 0}
    if tokenizer.vocab_size != VOCAB_SIZE or ids != expected:
        raise UserError(
            f"tokenizer folder {source} is not a CLIP tokenizer (vocabulary size {tokenizer.vocab_size}, special ids "
            f"{ids}; expected {VOCAB_SIZE} and {expected}); delete or fix it"
        )
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.unk_token = EOS_TOKEN
    tokenizer.pad_token = ZERO_PAD_TOKEN if pad_with_zero else EOS_TOKEN
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.backend_tokenizer.normalizer = clip_normalizer()
    return tokenizer


def build_clip_tokenizer(pad_with_zero: bool):
    """A CLIPTokenizer built offline from open_clip's BPE file; pads with "!" (id 0) or with EOS."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=ZERO_PAD_TOKEN if pad_with_zero else EOS_TOKEN,
        model_max_length=MAX_LENGTH,
    )
    return _apply_family_rules(tokenizer, pad_with_zero, "<built from open_clip BPE>")


def _load_folder(folder: str, pad_with_zero: bool):
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds (ValueError, OSError, JSON errors) for bad folders
        raise UserError(
            f"cannot load the tokenizer folder {folder}: {e.__class__.__name__}: {' '.join(str(e).split())}; "
            "delete or fix it"
        ) from e
    return _apply_family_rules(tokenizer, pad_with_zero, folder)


def _write_legacy_vocab_files(folder: str) -> None:
    # transformers 5 saves only tokenizer.json; vocab.json/merges.txt let older transformers (sd-scripts) read it too.
    vocab, merges = clip_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def save_tokenizer(tokenizer, folder: str) -> None:
    """save_pretrained plus vocab.json/merges.txt, so both transformers 4.x and 5.x read the folder."""
    tokenizer.save_pretrained(folder)
    _write_legacy_vocab_files(folder)


def _save_to_cache(tokenizer, cache_dir: str, folder: str) -> None:
    """Save atomically: a half-written folder would be taken for a cached tokenizer next time."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=cache_dir)
    except OSError as e:
        raise UserError(f"cannot write to --tokenizer_cache_dir {cache_dir}: {e}") from e
    try:
        save_tokenizer(tokenizer, tmp)
        os.rename(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(folder):  # otherwise another process saved it first, which is fine
            raise UserError(f"cannot save the tokenizer to {folder}: {e}") from e


def _diffusers_tokenizer_folder(pretrained_path: str | None, spec) -> str | None:
    if not pretrained_path or not os.path.isdir(pretrained_path):
        return None
    # text_encoder → tokenizer, text_encoder_2 → tokenizer_2
    subfolder = spec.diffusers_subfolder.replace("text_encoder", "tokenizer")
    folder = os.path.join(pretrained_path, subfolder)
    return folder if os.path.isdir(folder) else None


def load_tokenizer(spec, pretrained_path: str | None = None, tokenizer_cache_dir: str | None = None):
    """The tokenizer of one text encoder (a `TextEncoderSpec`): Diffusers folder, else cache, else built."""
    folder = _diffusers_tokenizer_folder(pretrained_path, spec)
    if folder is not None:
        return _load_folder(folder, spec.pad_with_zero)
    if not tokenizer_cache_dir:
        return build_clip_tokenizer(spec.pad_with_zero)
    cached = os.path.join(tokenizer_cache_dir, CACHE_FOLDER_BY_ROLE[spec.role])
    if os.path.isdir(cached):
        return _load_folder(cached, spec.pad_with_zero)
    tokenizer = build_clip_tokenizer(spec.pad_with_zero)
    _save_to_cache(tokenizer, tokenizer_cache_dir, cached)
    return tokenizer


def load_tokenizers(family, pretrained_path: str | None = None, tokenizer_cache_dir: str | None = None) -> list:
    """One tokenizer per entry of `family.text_encoders`, in order (SDXL: CLIP-L, then bigG)."""
    return [load_tokenizer(spec, pretrained_path, tokenizer_cache_dir) for spec in family.text_encoders]
