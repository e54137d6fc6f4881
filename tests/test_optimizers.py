"""Optimizers and lr schedulers built from sd-scripts' flags: every type steps, fallbacks, args, lr curves, resume."""

import argparse
import io
import logging
import math
import sys
import types

import pytest
import torch

from library.errors import UserError
from library.training.lr_schedulers import add_lr_scheduler_arguments, build_lr_scheduler, resolve_steps, steps_or_fraction
from library.training.optimizers import (
    OPTIMIZER_TYPES,
    adaptive_lrs,
    add_optimizer_arguments,
    build_optimizer,
    is_schedule_free,
    optimizer_eval_mode,
    optimizer_metadata,
    optimizer_train_mode,
    parse_kv_args,
)

OPT_LOGGER = "library.training.optimizers"


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_lr_scheduler_arguments(add_optimizer_arguments(parser))
    return parser.parse_args(list(argv))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def train_step(model, optimizer, seed=1):
    torch.manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()


@pytest.fixture
def no_cuda(monkeypatch):
    """Make the bitsandbytes decision independent of the machine the tests run on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_bitsandbytes(monkeypatch):
    """A stand-in bitsandbytes whose 8-bit classes are torch's 32-bit ones under bitsandbytes' names."""
    bnb = types.ModuleType("bitsandbytes")
    optim = types.ModuleType("bitsandbytes.optim")
    for name, base in [("AdamW8bit", torch.optim.AdamW), ("PagedAdamW8bit", torch.optim.AdamW),
                       ("SGD8bit", torch.optim.SGD)]:
        setattr(optim, name, type(name, (base,), {"__module__": "bitsandbytes.optim.fake"}))
    bnb.optim = optim
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", optim)
    return bnb


# ---------------------------------------------------------------------------------------------
# every optimizer type

EXPECTED_CLASS = {  # without a usable bitsandbytes
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "torch.optim.adamw.AdamW",
    "PagedAdamW8bit": "torch.optim.adamw.AdamW",
    "PagedAdamW": "torch.optim.adamw.AdamW",
    "PagedAdamW32bit": "torch.optim.adamw.AdamW",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "Lion8bit": "lion_pytorch.lion_pytorch.Lion",
    "PagedLion8bit": "lion_pytorch.lion_pytorch.Lion",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "torch.optim.sgd.SGD",
    "DAdaptation": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    "DAdaptAdamPreprint": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    "DAdaptAdaGrad": "dadaptation.dadapt_adagrad.DAdaptAdaGrad",
    "DAdaptAdam": "dadaptation.dadapt_adam.DAdaptAdam",
    "DAdaptAdan": "dadaptation.dadapt_adan.DAdaptAdan",
    "DAdaptAdanIP": "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP",
    "DAdaptLion": "dadaptation.dadapt_lion.DAdaptLion",
    "DAdaptSGD": "dadaptation.dadapt_sgd.DAdaptSGD",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "Adafactor": "transformers.optimization.Adafactor",
    "RAdamScheduleFree": "schedulefree.radam_schedulefree.RAdamScheduleFree",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "SGDScheduleFree": "schedulefree.sgd_schedulefree.SGDScheduleFree",
    "RAdam": "torch.optim.radam.RAdam",
    "nadam": "torch.optim.nadam.NAdam",
    "torch.optim.Adagrad": "torch.optim.adagrad.Adagrad",
}


def test_table_covers_every_type():
    assert set(OPTIMIZER_TYPES) <= set(EXPECTED_CLASS)


@pytest.mark.parametrize("optimizer_type", list(EXPECTED_CLASS))
def test_every_optimizer_type_builds_and_steps(optimizer_type, no_cuda, tmp_path):
    lr = "1.0" if optimizer_type.startswith("DAdapt") or optimizer_type == "Prodigy" else "0.01"
    args = parse("--optimizer_type", optimizer_type, "--learning_rate", lr)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    name, _, optimizer = build_optimizer(args, model.parameters())
    assert name == EXPECTED_CLASS[optimizer_type]
    scheduler = build_lr_scheduler(args, optimizer, num_training_steps=10, num_processes=1)
    # RAdam-based optimizers skip the first steps while their variance estimate is unreliable
    for seed in range(6 if "RAdam" in optimizer_type else 1):
        train_step(model, optimizer, seed)
        scheduler.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed), f"{optimizer_type} left parameters unchanged"
    # resume reads optimizer state with weights_only=True (library/training/train_state.py)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert len(loaded["optimizer"]["param_groups"]) == len(optimizer.param_groups)


def test_metadata_string_lists_the_logged_arguments(no_cuda):
    args = parse("--optimizer_type", "SGDNesterov", "--learning_rate", "0.1", "--optimizer_args", "weight_decay=0.01")
    name, arg_text, optimizer = build_optimizer(args, tiny_model().parameters())
    assert optimizer_metadata(name, arg_text) == "torch.optim.sgd.SGD(weight_decay=0.01,momentum=0.9)"
    assert optimizer.param_groups[0]["nesterov"] is True
    assert optimizer_metadata("torch.optim.adamw.AdamW", "") == "torch.optim.adamw.AdamW"


def test_default_is_adamw_at_the_sd_scripts_defaults():
    args = parse()
    assert (args.optimizer_type, args.learning_rate, args.max_grad_norm, args.lr_scheduler) == ("", 2e-6, 1.0, "constant")
    assert (args.lr_warmup_steps, args.lr_decay_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power) == (0, 0, 1, 1)
    assert args.lr_scheduler_timescale is None and args.lr_scheduler_min_lr_ratio is None
    name, arg_text, optimizer = build_optimizer(args, tiny_model().parameters())
    assert (name, arg_text) == ("torch.optim.adamw.AdamW", "")
    assert optimizer.param_groups[0]["lr"] == 2e-6


def test_param_group_dicts_keep_their_learning_rates():
    model = tiny_model()
    groups = [{"params": model[0].parameters(), "lr": 1e-4}, {"params": model[2].parameters(), "lr": 5e-5}]
    _, _, optimizer = build_optimizer(parse("--learning_rate", "1e-3"), groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-5]


# ---------------------------------------------------------------------------------------------
# bitsandbytes: used when usable, else one warning and the 32-bit equivalent


def test_missing_bitsandbytes_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    args = parse("--optimizer_type", "AdamW8bit", "--learning_rate", "0.01",
                 "--optimizer_args", "weight_decay=0.1", "min_8bit_size=16", "percentile_clipping=95")
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        name, arg_text, optimizer = build_optimizer(args, tiny_model().parameters())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0]
    assert "\n" not in line
    for part in ("--optimizer_type AdamW8bit", "bitsandbytes is not installed", "torch.optim.adamw.AdamW",
                 "min_8bit_size", "percentile_clipping"):
        assert part in line
    assert type(optimizer) is torch.optim.AdamW
    assert (name, arg_text) == ("torch.optim.adamw.AdamW", "weight_decay=0.1")
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_legacy_use_8bit_adam_falls_back_too(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        name, _, _ = build_optimizer(parse("--use_8bit_adam"), tiny_model().parameters())
    assert name == "torch.optim.adamw.AdamW"
    assert "--optimizer_type AdamW8bit" in caplog.text


def test_bitsandbytes_without_cuda_falls_back(fake_bitsandbytes, no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        name, arg_text, optimizer = build_optimizer(parse("--optimizer_type", "SGDNesterov8bit"),
                                                    tiny_model().parameters())
    assert "no CUDA device" in caplog.text and "SGDNesterov8bit" in caplog.text
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["nesterov"] is True and optimizer.param_groups[0]["momentum"] == 0.9
    assert arg_text == "momentum=0.9"


def test_bitsandbytes_used_when_cuda_is_there(fake_bitsandbytes, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        name, _, optimizer = build_optimizer(parse("--optimizer_type", "adamw8bit"), tiny_model().parameters())
        name_sgd, args_sgd, sgd = build_optimizer(parse("--optimizer_type", "SGDNesterov8bit"),
                                                  tiny_model().parameters())
    assert caplog.records == []
    assert name == "bitsandbytes.optim.fake.AdamW8bit"
    assert type(optimizer) is fake_bitsandbytes.optim.AdamW8bit
    assert name_sgd == "bitsandbytes.optim.fake.SGD8bit" and args_sgd == "momentum=0.9"
    assert sgd.param_groups[0]["nesterov"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real bitsandbytes 8-bit optimizers need a CUDA device")
def test_real_bitsandbytes_on_cuda():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the optional 'cuda' extra) is not installed")
    model = tiny_model().cuda()
    name, _, optimizer = build_optimizer(parse("--optimizer_type", "AdamW8bit", "--learning_rate", "0.01"),
                                         model.parameters())
    assert name.startswith("bitsandbytes.optim")
    before = model[0].weight.detach().clone()
    optimizer.zero_grad()
    model(torch.randn(5, 4, device="cuda")).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)


# ---------------------------------------------------------------------------------------------
# --optimizer_args and type selection


def test_optimizer_args_are_python_literals():
    args = parse("--optimizer_args", "weight_decay=0.05", "betas=0.8,0.95", "amsgrad=True", "eps=1e-7")
    name, arg_text, optimizer = build_optimizer(args, tiny_model().parameters())
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["amsgrad"] is True
    assert group["weight_decay"] == 0.05 and group["eps"] == 1e-7
    assert arg_text == "weight_decay=0.05,betas=(0.8, 0.95),amsgrad=True,eps=1e-07"


def test_kv_parsing_details():
    parsed = parse_kv_args(['mode="a=b"', " d = [1, 2] ", "x=None", "t=(1,)", "s='q'"], "--optimizer_args")
    assert parsed == {"mode": "a=b", "d": [1, 2], "x": None, "t": (1,), "s": "q"}
    assert parse_kv_args(None, "--x") == {} and parse_kv_args("k=1", "--x") == {"k": 1}


@pytest.mark.parametrize("item", ["x=__import__('os').system('true')", "x=abc", "x=open('f')", "noequals",
                                  "=1", "x=1+", "x=lambda: 1"])
def test_non_literal_optimizer_args_are_refused(item):
    with pytest.raises(UserError, match="--optimizer_args"):
        build_optimizer(parse("--optimizer_args", item), tiny_model().parameters())


def test_optimizer_args_lr_overrides_learning_rate():
    _, _, optimizer = build_optimizer(parse("--learning_rate", "1", "--optimizer_args", "lr=0.003"),
                                      tiny_model().parameters())
    assert optimizer.param_groups[0]["lr"] == 0.003


def test_unknown_optimizer_and_unknown_argument_are_user_errors():
    with pytest.raises(UserError, match="did you mean Prodigy"):
        build_optimizer(parse("--optimizer_type", "Prodigi"), tiny_model().parameters())
    with pytest.raises(UserError, match="cannot import"):
        build_optimizer(parse("--optimizer_type", "no_such_pkg.Opt"), tiny_model().parameters())
    with pytest.raises(UserError, match="colour"):
        build_optimizer(parse("--optimizer_args", "colour=1"), tiny_model().parameters())
    with pytest.raises(UserError, match="no parameters"):
        build_optimizer(parse(), [])


def test_legacy_aliases():
    name, _, _ = build_optimizer(parse("--use_lion_optimizer", "--learning_rate", "1e-4"), tiny_model().parameters())
    assert name == "lion_pytorch.lion_pytorch.Lion"
    with pytest.raises(UserError, match="--use_8bit_adam and --optimizer_type"):
        build_optimizer(parse("--use_8bit_adam", "--optimizer_type", "AdamW"), tiny_model().parameters())
    with pytest.raises(UserError, match="contradict"):
        build_optimizer(parse("--use_8bit_adam", "--use_lion_optimizer"), tiny_model().parameters())


def test_fused_backward_pass_rules():
    with pytest.raises(UserError, match="Adafactor"):
        build_optimizer(parse("--fused_backward_pass"), tiny_model().parameters())
    args = parse("--fused_backward_pass", "--optimizer_type", "Adafactor")
    args.gradient_accumulation_steps = 2
    with pytest.raises(UserError, match="gradient_accumulation_steps 1"):
        build_optimizer(args, tiny_model().parameters())


# ---------------------------------------------------------------------------------------------
# Adafactor, D-Adaptation / Prodigy, schedule-free


def test_adafactor_relative_step_ignores_lrs_and_uses_its_schedule(caplog):
    from transformers.optimization import AdafactorSchedule

    model = tiny_model()
    args = parse("--optimizer_type", "Adafactor", "--learning_rate", "0.001", "--lr_scheduler", "cosine")
    args.unet_lr, args.text_encoder_lr = 1e-4, [5e-5]
    groups = [{"params": list(model[0].parameters()), "lr": 1e-4}, {"params": list(model[2].parameters()), "lr": 5e-5}]
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        name, arg_text, optimizer = build_optimizer(args, groups)
    assert "--learning_rate and the per-part learning rates, --lr_scheduler cosine ignored" in caplog.text
    assert arg_text == "relative_step=True"
    assert args.learning_rate is None and args.unet_lr is None and args.text_encoder_lr is None
    assert args.lr_scheduler == "adafactor:0.001"
    assert all(g["lr"] is None for g in optimizer.param_groups)
    scheduler = build_lr_scheduler(args, optimizer, 100, 1)
    assert isinstance(scheduler, AdafactorSchedule)
    assert scheduler.get_last_lr() == [0.001, 0.001]
    train_step(model, optimizer)
    scheduler.step()
    # relative step: min(1e-2, 1/sqrt(step)) × max(eps2, RMS(param)) with scale_parameter=True
    w = model[0].weight
    assert float(scheduler.get_last_lr()[0]) == pytest.approx(1e-2 * w.detach().pow(2).mean().sqrt().item(), rel=0.05)


def test_adafactor_fixed_lr():
    args = parse("--optimizer_type", "Adafactor", "--learning_rate", "0.002",
                 "--optimizer_args", "relative_step=False", "scale_parameter=False")
    _, arg_text, optimizer = build_optimizer(args, tiny_model().parameters())
    assert optimizer.param_groups[0]["lr"] == 0.002 and args.lr_scheduler == "constant"
    assert arg_text == "relative_step=False,scale_parameter=False"
    scheduler = build_lr_scheduler(args, optimizer, 10, 1)
    assert scheduler.get_last_lr() == [0.002]


def test_adafactor_warmup_init_forces_relative_step():
    args = parse("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "warmup_init=True")
    _, arg_text, optimizer = build_optimizer(args, tiny_model().parameters())
    assert optimizer.param_groups[0]["relative_step"] is True
    assert arg_text == "relative_step=True,warmup_init=True"


def test_adafactor_schedule_needs_adafactor():
    args = parse("--lr_scheduler", "adafactor")
    _, _, optimizer = build_optimizer(args, tiny_model().parameters())
    with pytest.raises(UserError, match="Adafactor"):
        build_lr_scheduler(args, optimizer, 10, 1)


def test_dadaptation_low_lr_warning_and_single_lr(caplog):
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr": 0.05},
              {"params": list(model[2].parameters()), "lr": 0.5},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.0}]
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        _, _, optimizer = build_optimizer(parse("--optimizer_type", "Prodigy"), groups)
    assert "learning rate 0.05 is low" in caplog.text and "one learning rate" in caplog.text
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.05, 0.0]
    train_step(model, optimizer)  # Prodigy itself raises on different non-zero group lrs
    d = optimizer.param_groups[0]["d"]
    assert adaptive_lrs(optimizer) == pytest.approx([d * 0.05, d * 0.05, 0.0])
    _, _, adam = build_optimizer(parse(), tiny_model().parameters())
    assert adaptive_lrs(adam) is None


def test_schedule_free_train_eval_switching(caplog):
    model = tiny_model()
    args = parse("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "0.05",
                 "--lr_scheduler", "cosine", "--lr_warmup_steps", "3")
    _, _, optimizer = build_optimizer(args, model.parameters())
    assert is_schedule_free(optimizer)
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        scheduler = build_lr_scheduler(args, optimizer, 10, 1)
    assert "warmup_steps=N" in caplog.text
    for seed in range(3):
        train_step(model, optimizer, seed)
        scheduler.step()
    assert scheduler.get_last_lr() == [0.05]  # the placeholder scheduler never changes the lr
    train_weights = model[0].weight.detach().clone()
    optimizer_eval_mode(optimizer)
    eval_weights = model[0].weight.detach().clone()
    assert not torch.allclose(train_weights, eval_weights)
    optimizer_train_mode(optimizer)
    assert torch.allclose(model[0].weight, train_weights, atol=1e-6)

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            self.optimizer = inner

        def train(self):
            self.optimizer.train()

        def eval(self):
            self.optimizer.eval()

    wrapped = Wrapper(optimizer)
    assert is_schedule_free(wrapped)
    optimizer_eval_mode(wrapped)
    assert torch.allclose(model[0].weight, eval_weights, atol=1e-6)
    optimizer_train_mode(wrapped)


def test_train_eval_helpers_leave_other_optimizers_alone():
    model = tiny_model()
    _, _, optimizer = build_optimizer(parse(), model.parameters())
    assert not is_schedule_free(optimizer)
    optimizer_eval_mode(optimizer)
    optimizer_train_mode(optimizer)


# ---------------------------------------------------------------------------------------------
# warmup / decay step values


@pytest.mark.parametrize("text, parsed", [("10", 10), ("0", 0), ("0.1", 0.1), ("5%", 0.05), ("100.0", 100),
                                          ("100%", 1.0), ("2", 2)])
def test_steps_or_fraction_accepts(text, parsed):
    value = steps_or_fraction(text)
    assert value == parsed and type(value) is type(parsed)


@pytest.mark.parametrize("text", ["1.5", "-1", "abc", "x%", "150%", "-5%", "nan"])
def test_steps_or_fraction_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        steps_or_fraction(text)


def test_ambiguous_warmup_is_rejected_by_the_parser_with_a_hint(capsys):
    with pytest.raises(SystemExit):
        parse("--lr_warmup_steps", "1.5")
    assert "fraction below 1" in capsys.readouterr().err


@pytest.mark.parametrize("value, total, steps", [(0.1, 1000, 100), ("5%", 1000, 50), (0.25, 10, 2), (50, 1000, 50),
                                                 ("100.0", 7, 100), (None, 10, 0), (0.999, 3, 2)])
def test_resolve_steps(value, total, steps):
    assert resolve_steps(value, total, "--lr_warmup_steps") == steps


def test_resolve_steps_config_value_errors():
    with pytest.raises(UserError, match="--lr_decay_steps"):
        resolve_steps(1.5, 100, "--lr_decay_steps")
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        resolve_steps(True, 100, "--lr_warmup_steps")


# ---------------------------------------------------------------------------------------------
# lr curves


def lr_curve(*argv, total=10, processes=1, lr=1.0, steps=None):
    """lr after 0..steps scheduler steps for a plain SGD at `lr`."""
    args = parse("--learning_rate", str(lr), *argv)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_lr_scheduler(args, optimizer, total, processes)
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps if steps is not None else total * processes):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def at(curve, **points):
    return [curve[int(k[1:])] for k in points], list(points.values())


def half_cosine(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


CURVES = [
    (["--lr_scheduler", "constant"], {"s0": 1.0, "s5": 1.0, "s10": 1.0}),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4"],
     {"s0": 0.0, "s1": 0.25, "s2": 0.5, "s4": 1.0, "s9": 1.0}),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "2"], {"s0": 0.0, "s1": 0.5, "s2": 1.0, "s6": 0.5, "s10": 0.0}),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "2"],
     {"s1": 0.5, "s2": 1.0, "s4": half_cosine(0.25), "s6": 0.5, "s10": 0.0}),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"],
     {"s0": 1.0, "s3": half_cosine(0.6), "s5": 1.0, "s8": half_cosine(0.6)}),
    (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"],
     {"s0": 1.0, "s5": (1 - 1e-7) * 0.25 + 1e-7, "s10": 1e-7}),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "2", "--lr_scheduler_timescale", "4"],
     {"s1": 0.5, "s2": 1.0, "s6": 1 / math.sqrt(2), "s10": 1 / math.sqrt(3)}),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "4"], {"s2": 0.5, "s4": 1.0, "s8": 1 / math.sqrt(2)}),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"],
     {"s0": 1.0, "s5": 0.55, "s10": 0.1}),
    # transformers' warmup variant runs one step ahead: progress = (s + 1) / T without warmup
    (["--lr_scheduler", "cosine_warmup_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"],
     {"s4": 0.55, "s9": 0.1}),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "4"],
     {"s1": 0.5, "s2": 1.0, "s5": 1.0, "s6": 1.0, "s8": 0.5, "s10": 0.0}),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "20%", "--lr_decay_steps", "0.4",
      "--lr_scheduler_min_lr_ratio", "0.2"],
     {"s1": 0.6, "s5": 1.0, "s7": 0.2 + 0.8 * half_cosine(0.25), "s10": 0.2}),
    (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", 'step_rules="1:3,0.1:6,0.01"'],
     {"s2": 1.0, "s3": 0.1, "s5": 0.1, "s6": 0.01, "s10": 0.01}),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "num_cycles=1.0"], {"s0": 1.0, "s5": 0.0, "s10": 1.0}),
    (["--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=0.5"], {"s5": 0.75, "s10": 0.5}),
    (["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=10"], {"s5": 0.5, "s10": 0.0}),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5"],
     {"s1": 1.0, "s2": 0.5, "s4": 0.25}),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "0.1"], {"s0": 0.0, "s1": 1.0, "s4": 6 / 9, "s10": 0.0}),
]


@pytest.mark.parametrize("argv, points", CURVES, ids=[" ".join(a) for a, _ in CURVES])
def test_lr_curve(argv, points):
    got, expected = at(lr_curve(*argv), **points)
    assert got == pytest.approx(expected, abs=1e-9)


def test_schedule_spans_steps_times_processes():
    # 5 optimizer steps × 2 processes = 10 scheduler steps; 0.5 ⇒ 5 warmup steps
    got, expected = at(lr_curve("--lr_scheduler", "linear", "--lr_warmup_steps", "0.5", total=5, processes=2),
                       s2=0.4, s5=1.0, s8=0.4, s10=0.0)
    assert got == pytest.approx(expected)


def test_scheduler_scales_every_group():
    args = parse("--lr_scheduler", "linear")
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    scheduler = build_lr_scheduler(args, optimizer, 4, 1)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.75, 0.075])


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "3"], "constant_with_warmup"),
    (["--lr_scheduler", "cosin"], "did you mean cosine"),
    (["--lr_scheduler", "reduce_lr_on_plateau"], "metric"),
    (["--lr_scheduler", "cosine_with_min_lr"], "--lr_scheduler_min_lr_ratio"),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "6", "--lr_decay_steps", "6"], "exceed"),
    (["--lr_scheduler", "piecewise_constant"], "step_rules"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "--lr_warmup_steps", "1"],
     "does not use --lr_warmup_steps"),
    (["--lr_scheduler_type", "NoSuchLR"], "has no NoSuchLR"),
    (["--lr_scheduler_type", "StepLR"], "step_size"),
    (["--lr_scheduler", "linear", "--lr_scheduler_args", "bogus=1"], "bogus"),
])
def test_scheduler_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        lr_curve(*argv, steps=0)


# ---------------------------------------------------------------------------------------------
# resume


ROUND_TRIP = [
    ["--lr_scheduler", "constant"],
    ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4"],
    ["--lr_scheduler", "linear", "--lr_warmup_steps", "2"],
    ["--lr_scheduler", "cosine", "--lr_warmup_steps", "0.2"],
    ["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "3"],
    ["--lr_scheduler", "polynomial", "--lr_scheduler_power", "0.5"],
    ["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "2"],
    ["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"],
    ["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "3"],
    ["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", 'step_rules="1:3,0.5"'],
    ["--lr_scheduler_type", "ExponentialLR", "--lr_scheduler_args", "gamma=0.9"],
    ["--optimizer_type", "Adafactor"],
    ["--optimizer_type", "SGDScheduleFree"],
]


@pytest.mark.parametrize("argv", ROUND_TRIP, ids=[" ".join(a) for a in ROUND_TRIP])
def test_scheduler_state_dict_round_trip(argv):
    def fresh():
        model = tiny_model()
        args = parse("--learning_rate", "0.1", *argv)
        _, _, optimizer = build_optimizer(args, model.parameters())
        return model, optimizer, build_lr_scheduler(args, optimizer, 12, 1)

    model, optimizer, scheduler = fresh()
    for seed in range(4):
        train_step(model, optimizer, seed)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, resumed_optimizer, resumed = fresh()
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.last_epoch == scheduler.last_epoch == 4
    for seed in range(4, 8):
        for m, o, s in ((model, optimizer, scheduler), (resumed_model, resumed_optimizer, resumed)):
            train_step(m, o, seed)
            s.step()
        assert [float(x) for x in resumed.get_last_lr()] == pytest.approx([float(x) for x in scheduler.get_last_lr()])
    assert torch.allclose(resumed_model[0].weight, model[0].weight, atol=1e-6)


def test_adamw_uses_the_fused_kernel_unless_told_otherwise():
    """One fused kernel over all tensors (much faster for a LoRA's many small tensors), same steps."""
    fused_model, plain_model = tiny_model(), tiny_model()
    _, logged, fused = build_optimizer(parse("--learning_rate", "1e-2"), fused_model.parameters())
    assert fused.defaults["fused"] is True and logged == ""  # an implementation detail, not in ss_optimizer
    _, logged, plain = build_optimizer(parse("--learning_rate", "1e-2", "--optimizer_args", "foreach=False"),
                                       plain_model.parameters())
    assert not plain.defaults.get("fused") and logged == "foreach=False"
    for _ in range(3):
        train_step(fused_model, fused)
        train_step(plain_model, plain)
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
