"""finetune/make_captions.py (BLIP) and finetune/make_captions_by_git.py (GIT) on tiny random models.

The models and their WordPiece tokenizers are built here with transformers from a small vocabulary,
saved as model folders, and the captions the tools write are compared with what the same
transformers model generates when called directly. sd-scripts' BLIP `.pth` layout is produced from
the transformers weights with the original BLIP key names, and must caption exactly as the folder.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "red", "green", "blue", "cat", "dog",
         "the", "on", "with", "sofa", "sitting", "small", "sky", "grass", "and", "two", "in", "field"]
COLOURS = {"red": (220, 20, 30), "green": (20, 200, 40), "blue": (30, 40, 210)}


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BLIP = load_script("finetune/make_captions.py")
GIT = load_script("finetune/make_captions_by_git.py")


def bert_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True)


def blip_tokenizer():
    tokenizer = bert_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A transformers BLIP folder; heads of width 64 like BLIP's ViT and BERT (the .pth loader relies on it)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer()
    config = BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=16, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, encoder_hidden_size=64, max_position_embeddings=40,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("blip") / "blip-tiny"
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer) \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = bert_tokenizer()
    config = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=16),
                       vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=64,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=0)
    torch.manual_seed(1)
    model = GitForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("git") / "git-tiny"
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        noise = rng.integers(-20, 20, (40, 48, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def read(folder, name, ext=".caption"):
    return (folder / f"{name}{ext}").read_text(encoding="utf-8")


def reference_blip(folder, images, names, **kwargs):
    """Captions from transformers' BLIP called directly, one batch of all images."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    pictures = [Image.open(images / f"{n}.png").convert("RGB") for n in names]
    inputs = processor(images=pictures, text=["a picture of"] * len(names), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], **kwargs)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    assert all(t.startswith("a picture of") for t in texts)
    return [t[len("a picture of"):].strip() + "\n" for t in texts]


def test_blip_beam_search_matches_transformers(blip_dir, images):
    assert BLIP.main([str(images), "--caption_weights", str(blip_dir), "--beam_search", "--num_beams", "3",
                      "--max_length", "12", "--min_length", "8", "--batch_size", "2"]) == 0
    names = sorted(COLOURS)
    expected = reference_blip(blip_dir, images, names, num_beams=3, max_length=12, min_length=8, do_sample=False,
                              repetition_penalty=1.0)
    assert [read(images, n) for n in names] == expected
    # max_length counts the 4 prompt tokens ([DEC] a picture of), as in sd-scripts
    assert all(1 <= len(text.split()) <= 8 for text in expected)


def test_blip_sampling_is_seeded(blip_dir, images, tmp_path):
    flags = [str(images), "--caption_weights", str(blip_dir), "--max_length", "14", "--batch_size", "3"]
    assert BLIP.main(flags) == 0
    first = {n: read(images, n) for n in COLOURS}
    assert BLIP.main(flags + ["--max_data_loader_n_workers", "2"]) == 0
    assert {n: read(images, n) for n in COLOURS} == first
    names = sorted(COLOURS)
    torch.manual_seed(42)
    expected = reference_blip(blip_dir, images, names, do_sample=True, top_p=0.9, top_k=50, max_length=14,
                              min_length=5, repetition_penalty=1.1)
    assert [first[n] for n in names] == expected
    assert BLIP.main(flags + ["--seed", "7", "--caption_extention", ".blip"]) == 0
    assert [read(images, n, ".blip") for n in names] != expected


