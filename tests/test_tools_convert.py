"""The conversion tools as a user runs them: subprocesses, real files, exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

from library.models import safetensors_io
from library.models.loading import load_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_make_convert_and_back(family, tmp_path):
    src = str(tmp_path / "src.safetensors")
    r = run_tool("tools/make_random_model.py", "--family", family, "--seed", "3", src)
    assert r.returncode == 0, r.stderr
    folder = str(tmp_path / "diffusers_out")
    r = run_tool("tools/convert_diffusers20_original_sd.py", "--use_safetensors", src, folder)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    back = str(tmp_path / "back.safetensors")
    r = run_tool("tools/convert_diffusers20_original_sd.py", "--save_precision_as", "fp16",
                 "--metadata", "{'modelspec.author': 'me'}", folder, back)
    assert r.returncode == 0, r.stderr
    a, b = safetensors_io.load_tensors(src), safetensors_io.load_tensors(back)
    required = {k for k in a if not k.startswith(("betas", "alphas", "sqrt_", "log_one", "posterior_"))}
    assert required <= b.keys()
    for k in required:
        assert b[k].dtype == (torch.float16 if a[k].is_floating_point() else a[k].dtype), k
        assert torch.equal(b[k], a[k].half() if a[k].is_floating_point() else a[k]), k
    meta = json.loads(run_tool("tools/show_metadata.py", back).stdout)
    assert meta["modelspec.author"] == "me"
    expected = "stable-diffusion-v2-768-v" if family == "sd2-v" else "stable-diffusion-xl-v1-base"
    assert meta["modelspec.architecture"] == expected
    assert load_models(back).v_parameterization is (family == "sd2-v")


def test_ckpt_output_and_flags(tmp_path):
    src = str(tmp_path / "m.safetensors")
    assert run_tool("tools/make_random_model.py", "--family", "sd1", src).returncode == 0
    out = str(tmp_path / "m.ckpt")
    r = run_tool("tools/convert_diffusers20_original_sd.py", "--v1", "--epoch", "2", "--global_step", "7", src, out)
    assert r.returncode == 0, r.stderr
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 2 and saved["global_step"] == 7
    r = run_tool("tools/convert_diffusers20_original_sd.py", "--v2", src, str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "--v2 was given" in r.stderr and r.stderr.count("\n") == 1


def test_metadata_is_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    payload = f"__import__('os').system('touch {marker}')"
    r = run_tool("tools/convert_diffusers20_original_sd.py", "--metadata", payload, "in.safetensors", "out.safetensors")
    assert r.returncode == 2 and "--metadata" in r.stderr
    assert not marker.exists()


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    r = run_tool("tools/convert_diffusers20_original_sd.py", str(bad), str(tmp_path / "o.safetensors"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "broken.safetensors" in r.stderr and r.stderr.count("\n") == 1


def test_linear_projection_flag_and_reference_model(tmp_path, tiny_checkpoint):
    from library.errors import UserError
    from tools.convert_diffusers20_original_sd import main as convert

    sd1, sd2 = tiny_checkpoint("sd1"), tiny_checkpoint("sd2")
    # SD1.x projections are 1x1 convolutions: the assertion is refused, nothing written
    out = tmp_path / "o.safetensors"
    with pytest.raises(UserError, match="1x1-convolution"):
        convert(["--unet_use_linear_projection", sd1, str(out)])
    assert not out.exists()
    # a reference diffusers model's scheduler and tokenizer replace the ones built offline
    reference = tmp_path / "reference"
    convert([sd2, str(reference)])
    config = reference / "scheduler" / "scheduler_config.json"
    values = json.loads(config.read_text())
    values["steps_offset"] = 7
    config.write_text(json.dumps(values))
    folder = tmp_path / "converted"
    convert(["--unet_use_linear_projection", "--reference_model", str(reference), sd2, str(folder)])
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 7
    assert sorted(os.listdir(folder)) == sorted(os.listdir(reference))  # no staging folders left
    # only for diffusers output, and only a local folder; refused before anything loads
    with pytest.raises(UserError, match="only applies when saving a diffusers folder"):
        convert(["--reference_model", str(reference), sd2, str(out)])
    with pytest.raises(UserError, match="never downloaded"):
        convert(["--reference_model", "stabilityai/sd-2", sd2, str(tmp_path / "other")])
    assert not out.exists() and not (tmp_path / "other").exists()


def test_show_metadata_takes_the_file_positional_or_as_model(tmp_path):
    from library.models.safetensors_io import save_tensors

    path = str(tmp_path / "lora.safetensors")
    save_tensors({"w": torch.zeros(2)}, path, {"ss_network_dim": "4", "ss_tag_frequency": '{"a": {"cat": 2}}'})
    for argv in ([path], ["--model", path]):
        r = run_tool("tools/show_metadata.py", *argv)
        assert r.returncode == 0, r.stderr
        meta = json.loads(r.stdout)
        assert meta["ss_network_dim"] == "4" and meta["ss_tag_frequency"] == {"a": {"cat": 2}}
    r = run_tool("tools/show_metadata.py")
    assert r.returncode == 2 and r.stderr.startswith("error: no file given") and r.stderr.count("\n") == 1
