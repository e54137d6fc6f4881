"""EMA of the trained weights (library/training/ema.py): the update rule, swapping, state, and the LoRA trainer."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.models import safetensors_io
from library.training.ema import EMA, add_ema_arguments, check_ema_args, decay_at, split_state
from library.errors import UserError


def _param(*values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_update_follows_the_decay_formula():
    p = _param(0.0, 1.0)
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 3.0]))
    assert ema.update(1)
    assert torch.allclose(ema.shadow[0], torch.tensor([0.1, 1.2]))  # 0.9·s + 0.1·w
    assert ema.update(2)
    assert torch.allclose(ema.shadow[0], torch.tensor([0.19, 1.38]))
    assert ema.num_updates == 2


def test_update_every_and_warmup():
    p = _param(0.0)
    ema = EMA([p], decay=0.999, update_every=2, warmup=True)
    with torch.no_grad():
        p.fill_(1.0)
    assert not ema.update(1) and float(ema.shadow[0]) == 0.0  # not an update step
    assert ema.update(2)
    assert float(ema.shadow[0]) == pytest.approx(0.9)  # first decay min(0.999, 1/10) = 0.1
    assert decay_at(0.999, 1, True) == pytest.approx(2 / 11)
    assert decay_at(0.999, 10_000, True) == 0.999
    assert decay_at(0.5, 0, False) == 0.5


def test_swap_puts_ema_in_and_restores_raw_exactly():
    full = _param(1.0, 2.0)
    half = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = EMA([full, half], decay=0.5, on_cpu=True)
    with torch.no_grad():
        full.copy_(torch.tensor([3.0, 4.0]))
        half.copy_(torch.tensor([3.0, 4.0]))
    ema.update(1)
    raw = [full.detach().clone(), half.detach().clone()]
    shadow = [s.clone() for s in ema.shadow]
    with ema.swap():
        assert torch.equal(full, torch.tensor([2.0, 3.0]))
        assert torch.equal(half.float(), torch.tensor([2.0, 3.0]))
    assert torch.equal(full, raw[0]) and torch.equal(half, raw[1])
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, shadow))
    assert ema.shadow[1].dtype == torch.float32 and ema.shadow[0].device.type == "cpu"


def test_state_round_trip_and_mismatch():
    p, q = _param(1.0, 2.0), _param(5.0)
    ema = EMA([p, q], decay=0.9)
    with torch.no_grad():
        p.add_(1.0)
    ema.update(1)
    state = ema.state_tensors()
    ema_part, rest = split_state({**state, "lora.weight": torch.zeros(1)})
    assert set(rest) == {"lora.weight"} and set(ema_part) == set(state)

    other = EMA([_param(0.0, 0.0), _param(0.0)], decay=0.9)
    other.load_state_tensors(ema_part, "state")
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow)) and other.num_updates == 1
    with pytest.raises(UserError, match="EMA has 2 tensors but this run trains 1"):
        EMA([_param(0.0)], decay=0.9).load_state_tensors(ema_part, "state")
    fresh = EMA([p], decay=0.9)
    fresh.load_state_tensors({}, "old state")  # a state saved without EMA: restart from the weights
    assert torch.equal(fresh.shadow[0], p.detach()) and fresh.num_updates == 0


def test_flags_are_checked():
    parser = argparse.ArgumentParser()
    add_ema_arguments(parser)
    with pytest.raises(UserError, match="--save_ema needs --ema_decay"):
        check_ema_args(parser.parse_args(["--save_ema"]))
    with pytest.raises(UserError, match="between 0 and 1"):
        check_ema_args(parser.parse_args(["--ema_decay", "1.5"]))
    with pytest.raises(UserError, match="--ema_update_every"):
        check_ema_args(parser.parse_args(["--ema_decay", "0.9", "--ema_update_every", "0"]))
    assert EMA.from_args(parser.parse_args([]), [_param(1.0)]) is None


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("ema_data") / "4_subject"
    folder.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "rocket", "chelsea"]):
        array = getattr(skimage.data, name)()[..., :3]
        Image.fromarray(np.ascontiguousarray(array)).resize((64, 64)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")
    return str(folder.parent)


def test_lora_saves_and_samples_the_ema(tiny_checkpoint, photo_dir, tmp_path, monkeypatch):
    from library.generation import sampling
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    seen = []

    def record(run, *args, **kwargs):  # stands in for rendering: what weights would the sampler use?
        seen.append([p.detach().clone() for p in run.extra["ema"].params])
        return []

    monkeypatch.setattr(sampling, "sample_images", record)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of subject --w 64 --h 64 --s 2\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", tiny_checkpoint("sd1"), "--train_data_dir", photo_dir,
        "--output_dir", str(out), "--output_name", "lora", "--resolution", "64", "--train_batch_size", "2",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--learning_rate", "1e-2", "--seed", "3", "--max_data_loader_n_workers", "0", "--max_train_steps", "3",
        "--cache_latents", "--ema_decay", "0.6", "--save_ema", "--sample_ema", "--sample_prompts", str(prompts),
        "--sample_every_n_steps", "3",
    ]
    run = train(parse_args(network_parser(sdxl=False, description=""), argv), NetworkTask(sdxl=False))
    ema = run.extra["ema"]
    assert ema.num_updates == 3 and len(seen) == 1

    index = {id(p): i for i, p in enumerate(ema.params)}
    named = {name: index[id(p)] for name, p in run.extra["task"].network.named_parameters() if id(p) in index}
    saved = safetensors_io.load_tensors(os.path.join(out, "lora.safetensors"))
    ups = [k for k in named if "lora_up" in k]
    assert ups and set(named) <= set(saved)
    for name, i in named.items():
        assert torch.equal(saved[name], ema.shadow[i].to(saved[name].dtype))  # the file is the EMA
        assert torch.equal(seen[0][i], ema.shadow[i])  # so were the samples
    raw = dict(run.extra["task"].network.named_parameters())
    assert max(float((saved[k] - raw[k].detach()).abs().max()) for k in ups) > 1e-6  # and it is not the raw LoRA