def original_blip_state(folder):
    """The tiny model's weights under sd-scripts' (Salesforce BLIP's) key names: the spec's key map, reversed."""
    from safetensors.torch import load_file

    renames = [("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
               ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
               ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
               ("vision_model.post_layernorm.", "visual_encoder.norm."),
               ("vision_model.encoder.layers.", "visual_encoder.blocks."),
               (".self_attn.projection.", ".attn.proj."), (".self_attn.qkv.", ".attn.qkv."),
               (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2.")]
    state = {}
    for key, value in load_file(os.path.join(folder, "model.safetensors")).items():
        for new, old in renames:
            key = key.replace(new, old)
        state[key] = value
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    assert any(k.startswith("visual_encoder.blocks.1.attn.proj.") for k in state)
    return state


def fake_hf_cache(root, repo_id, files_from):
    """The Hugging Face cache layout (models--owner--name/snapshots/<rev>, refs/main) holding `files_from`'s files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_sd_scripts_blip_checkpoint_from_its_default_url_captions_like_the_folder(blip_dir, images, tmp_path):
    """sd-scripts' command line (no --caption_weights): the .pth where sd-scripts cached it, bert-base-uncased
    from the Hugging Face cache; nothing downloaded."""
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"model": original_blip_state(blip_dir)}, torch_home / "hub" / "checkpoints" / "model_large_caption.pth")
    tokenizer_dir = tmp_path / "bert"
    bert_tokenizer().save_pretrained(tokenizer_dir)
    fake_hf_cache(tmp_path / "hf", "bert-base-uncased", tokenizer_dir)
    env = dict(os.environ, TORCH_HOME=str(torch_home), HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "finetune/make_captions.py", str(images), "--beam_search", "--num_beams", "2",
                        "--max_length", "10", "--debug"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    from_pth = [read(images, n) for n in sorted(COLOURS)]
    assert BLIP.main([str(images), "--caption_weights", str(blip_dir), "--beam_search", "--num_beams", "2",
                      "--max_length", "10"]) == 0
    assert [read(images, n) for n in sorted(COLOURS)] == from_pth
    assert "sd-scripts checkpoint, converted" in r.stderr

def test_bad_blip_inputs_are_one_line(blip_dir, images, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # as TORCH_HOME would
    with pytest.raises(UserError) as caught:
        BLIP.main([str(images)])  # sd-scripts' default: the URL, which was never downloaded here
    assert str(caught.value) == (
        "--caption_weights https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_caption"
        f".pth is not on this machine (looked for {tmp_path}/hub/checkpoints/model_large_caption.pth); download it "
        "with `hf download Salesforce/blip-image-captioning-large --local-dir models/blip-image-captioning-large` and "
        "pass --caption_weights models/blip-image-captioning-large (nothing is downloaded at run time), or download "
        f"that file to {tmp_path}/hub/checkpoints/model_large_caption.pth")
    with pytest.raises(UserError, match="--caption_weights .*nowhere: no such folder; download it with `hf download "
                                        "Salesforce/blip-image-captioning-large"):
        BLIP.main([str(images), "--caption_weights", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="--caption_weights nobody/no-such-blip is not in the local Hugging Face cache"):
        BLIP.main([str(images), "--caption_weights", "nobody/no-such-blip"])
    with pytest.raises(UserError, match="--min_length 9 is more than --max_length 8"):
        BLIP.main([str(images), "--caption_weights", str(blip_dir), "--min_length", "9", "--max_length", "8"])
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"visual_encoder.pos_embed": torch.zeros(1)}, "args": argparse_namespace()}, evil)
    with pytest.raises(UserError, match="cannot read it as a weights-only checkpoint"):
        BLIP.main([str(images), "--caption_weights", str(evil)])
    assert not list(images.glob("*.caption"))


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1)


def test_git_matches_transformers_and_skips_corrupt_images(git_dir, images):
    from transformers import AutoModelForCausalLM, AutoProcessor

    (images / "sub").mkdir()
    Image.new("RGB", (50, 30), (200, 200, 0)).save(images / "sub" / "yellow.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert GIT.main([str(images), "--model_id", str(git_dir), "--max_length", "9", "--batch_size", "2",
                     "--recursive", "--max_data_loader_n_workers", "1"]) == 1
    model = AutoModelForCausalLM.from_pretrained(git_dir).eval()
    processor = AutoProcessor.from_pretrained(git_dir)
    paths = [images / f"{n}.png" for n in sorted(COLOURS)] + [images / "sub" / "yellow.jpg"]
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, max_length=9)
    expected = [t.strip() + "\n" for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert [p.with_suffix(".caption").read_text(encoding="utf-8") for p in paths] == expected
    assert not (images / "broken.caption").exists()


def test_git_remove_words():
    from library.data.labelling.captioners import remove_text_reading

    assert remove_text_reading('a sign with the words "open late" on the door') == "a sign"
    assert remove_text_reading("a man holding a board that says hello on it") == "a man holding a board"
    assert remove_text_reading("a red shirt with the number 23 on it") == "a red shirt"
    assert remove_text_reading("a book and the name tolkien in gold letters") == "a book letters"
    assert remove_text_reading("a dog on a sofa") == "a dog on a sofa"


def test_git_missing_model_is_one_line(images, tmp_path):
    with pytest.raises(UserError) as caught:
        GIT.main([str(images), "--model_id", "nobody/no-such-git"])
    assert str(caught.value) == (
        "--model_id nobody/no-such-git is not in the local Hugging Face cache; download it with `hf download "
        "nobody/no-such-git --local-dir models/no-such-git` and pass --model_id models/no-such-git (nothing is "
        "downloaded at run time)")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match=r"--model_id .*half is not a complete model folder \("):
        GIT.main([str(images), "--model_id", str(tmp_path / "half")])
