"""tools/merge_models.py (weighted sum, missing keys, integer buffers, --unet_only) and
tools/resize_images_to_resolution.py (area targets, aspect kept, crop to a multiple, associated files)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.models import safetensors_io
from lora_tool_helpers import run_tool
from tools import merge_models, resize_images_to_resolution


def test_merge_models_is_the_weighted_sum_with_missing_keys_from_the_first(tiny_checkpoint, tmp_path):
    a_path, b_full = tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1)
    a, b = safetensors_io.load_tensors(a_path), safetensors_io.load_tensors(b_full)
    missing = "model.diffusion_model.out.2.weight"
    b_path = str(tmp_path / "b.safetensors")
    safetensors_io.save_tensors({k: v for k, v in b.items() if k != missing}, b_path)
    out = tmp_path / "sum"
    assert run_tool(merge_models.main, "--models", a_path, b_path, "--ratios", 0.3, 0.7, "--output", out,
                    "--saving_precision", "fp16") == 0
    merged = safetensors_io.load_tensors(str(out) + ".safetensors")  # the extension is added
    assert list(merged) == list(a)
    for key, value in a.items():
        if not value.is_floating_point():
            assert torch.equal(merged[key], value)  # position ids are copied, not averaged
        elif key == missing:
            assert torch.equal(merged[key], value.half())  # 0.3·A + 0.7·A
        else:
            assert torch.equal(merged[key], (value * 0.3 + b[key] * 0.7).half()), key
    assert any(not v.is_floating_point() for v in a.values())

    unet_only = tmp_path / "unet.safetensors"
    assert run_tool(merge_models.main, "--models", a_path, b_full, "--output", unet_only, "--unet_only") == 0
    merged = safetensors_io.load_tensors(str(unet_only))
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(merged[te], a[te])
    assert torch.equal(merged[unet], a[unet] * 0.5 + b[unet] * 0.5)


def test_merge_models_refuses_bad_input_in_one_line(tiny_checkpoint, tmp_path, capsys):
    a = tiny_checkpoint("sd1")
    out = tmp_path / "m.safetensors"
    for argv, words in (((a, tmp_path / "missing.safetensors"), "no such file"), ((a, tiny_checkpoint("sd2")), "shape")):
        assert run_tool(merge_models.main, "--models", *argv, "--output", out) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not out.exists()


def _photo(path, size):
    import skimage.data

    Image.fromarray(skimage.data.astronaut()).resize(size).save(path)


def test_resize_images_keep_the_aspect_ratio_within_each_area(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _photo(src / "tall.png", (600, 1000))
    _photo(src / "WIDE.JPG", (1000, 600))
    _photo(src / "small.png", (200, 100))
    (src / "tall.txt").write_text("a caption", encoding="utf-8")
    (src / "notes.md").write_text("kept", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # relative folders, as people type them
    assert run_tool(resize_images_to_resolution.main, "src", "dst", "--max_resolution", "512x512,256x256",
                    "--divisible_by", 8, "--save_as_png", "--copy_associated_files") == 0
    files = sorted(os.listdir(dst))
    assert files == ["WIDE+256x256.png", "WIDE+512x512.png", "notes.md", "small+256x256.png", "small+512x512.png",
                     "tall+256x256.png", "tall+256x256.txt", "tall+512x512.png", "tall+512x512.txt", "tall.txt"]
    for name, (w, h), area in (("tall", (600, 1000), 512 * 512), ("WIDE", (1000, 600), 256 * 256)):
        scale = (area / (w * h)) ** 0.5
        want = (int(w * scale) // 8 * 8, int(h * scale) // 8 * 8)
        label = "512x512" if area == 512 * 512 else "256x256"
        out = Image.open(dst / f"{name}+{label}.png")
        assert out.size == want
        # the picture itself, not a strip: close to the original scaled by PIL
        ref = Image.open(src / (f"{name}.png" if name == "tall" else f"{name}.JPG")).convert("RGB")
        ref = np.asarray(ref.resize((int(w * scale), int(h * scale)), Image.Resampling.BOX), dtype=np.float32)
        left, top = (ref.shape[1] - want[0]) // 2, (ref.shape[0] - want[1]) // 2
        ref = ref[top:top + want[1], left:left + want[0]]
        assert np.abs(np.asarray(out, dtype=np.float32) - ref).mean() < 2
    assert Image.open(dst / "small+512x512.png").size == (200, 96)  # under the area: only the crop to /8
    assert (dst / "tall+512x512.txt").read_text(encoding="utf-8") == "a caption"


def test_resize_images_refuse_bad_resolutions(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert run_tool(resize_images_to_resolution.main, tmp_path / "src", tmp_path / "dst",
                    "--max_resolution", "512,256x256") == 2
    assert "512" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("interpolation", ["lanczos4", "nearest"])
def test_resize_images_interpolation_choices_are_used(tmp_path, interpolation):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _photo(src / "a.png", (300, 300))
    assert run_tool(resize_images_to_resolution.main, src, dst, "--max_resolution", "100x100", "--interpolation",
                    interpolation) == 0
    filters = {"lanczos4": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
    ref = Image.open(src / "a.png").convert("RGB").resize((100, 100), filters[interpolation])
    ref.save(tmp_path / "ref.jpg", quality=100)
    got = np.asarray(Image.open(dst / "a+100x100.jpg"), dtype=np.float32)
    assert np.abs(got - np.asarray(Image.open(tmp_path / "ref.jpg"), dtype=np.float32)).max() < 1
