"""Configs in the styles people bring from sd-scripts (tests/fixtures/configs) run unchanged on the tiny
models: a kohya_ss GUI LoRA TOML, a sectioned LyCORIS TOML with resume = false, a DreamBooth TOML with
LoRA-only keys, and an SDXL training command line reused on the cache tools. Only paths are filled in."""

import json
import logging
import os
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

from library.models import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "fixtures", "configs")
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """`img/3_sks thing` with four captioned photos of several aspect ratios, and `reg/1_thing`."""
    import skimage.data

    root = tmp_path_factory.mktemp("corpus")
    folder = root / "img" / "3_sks thing"
    folder.mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        size = [(96, 96), (128, 96), (96, 128), (112, 80)][i]
        Image.fromarray(array[..., :3]).resize(size).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"sks thing, {name}", encoding="utf-8")
    reg = root / "reg" / "1_thing"
    reg.mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).resize((96, 96)).save(reg / "cup.png")
    return root


def fill(name: str, tmp_path, **paths) -> str:
    """The corpus file with its @PLACEHOLDERS@ replaced, written to tmp_path; returns its path."""
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
        text = f.read()
    for key, value in paths.items():
        text = text.replace(f"@{key.upper()}@", str(value).replace("\\", "/"))
    assert "@" not in text.replace("@ ", ""), text
    out = tmp_path / name
    out.write_text(text, encoding="utf-8")
    return str(out)


def warnings_of(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_kohya_gui_lora_toml(tiny_checkpoint, data, tmp_path, caplog, capsys):
    import train_network
    from tools import cache_latents

    out = tmp_path / "out"
    cfg = fill("kohya_gui_lora.toml", tmp_path, model=tiny_checkpoint("sd1"), data=data / "img", output=out)
    with caplog.at_level(logging.INFO):
        assert train_network.main(["--config_file", cfg]) == 0
    [line] = warnings_of(caplog, "name no option of")
    assert "2 keys" in line and "kohya_ss GUI settings: epoch (" in line and "noise_offset_type (" in line
    meta = safetensors_io.read_metadata(str(out / "last.safetensors"))
    assert meta["ss_network_dim"] == "4" and meta["ss_noise_offset"] == "0.05" and meta["ss_seed"] == "1234"
    assert meta["ss_steps"] == "2" and meta["ss_lr_scheduler"] == "cosine"
    assert "ss_network_args" not in meta  # network_args = [] is "not set"
    assert float(meta["ss_text_encoder_lr"]) == 5e-5 and float(meta["ss_unet_lr"]) == 1e-4
    # bucket_no_upscale: images within 128x128 pixels of area keep their size, floored to steps of 64
    buckets = {tuple(b["resolution"]) for b in json.loads(meta["ss_bucket_info"])["buckets"].values()}
    assert buckets == {(64, 64), (128, 64), (64, 128)}
    # the same file on the latent cache tool finds every latent the run cached to disk
    capsys.readouterr()
    cache_latents.main(["--config_file", cfg])
    assert "latents: 4 samples, 4 cached, 0 encoded" in capsys.readouterr().out


def test_lycoris_sections_with_resume_false(tiny_checkpoint, data, tmp_path, caplog):
    pytest.importorskip("lycoris", reason="lycoris-lora is an optional dependency")
    import train_network

    out = tmp_path / "out"
    dataset = fill("lycoris_dataset.toml", tmp_path, images=data / "img" / "3_sks thing")
    cfg = fill("lycoris_sections.toml", tmp_path, model=tiny_checkpoint("sd1"), output=out, dataset_config=dataset)
    with caplog.at_level(logging.WARNING):
        assert train_network.main(["--config_file", cfg, "--dataset_config", dataset]) == 0
    assert warnings_of(caplog, "name no option of") == []  # every key of this file is an option
    tensors = safetensors_io.load_tensors(str(out / "locon.safetensors"))
    conv = [k for k in tensors if k.endswith("lora_down.weight") and tensors[k].ndim == 4 and tensors[k].shape[-1] == 3]
    assert conv and all(tensors[k].shape[0] == 2 for k in conv)  # conv_dim=2 through network_args
    meta = safetensors_io.read_metadata(str(out / "locon.safetensors"))
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_training_comment"] == "locon test"
    assert meta["ss_max_token_length"] == "225" and meta["ss_clip_skip"] == "2"
    assert not os.path.exists(os.path.join(str(out), "False"))


def test_dreambooth_toml_with_lora_only_keys(tiny_checkpoint, data, tmp_path, caplog, monkeypatch):
    import train_db

    from library.errors import UserError

    monkeypatch.setattr(sys, "argv", ["train_db.py"])  # the parser's name, as when the script runs

    out = tmp_path / "out"
    cfg = fill("dreambooth_lora_keys.toml", tmp_path, model=tiny_checkpoint("sd1"), data=data / "img",
               reg=data / "reg", output=out)
    with caplog.at_level(logging.WARNING):
        assert train_db.main(["--config_file", cfg]) == 0
    [line] = warnings_of(caplog, "name no option of")
    assert line.endswith("dreambooth_lora_keys.toml: ignoring 7 keys that name no option of train_db.py, as sd-scripts "
                         "does: options of train_network.py, sdxl_train_network.py: network_module, "
                         "network_alpha, unet_lr, text_encoder_lr, scale_weight_norms, training_comment; "
                         "options of train_network.py, sdxl_train_network.py, sdxl_train_control_net_lllite.py: "
                         "network_dim; --config_strict makes this an error")
    assert os.path.isfile(out / "db.safetensors")
    with pytest.raises(UserError, match=r"7 keys name no option of train_db.py: .* \(--config_strict\)$"):
        train_db.main(["--config_file", cfg, "--config_strict"])


def test_training_command_line_reused_on_the_cache_tools(tiny_checkpoint, data, tmp_path, caplog):
    """sd-scripts' cache tools take the trainer's parser: the same command line fills both caches, and the
    training run then finds every entry (nothing encoded); the tools name what they ignore in one line."""
    import sdxl_train_network
    from tools import cache_latents, cache_text_encoder_outputs

    images = tmp_path / "img"  # a copy: the caches are written beside the images
    import shutil

    shutil.copytree(data / "img", images)
    command_file = fill("sdxl_lora_command.sh", tmp_path, model=tiny_checkpoint("sdxl"), data=images,
                        output=tmp_path / "out")
    with open(command_file, encoding="utf-8") as f:
        words = shlex.split(f.read().replace("\\\n", " "))  # line continuations, as the shell reads them
    argv = words[words.index("sdxl_train_network.py") + 1:]

    with caplog.at_level(logging.INFO):
        cache_latents.main(argv)
    ignored = [r.getMessage() for r in caplog.records if "ignoring training options" in r.getMessage()]
    assert len(ignored) == 1 and "--network_dim" in ignored[0] and "--learning_rate" in ignored[0]
    assert "--resolution" not in ignored[0] and "--flip_aug" not in ignored[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cache_text_encoder_outputs.main(argv)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert sdxl_train_network.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records]
    latent = [m for m in lines if m.startswith("latent cache:")]
    text = [m for m in lines if m.startswith("text encoder output cache:")]
    assert latent and "encoded=0" in latent[0] and "hits=0" not in latent[0]
    assert text and "encoded=0" in text[0] and "hits=0" not in text[0]
    assert os.path.isfile(tmp_path / "out" / "xl_lora.safetensors")
