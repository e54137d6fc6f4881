"""Training with two processes (`accelerate launch`, gloo on CPU) equals one process with accumulation.

The loop gives each optimizer step the consecutive batches [k·A·P, (k+1)·A·P) of an epoch, process p
takes every P-th of them, and gradients are averaged with an all-reduce. So two processes with
batch B and no accumulation must train the same weights as one process with batch B and
`--gradient_accumulation_steps 2`, as long as every micro-batch has the same size (the dataset
below has one bucket and a sample count that divides evenly). Only the main process may write.

accelerate 1.15 note: `accelerate launch --cpu --num_processes 2` starts ONE process (its CPU
multi-process path needs mpirun), and so does a config with `distributed_type: MULTI_CPU`. The
torchrun path (`distributed_type: MULTI_GPU` / `--multi_gpu`) on a machine without CUDA gives two
processes with `DistributedType.MULTI_CPU` and the gloo backend, because our Accelerator is made
with `cpu=True` there; that is what these tests launch.

The main test starts both runs from the same `--network_weights` file, so it checks the batch split,
the gradient all-reduce and the writes on their own; the others check that every process starts
from the same seeded weights, that the learning-rate schedule runs at full speed with two
processes, and that bf16 weights and gradients (`--full_bf16`) train as one process does.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from library.models import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
STEPS = 6  # 16 samples / batch 2 / 2 micro-batches per step = 4 steps per epoch: crosses an epoch end
TIMEOUT = 300  # seconds per launch; about 30 s on an idle 2-core machine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def square_photos(tmp_path_factory):
    """`4_subject` with four 64×64 photos: one bucket, 16 samples, so every batch of 2 is full."""
    import skimage.data

    root = tmp_path_factory.mktemp("mpdata")
    folder = root / "4_subject"
    folder.mkdir()
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        Image.fromarray(array[..., :3]).resize((64, 64)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")
    return str(root)


@pytest.fixture(scope="module")
def start_weights(tiny_checkpoint, tmp_path_factory):
    """A LoRA file with random down and small random up weights for both runs to start from."""
    import networks.lora
    from library.models.loading import load_models

    models = load_models(tiny_checkpoint("sd1"), dtype=torch.float32)
    torch.manual_seed(3)
    network = networks.lora.create_network(1.0, 4, 1, models.vae, models.text_encoders[0], models.unet)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    path = str(tmp_path_factory.mktemp("start") / "start.safetensors")
    network.save_weights(path)
    return path


def _train_args(model, data, out, *extra):
    return [
        "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
        "--output_name", "lora", "--resolution", "64", "--train_batch_size", "2", "--caption_extension", ".txt",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1", "--learning_rate", "1e-3",
        "--seed", "11",
        "--max_data_loader_n_workers", "0", "--max_train_steps", str(STEPS), "--mixed_precision", "no", *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_config(folder) -> str:
    """A config that makes accelerate start two torchrun workers; see the module docstring for why
    it says MULTI_GPU on a CPU-only machine."""
    path = os.path.join(str(folder), "accelerate.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            "compute_environment: LOCAL_MACHINE\n"
            "distributed_type: MULTI_GPU\n"
            "num_machines: 1\n"
            "machine_rank: 0\n"
            "num_processes: 2\n"
            "gpu_ids: all\n"
            "use_cpu: true\n"
            "mixed_precision: 'no'\n"
            "rdzv_backend: static\n"
            "same_network: true\n"
            f"main_process_port: {_free_port()}\n"
        )
    return path


def _launch_two_processes(tmp_path, args) -> subprocess.CompletedProcess:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "--config_file", _accelerate_config(tmp_path), "--num_processes", "2",
               "--num_cpu_threads_per_process", "1", os.path.join(ROOT, "train_network.py"), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return done


def _train_in_process(args):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    return train(parse_args(network_parser(sdxl=False, description=""), args), NetworkTask(sdxl=False))


def _listing(folder) -> dict:
    """{relative path: "dir" or "file"} of everything below `folder`, hidden entries included."""
    found = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            found[os.path.relpath(os.path.join(here, name), folder)] = "dir" if name in dirs else "file"
    return found


def _max_difference(path_a, path_b) -> float:
    a, b = safetensors_io.load_tensors(path_a), safetensors_io.load_tensors(path_b)
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _scheduler_lr(state_folder) -> list:
    state = torch.load(os.path.join(state_folder, "scheduler.pt"), weights_only=False)
    return [float(x) for x in state["_last_lr"]]


def test_two_processes_train_like_accumulation_and_only_the_main_one_writes(tiny_checkpoint, square_photos,
                                                                            start_weights, tmp_path):
    model = tiny_checkpoint("sd1")
    # --clip_skip 2: the text encoder's last layer never runs, so its LoRA modules get no gradient in
    # any process and must stay as they started (no weight decay from a zero-filled gradient)
    saves = ["--save_every_n_steps", "2", "--save_every_n_epochs", "1", "--save_state", "--network_weights",
             start_weights, "--clip_skip", "2"]
    two = str(tmp_path / "two")
    # the two processes share one disk latent cache: each encodes its half, then both read all of it
    data_two = str(tmp_path / "data_two")
    shutil.copytree(square_photos, data_two)
    launched = _launch_two_processes(tmp_path, _train_args(model, data_two, two, "--cache_latents",
                                                           "--cache_latents_to_disk", *saves))
    one = str(tmp_path / "one")
    data_one = str(tmp_path / "data_one")
    shutil.copytree(square_photos, data_one)
    run = _train_in_process(_train_args(model, data_one, one, "--gradient_accumulation_steps", "2", "--cache_latents",
                                        "--cache_latents_to_disk", *saves))
    assert run.num_processes == 1 and run.steps_per_epoch == 4

    # the same weights at every save point, so the same batches met the same noise at every step
    files = sorted(f for f in os.listdir(one) if f.endswith(".safetensors"))
    assert files == ["lora-000001.safetensors", "lora-step00000002.safetensors", "lora-step00000004.safetensors",
                     "lora.safetensors"]
    for name in files:
        assert _max_difference(os.path.join(one, name), os.path.join(two, name)) <= 1e-6, name
    final = safetensors_io.load_tensors(os.path.join(two, "lora.safetensors"))
    start = safetensors_io.load_tensors(start_weights)
    assert final.keys() == start.keys()
    assert max(float((final[k] - start[k]).abs().max()) for k in final) > 1e-4  # it did train
    last = max(int(k.split("encoder_layers_")[1].split("_")[0]) for k in final if "encoder_layers_" in k)
    skipped = [k for k in final if k.startswith(f"lora_te_text_model_encoder_layers_{last}_")]
    assert skipped and all(torch.equal(final[k], start[k]) for k in skipped)

    # both record a global batch of 2 × 2
    metadata = safetensors_io.read_metadata(os.path.join(two, "lora.safetensors"))
    assert metadata["ss_total_batch_size"] == "4" and metadata["ss_steps"] == str(STEPS)

    # one writer: the same files as the one-process run, no temp or ".old" leftovers, one "saved" per save point
    assert _listing(two) == _listing(one)
    leftovers = [p for p in _listing(two) if p.endswith((".tmp", ".old")) or os.path.basename(p).startswith(".")]
    assert not leftovers, leftovers
    states = sorted(p for p, kind in _listing(two).items() if kind == "dir")
    assert states == ["lora-000001-state", "lora-state", "lora-step00000002-state", "lora-step00000004-state"]
    for state in states:
        with open(os.path.join(two, state, "train_state.json"), encoding="utf-8") as f:
            position_two = json.load(f)
        with open(os.path.join(one, state, "train_state.json"), encoding="utf-8") as f:
            assert position_two == json.load(f), state
    log = launched.stdout + launched.stderr
    assert log.count("saved " + os.path.join(two, "lora")) == len(files)  # steps 2 and 4, epoch 1, final
    # the shared disk cache holds what a one-process cache holds, and no temporary file survived
    cache_two = _listing(os.path.join(data_two, "4_subject"))
    assert not [p for p in cache_two if p.endswith(".tmp")], sorted(cache_two)
    assert cache_two == _listing(os.path.join(data_one, "4_subject"))
    entries = [p for p, kind in cache_two.items() if kind == "file" and p.endswith(".safetensors")]
    assert len(entries) == len(PHOTOS)  # one latent entry per image (no flip_aug), written once


def test_two_processes_start_from_the_same_seeded_init(tiny_checkpoint, square_photos, tmp_path):
    model = tiny_checkpoint("sd1")
    two = str(tmp_path / "two")
    short = ["--network_train_unet_only", "--max_train_steps", "2"]  # the last --max_train_steps wins
    _launch_two_processes(tmp_path, _train_args(model, square_photos, two, *short))
    one = str(tmp_path / "one")
    torch.manual_seed(12345)  # whatever state the global RNG is in, --seed must decide the init
    _train_in_process(_train_args(model, square_photos, one, "--gradient_accumulation_steps", "2", *short))
    assert _max_difference(os.path.join(one, "lora.safetensors"), os.path.join(two, "lora.safetensors")) <= 1e-6


def test_two_processes_follow_the_same_lr_schedule(tiny_checkpoint, square_photos, start_weights, tmp_path):
    model = tiny_checkpoint("sd1")
    schedule = ["--lr_scheduler", "linear", "--save_state", "--network_train_unet_only", "--network_weights",
                start_weights, "--max_train_steps", "2"]  # the last --max_train_steps wins
    two = str(tmp_path / "two")
    _launch_two_processes(tmp_path, _train_args(model, square_photos, two, *schedule))
    one = str(tmp_path / "one")
    _train_in_process(_train_args(model, square_photos, one, "--gradient_accumulation_steps", "2", *schedule))
    lr_one = _scheduler_lr(os.path.join(one, "lora-state"))
    assert lr_one == pytest.approx([0.0] * len(lr_one), abs=1e-12)  # linear decay ends at 0 after max_train_steps
    assert _scheduler_lr(os.path.join(two, "lora-state")) == pytest.approx(lr_one, abs=1e-12)
    assert _max_difference(os.path.join(one, "lora.safetensors"), os.path.join(two, "lora.safetensors")) <= 1e-6


def test_two_processes_with_full_bf16_train_like_accumulation(tiny_checkpoint, square_photos, start_weights, tmp_path):
    """bf16 LoRA weights and gradients: the all-reduce runs in bf16, on gradients already divided by the
    step's micro-batch count, and gives the update one process with accumulation gives (within bf16 rounding)."""
    model = tiny_checkpoint("sd1")
    half = ["--mixed_precision", "bf16", "--full_bf16", "--network_train_unet_only", "--network_weights",
            start_weights, "--max_train_steps", "2"]  # the last --mixed_precision and --max_train_steps win
    two = str(tmp_path / "two")
    _launch_two_processes(tmp_path, _train_args(model, square_photos, two, *half))
    one = str(tmp_path / "one")
    _train_in_process(_train_args(model, square_photos, one, "--gradient_accumulation_steps", "2", *half))
    start = safetensors_io.load_tensors(start_weights)
    a = safetensors_io.load_tensors(os.path.join(one, "lora.safetensors"))
    b = safetensors_io.load_tensors(os.path.join(two, "lora.safetensors"))
    assert a.keys() == b.keys() and all(b[k].dtype == torch.bfloat16 for k in b)
    update_one = torch.cat([(a[k].float() - start[k].float()).flatten() for k in sorted(a)])
    update_two = torch.cat([(b[k].float() - start[k].float()).flatten() for k in sorted(b)])
    assert float(update_one.abs().max()) > 1e-4  # it did train
    # equal here (bf16 sums of two halves round alike); the margin allows other CPUs' bf16 kernels
    assert float((update_two - update_one).norm() / update_one.norm()) <= 0.02
