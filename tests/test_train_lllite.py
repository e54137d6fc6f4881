"""sdxl_train_control_net_lllite.py end to end on the tiny SDXL model: training, files, resume, samples, bad input."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.models import safetensors_io

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd-scripts",
                       "controlnet_lllite_sdxl.keys.json")
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
STEPS, SAVED_AT = 20, 14


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64x64 photos with captions, and their canny edge maps (tools/canny.py) as hint images."""
    import skimage.data

    from tools import canny

    root = tmp_path_factory.mktemp("lllite")
    images = root / "img"
    images.mkdir()
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        array = np.stack([array] * 3, -1) if array.ndim == 2 else array[..., :3]
        Image.fromarray(array).resize((64, 64)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")
    canny.main(["--input", str(images), "--output", str(root / "hints"), "--thres1", "40", "--thres2", "120"])
    (root / "prompts.txt").write_text(f"a photo of chelsea --w 64 --h 64 --s 2 --d 5 --cn {root / 'hints' / 'chelsea.png'}\n",
                                      encoding="utf-8")
    return root


def lllite_args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", str(data / "img"),
            "--conditioning_data_dir", str(data / "hints"), "--caption_extension", ".txt", "--resolution", "64",
            "--output_dir", str(out), "--output_name", "ll", "--cond_emb_dim", "8", "--network_dim", "8",
            "--learning_rate", "4e-3", "--seed", "11", "--max_data_loader_n_workers", "0", "--cache_latents",
            "--cache_text_encoder_outputs", *extra]


def without(argv, flag):
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def train(argv):
    from library.training.script_parsers import lllite_parser
    from library.training.task_lllite import LLLiteTask
    from library.training.train_args import parse_args
    from library.training.trainer import train as run_training

    return run_training(parse_args(lllite_parser(description=""), argv), LLLiteTask())


def fixed_losses(run, task):
    """Mean loss over the first epoch's batches with fixed noise and timesteps."""
    from library.training.run import step_generator
    from library.training.step_loss import micro_step_loss

    batches = run.dataset.epoch_batches(1)
    with torch.no_grad():
        losses = [float(micro_step_loss(run, task, run.dataset.load_batch(batches[k], 1, 0),
                                        step_generator(99, k, 0, run.device))) for k in range(len(batches))]
    return sum(losses) / len(losses)


def test_training_files_samples_and_resume(tiny_checkpoint, data):
    """One run trains; its file, samples and state are checked; a second run resumes from the state."""
    from library.generation.png_info import read_png_info

    model, out = tiny_checkpoint("sdxl"), data / "out"
    run = train(lllite_args(model, data, out, "--max_train_steps", str(STEPS), "--save_every_n_steps", str(SAVED_AT),
                            "--save_state", "--sample_prompts", str(data / "prompts.txt"),
                            "--sample_every_n_steps", str(STEPS)))

    # training moved `up` away from zero and lowered the loss against the base model
    tensors = safetensors_io.load_tensors(str(out / "ll.safetensors"))
    ups = [k for k in tensors if k.endswith(".up.0.weight")]
    assert len(ups) == 136 and all(float(tensors[k].abs().max()) > 0 for k in ups)
    task = run.extra["task"]
    trained_loss = fixed_losses(run, task)
    task.network.set_multiplier(0.0)  # the frozen base model
    base_loss = fixed_losses(run, task)
    assert trained_loss < base_loss * 0.97, (trained_loss, base_loss)

    # sd-scripts' names (tiny widths) and modelspec metadata only
    fixture = json.load(open(FIXTURE, encoding="utf-8"))
    metadata = safetensors_io.read_metadata(str(out / "ll.safetensors"))
    assert set(tensors) == set(fixture["tensors"])
    assert set(metadata) == set(fixture["metadata"])
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert (metadata["modelspec.resolution"], metadata["modelspec.title"]) == ("64x64", "ll")

    # the sample followed its prompt's guide image
    samples = sorted(os.listdir(out / "sample"))
    assert len(samples) == 1
    info = read_png_info(str(out / "sample" / samples[0]))
    assert info["guide_images"] == "chelsea.png" and info["control_nets"] == "ll:1:1"

    # resuming from the state saved mid-run ends with the same weights
    state = out / f"ll-step{SAVED_AT:08d}-state"
    resumed = data / "resumed"
    train(lllite_args(model, data, resumed, "--max_train_steps", str(STEPS), "--resume", str(state)))
    again = safetensors_io.load_tensors(str(resumed / "ll.safetensors"))
    assert again.keys() == tensors.keys()
    assert max(float((again[k] - tensors[k]).abs().max()) for k in tensors) <= 1e-6


