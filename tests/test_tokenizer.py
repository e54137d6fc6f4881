"""Tests for library/text/tokenizer.py: offline CLIP tokenizer ids, padding rules, cache and Diffusers folders."""

import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from library.text import tokenizer as tk
from library.errors import UserError
from library.models.families import SD1, SD2, SDXL

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_eos():
    return tk.build_clip_tokenizer(pad_with_zero=False)


@pytest.fixture(scope="module")
def tok_zero():
    return tk.build_clip_tokenizer(pad_with_zero=True)


@pytest.fixture(scope="module")
def reference():
    """open_clip's copy of CLIP's reference SimpleTokenizer, loaded from its file (skips open_clip's model code)."""
    origin = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_openclip_tokenizer", os.path.join(origin, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def padded(tokenizer, text, max_length=77):
    return tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids


def test_cat_ids_padded_with_eos_for_sd1(tok_eos):
    ids = padded(tok_eos, "a photo of a cat")
    assert ids == CAT_IDS + [49407] * 70


def test_cat_ids_padded_with_zero_for_sd2(tok_zero):
    ids = padded(tok_zero, "a photo of a cat")
    assert ids == CAT_IDS + [0] * 70


def test_special_tokens_and_sizes(tok_eos, tok_zero):
    for t, pad_id in ((tok_eos, 49407), (tok_zero, 0)):
        assert len(t) == 49408
        assert (t.bos_token, t.bos_token_id) == ("<|startoftext|>", 49406)
        assert (t.eos_token, t.eos_token_id) == ("<|endoftext|>", 49407)
        assert t.unk_token_id == 49407
        assert t.pad_token_id == pad_id
        assert t.model_max_length == 77
    assert tok_zero.pad_token == "!"
    assert tok_eos.convert_tokens_to_ids(["!", "a</w>", "cat</w>", "photo</w>"]) == [0, 320, 2368, 1125]


def test_vocab_layout_follows_simple_tokenizer():
    vocab, merges = tk.clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 49152 - 256 - 2
    by_id = {i: t for t, i in vocab.items()}
    assert [by_id[i] for i in (0, 93, 255, 256, 511)] == ["!", "~", "Ń", "!</w>", "Ń</w>"]
    # Merged tokens follow the base tokens in merge order.
    assert by_id[512] == "".join(merges[0]) and by_id[49405] == "".join(merges[-1])
    assert merges[0] == ("i", "n")


