"""Shared test fixtures: tiny random models of every family, written once per test session."""

import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per test process: pytest-xdist runs a process per core, and more threads than cores
# makes OpenMP spin-wait (tiny-model steps then take seconds instead of milliseconds).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

# Facts about other tools' files (key/shape lists of the original checkpoints, what sd-scripts
# writes, two small real sd-scripts files), copied into the repository: see tests/fixtures/README.md.
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture(scope="session")
def write_photos():
    """write_photos(folder, names, size, caption): scikit-image photos `names` as RGB PNGs in `folder`,
    photo i resized to size(i) = (w, h), each with a `.txt` caption(name) when caption is given."""

    def write(folder, names, size, caption=None):
        import numpy as np
        import skimage.data
        from PIL import Image

        os.makedirs(folder, exist_ok=True)
        for i, name in enumerate(names):
            array = getattr(skimage.data, name)()
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            Image.fromarray(np.ascontiguousarray(array[..., :3])).resize(size(i)).save(os.path.join(folder, f"{name}.png"))
            if caption is not None:
                with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
                    f.write(caption(name))

    return write


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name) -> path of a seeded tiny single-file checkpoint ('sd1', 'sd2', 'sd2-v', 'sdxl')."""
    cache = {}

    def make(name: str, seed: int = 0) -> str:
        key = (name, seed)
        if key not in cache:
            from library.models.families import get_family
            from library.models.saving import save_models
            from library.models.random_models import build_random_models

            family = get_family(name.split("-")[0])
            models = build_random_models(family, "tiny", seed, v_parameterization=name == "sd2-v")
            path = str(tmp_path_factory.mktemp("models") / f"tiny-{name}-{seed}.safetensors")
            save_models(models, path)
            cache[key] = path
        return cache[key]

    return make


def build_external_sd1(folder: str, seed: int = 0) -> str:
    """A tiny SD1 diffusers folder built directly with transformers/diffusers (not library/models): CLIP text
    encoder 64 wide with one head and default init (final layer norm with zero bias), U-Net widths
    32/64/96/96 with 8 heads and cross-attention 64, a two-level VAE, DDIM scheduler config."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                           num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                           hidden_act="quick_gelu", projection_dim=64))
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 96, 96), layers_per_block=1, attention_head_dim=8,
                                cross_attention_dim=64, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64)
    for name, model in [("text_encoder", encoder), ("unet", unet), ("vae", vae)]:
        model.save_pretrained(os.path.join(folder, name))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        os.path.join(folder, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    return folder


@pytest.fixture(scope="session")
def external_sd1(tmp_path_factory):
    """Path of the tiny SD1 diffusers folder of `build_external_sd1`, made once per session."""
    return build_external_sd1(str(tmp_path_factory.mktemp("external") / "sd1"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: the tiny models are bound by per-op overhead, and extra
    threads only fight the other test worker for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_logging():
    """Undo what a test did to the root logger (level, handlers: --console_log_level/_file)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