def test_network_weights_are_loaded_and_their_widths_checked(tiny_checkpoint, data, tmp_path):
    from library.models.loading import load_models
    from library.training.script_parsers import lllite_parser
    from library.training.task_lllite import LLLiteTask
    from library.training.train_args import parse_args
    from library.training.trainer import prepare_run
    from networks.control_net_lllite import ControlNetLLLite

    model = tiny_checkpoint("sdxl")
    start = ControlNetLLLite(load_models(model).unet, 8, 8)
    with torch.no_grad():
        for p in start.parameters():
            p.normal_(0, 0.1)
    weights = str(tmp_path / "start.pt")  # a torch pickle, read with weights_only
    start.save_weights(weights)
    argv = without(without(lllite_args(model, data, tmp_path / "o", "--max_train_steps", "1", "--network_weights",
                                       weights), "--cond_emb_dim"), "--network_dim")  # widths from the file
    argv = [a for a in argv if a not in ("--cache_latents", "--cache_text_encoder_outputs")]
    task = LLLiteTask()
    prepare_run(parse_args(lllite_parser(description=""), argv), task)
    loaded = task.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in start.state_dict().items())
    bad = argv + ["--cond_emb_dim", "16", "--network_dim", "16"]
    bad[bad.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "not-loaded.safetensors")
    with pytest.raises(UserError, match="made with --cond_emb_dim 8 --network_dim 8, not 16 / 16") as caught:
        prepare_run(parse_args(lllite_parser(description=""), bad), LLLiteTask())
    assert "\n" not in str(caught.value)


def test_bad_input_is_one_line_before_any_model_loads(tiny_checkpoint, data, tmp_path, capsys):
    import shutil

    partial = tmp_path / "hints"
    shutil.copytree(data / "hints", partial)
    os.remove(partial / "coffee.png")
    resized = tmp_path / "resized"
    shutil.copytree(data / "hints", resized)
    Image.open(resized / "rocket.png").resize((64, 48)).save(resized / "rocket.png")
    no_model = str(tmp_path / "not-loaded.safetensors")  # would fail if anything tried to load it
    cases = [
        (lllite_args(no_model, data, tmp_path / "o") + ["--conditioning_data_dir", str(partial)],
         "1 image.* have no conditioning image: coffee.png"),
        (lllite_args(no_model, data, tmp_path / "o") + ["--conditioning_data_dir", str(resized)],
         "rocket.png: conditioning image is 64x48 but rocket.png is 64x64"),
        (lllite_args(tiny_checkpoint("sd1"), data, tmp_path / "o"), "is a Stable Diffusion 1.x model; ControlNet-LLLite"),
        (lllite_args(no_model, data, tmp_path / "o") + ["--random_crop"], "^--random_crop: not supported"),
        (lllite_args(no_model, data, tmp_path / "o") + ["--alpha_mask"], "^--alpha_mask: "),
        (without(lllite_args(no_model, data, tmp_path / "o"), "--cond_emb_dim"), "^--cond_emb_dim is required"),
        (lllite_args(no_model, data, tmp_path / "o") + ["--resolution", "48"], "multiples of 32"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            train(argv)
        assert "\n" not in str(caught.value)
    # the dataset check knows the ControlNet pairs without loading the model
    assert train(without(lllite_args(no_model, data, tmp_path / "o"), "--cond_emb_dim") + ["--dataset_check"]) == 0
    assert "ControlNet" in capsys.readouterr().out