def test_return_tensors_shape(tok_eos):
    out = tok_eos(["a photo of a cat", "x"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert tuple(out.input_ids.shape) == (2, 77)
    assert out.input_ids[1, :3].tolist() == [49406, 343, 49407]


REFERENCE_TEXTS = [
    "a photo of a cat",
    "A PHOTO of A Cat!!!",
    "hello, world... what's up? I'll go; they'd've",
    "1girl, 2boys, 12345 3.14159 $100 50%",
    "café naïve résumé Ångström",
    "日本語のテキスト 東京",
    "emoji 😀🎉 test",
    "tabs\tand\nnewlines   spaces  ",
    "(masterpiece:1.2), [bad], {a|b}, <lora:x:1>",
    "under_score snake_case CamelCase",
    "Ελληνικά кириллица עברית العربية",
    "ß ẞ İstanbul e\u0301",
    "IT'S it's It'S",
    # ftfy fixes that sd-scripts' tokenizer applied:
    "don’t “quoted” ‘single’",
    "ＬＯＵＤ　ＮＯＩＳＥＳ，１girl、ｶﾀｶﾅ",
    "ﬂuﬃeﬆ Ǆ ĳ",
    "rock &amp; roll &lt;3 &quot;hi&quot; it&#39;s",
    "x" * 300,
]


@pytest.mark.parametrize("text", REFERENCE_TEXTS)
def test_ids_match_reference_simple_tokenizer(tok_eos, reference, text):
    expected = [49406] + reference.encode(reference.clean_fn(text)) + [49407]
    if len(expected) > 77:
        expected = expected[:76] + [49407]
    assert tok_eos(text, truncation=True, max_length=77).input_ids == expected


def test_truncation_keeps_eos_last(tok_zero, reference):
    text = " ".join(f"word{i} Mixed, Case" for i in range(60))
    content = reference.encode(reference.clean_fn(text))
    assert len(content) > 200
    ids = padded(tok_zero, text)
    assert len(ids) == 77
    assert ids == [49406] + content[:75] + [49407]
    long_ids = padded(tok_zero, text, max_length=227)
    assert long_ids == [49406] + content[:225] + [49407]


def test_added_tokens_get_new_ids(tok_eos):
    t = tk.build_clip_tokenizer(pad_with_zero=False)  # fresh: the fixture must stay unmodified
    assert t.add_tokens(["sksdog", "sksdog1"]) == 2
    assert t.convert_tokens_to_ids(["sksdog", "sksdog1"]) == [49408, 49409]
    assert len(t) == 49410
    assert t("a sksdog sksdog1 cat").input_ids == [49406, 320, 49408, 49409, 2368, 49407]
    assert len(tok_eos) == 49408


def test_cache_dir_written_then_loaded(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tk.load_tokenizers(SD1, tokenizer_cache_dir=str(cache))
    folder = cache / "openai_clip-vit-large-patch14"
    assert folder.is_dir()
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(os.listdir(folder))
    assert os.listdir(cache) == ["openai_clip-vit-large-patch14"]  # no temp folder left behind
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408

    def no_build(pad_with_zero):
        raise AssertionError("tokenizer rebuilt although it is cached")

    monkeypatch.setattr(tk, "build_clip_tokenizer", no_build)
    second = tk.load_tokenizers(SD1, tokenizer_cache_dir=str(cache))
    texts = REFERENCE_TEXTS + ["a photo of a cat"]
    for text in texts:
        assert padded(second[0], text) == padded(first[0], text)
    assert second[0].pad_token_id == 49407 and len(second[0]) == 49408


def test_sdxl_cache_two_tokenizers_with_their_pads(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # A cache prepared elsewhere: the bigG folder was saved with EOS padding; the spec forces 0 anyway.
    tk.build_clip_tokenizer(pad_with_zero=False).save_pretrained(cache / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")
    te1, te2 = tk.load_tokenizers(SDXL, tokenizer_cache_dir=str(cache))
    assert sorted(os.listdir(cache)) == ["laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", "openai_clip-vit-large-patch14"]
    assert padded(te1, "a photo of a cat") == CAT_IDS + [49407] * 70
    assert padded(te2, "a photo of a cat") == CAT_IDS + [0] * 70
    assert (te1.pad_token_id, te2.pad_token_id) == (49407, 0)


def test_sd2_uses_sd_scripts_folder_name_and_zero_pad(tmp_path):
    (te,) = tk.load_tokenizers(SD2, tokenizer_cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == ["stabilityai_stable-diffusion-2"]
    assert te.pad_token_id == 0 and padded(te, "a photo of a cat")[7:] == [0] * 70


def test_no_cache_dir_builds(tmp_path):
    te1, te2 = tk.load_tokenizers(SDXL, pretrained_path=str(tmp_path / "model.safetensors"))
    assert (te1.pad_token_id, te2.pad_token_id) == (49407, 0)


def write_legacy_tokenizer_folder(folder, pad_token):
    """A tokenizer folder as Diffusers repos ship it: vocab.json + merges.txt + tokenizer_config.json."""
    os.makedirs(folder)
    tk._write_legacy_vocab_files(str(folder))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_diffusers_folder_is_preferred(tmp_path, monkeypatch):
    model = tmp_path / "model"
    write_legacy_tokenizer_folder(model / "tokenizer", pad_token="!")  # wrong pad for TE1: forced to EOS
    t2 = tk.build_clip_tokenizer(pad_with_zero=False)
    t2.add_tokens(["sksdog"])
    t2.save_pretrained(model / "tokenizer_2")  # transformers 5 layout, EOS pad: forced to 0
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(tk, "build_clip_tokenizer", lambda pad_with_zero: pytest.fail("built instead of loaded"))
    te1, te2 = tk.load_tokenizers(SDXL, pretrained_path=str(model), tokenizer_cache_dir=str(cache))
    assert os.listdir(cache) == []
    assert padded(te1, "a photo of a cat") == CAT_IDS + [49407] * 70
    assert padded(te2, "a photo of a cat") == CAT_IDS + [0] * 70
    assert len(te1) == 49408 and len(te2) == 49409
    assert te2("a sksdog").input_ids == [49406, 320, 49408, 49407]
    # The CLIP cleaning is applied to loaded tokenizers too.
    assert te1("don’t").input_ids == te1("don't").input_ids


def test_diffusers_folder_without_tokenizer_falls_back(tmp_path):
    (tmp_path / "unet").mkdir()
    (te,) = tk.load_tokenizers(SD2, pretrained_path=str(tmp_path))
    assert te.pad_token_id == 0 and padded(te, "a photo of a cat")[:7] == CAT_IDS


def test_broken_cache_folder_raises_user_error(tmp_path):
    folder = tmp_path / "openai_clip-vit-large-patch14"
    folder.mkdir()
    (folder / "vocab.json").write_text("{broken", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(UserError, match="openai_clip-vit-large-patch14"):
        tk.load_tokenizers(SD1, tokenizer_cache_dir=str(tmp_path))


def test_empty_diffusers_tokenizer_folder_raises_user_error(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(UserError, match=r"tokenizer.*not a CLIP tokenizer|cannot load the tokenizer folder") as info:
        tk.load_tokenizers(SD1, pretrained_path=str(tmp_path))
    assert str(tmp_path / "tokenizer") in str(info.value)


def test_vocab_built_without_importing_torch_or_open_clip():
    code = (
        "import sys; from library.text.tokenizer import clip_vocab_and_merges; v, m = clip_vocab_and_merges(); "
        "print(len(v), 'open_clip' in sys.modules, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["49408", "False", "False", "False"]
