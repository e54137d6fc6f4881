"""Learning-rate schedulers chosen by sd-scripts' flags (`--lr_scheduler`, `--lr_warmup_steps`, ...).

`build_lr_scheduler` reproduces sd-scripts' `get_scheduler_fix`: the transformers schedule functions
(plus Diffusers' `piecewise_constant`), transformers' `AdafactorSchedule` for relative-step
Adafactor, a constant placeholder for schedule-free optimizers, and any `torch.optim.lr_scheduler`
or dotted class via `--lr_scheduler_type`. Every scheduler returned has `step()`, `get_last_lr()`,
`state_dict()` and `load_state_dict()`, so training state can be saved and resumed.

Step counts follow sd-scripts: `T = max_train_steps × num_processes`, because accelerate steps the
scheduler once per process for every optimizer step. Warmup and decay lengths are a whole number
of scheduler steps, or a fraction of T written as a number below 1 or as "N%". sd-scripts rejects
"1.5"; we reject it too, but with a message saying what the two accepted forms are, and we accept
whole numbers written as floats ("100.0" = 100 steps).

Only the standard library is imported at module level: argument parsers use `steps_or_fraction`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import math
from typing import Any, Optional, Union

from library.errors import UserError
from library.training.optimizers import is_schedule_free, parse_kv_args

logger = logging.getLogger(__name__)

# Names accepted by --lr_scheduler (transformers' SchedulerType values we can drive, Diffusers'
# piecewise_constant and Adafactor's own schedule).
SCHEDULER_NAMES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)
# transformers schedulers that adapt to a metric passed to step(); the training loop never passes one.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")

StepsValue = Union[int, float]


# ---------------------------------------------------------------------------------------------
# warmup / decay lengths


def steps_or_fraction(text: str) -> StepsValue:
    """argparse type of --lr_warmup_steps/--lr_decay_steps: int steps, or a float fraction (< 1 or "N%")."""
    try:
        return _parse_steps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_steps(value: Any) -> StepsValue:
    """int (absolute steps) or float (fraction of T) from a CLI string or a config value."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of steps")
    if isinstance(value, int):
        number: float = value
    elif isinstance(value, float):
        number = value
    else:
        text = str(value).strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(f"{text!r} is not a percentage (write e.g. 5%)") from None
            if not 0 <= percent <= 100:
                raise ValueError(f"{text!r}: a percentage of the training steps must be between 0% and 100%")
            return percent / 100.0
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number of steps, a fraction below 1 or a percentage") from None
    if math.isnan(number) or number < 0:
        raise ValueError(f"{value!r}: steps must not be negative")
    if number == 0:
        return 0
    if number < 1:
        return float(number)
    if number != int(number):
        # sd-scripts rejects this too; "1.5" could mean 1 step, 2 steps or 150 %, so we ask instead of guessing
        raise ValueError(
            f"{value!r} is ambiguous: give a whole number of steps (e.g. 2), "
            f"a fraction below 1 (e.g. 0.05) or a percentage (e.g. 5%)"
        )
    return int(number)


def resolve_steps(value: Any, total_steps: int, flag: str) -> int:
    """Scheduler steps for a warmup/decay value: ints are absolute, fractions are `int(x · total_steps)`."""
    if value is None:
        return 0
    try:
        parsed = _parse_steps(value)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None
    if isinstance(parsed, float):
        return int(parsed * total_steps)
    return parsed


# ---------------------------------------------------------------------------------------------
# key=value arguments


# ---------------------------------------------------------------------------------------------
# scheduler construction


def add_lr_scheduler_arguments(group) -> None:
    """sd-scripts' lr-scheduler flags, added to the optimizer's argument group."""
    g = group
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="scheduler class instead of --lr_scheduler: torch.optim.lr_scheduler name or module.Class")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                   help="scheduler keyword arguments as k=v Python literals, e.g. T_max=100")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                   "inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant, adafactor")
    g.add_argument("--lr_warmup_steps", type=steps_or_fraction, default=0,
                   help="warmup: whole scheduler steps, or a fraction of all steps (< 1, or N%%)")
    g.add_argument("--lr_decay_steps", type=steps_or_fraction, default=0,
                   help="decay of warmup_stable_decay: whole steps, or a fraction of all steps (< 1, or N%%)")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                   help="cosine_with_restarts: number of restarts (cosine_with_min_lr/warmup_stable_decay: half waves)")
    g.add_argument("--lr_scheduler_power", type=float, default=1, help="polynomial: power")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="inverse_sqrt: timescale (default: the warmup steps)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="cosine_with_min_lr / warmup_stable_decay: minimum lr as a ratio of the initial lr")


def build_lr_scheduler(args: argparse.Namespace, optimizer, num_training_steps: int, num_processes: int = 1):
    """The scheduler sd-scripts would build for `args`.

    `num_training_steps` is `args.max_train_steps` (optimizer steps of one process); the schedule spans
    `num_training_steps × num_processes` scheduler steps, as in sd-scripts. `build_optimizer` must run
    first: for relative-step Adafactor it sets `args.lr_scheduler = "adafactor:<lr>"`.
    """
    total = int(num_training_steps) * max(1, int(num_processes))
    warmup = resolve_steps(getattr(args, "lr_warmup_steps", 0), total, "--lr_warmup_steps")
    decay = resolve_steps(getattr(args, "lr_decay_steps", 0), total, "--lr_decay_steps")
    extra = parse_kv_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    name = (getattr(args, "lr_scheduler", None) or "constant").strip().lower()

    if is_schedule_free(optimizer):
        return _schedule_free_placeholder(optimizer, warmup, name)
    if getattr(args, "lr_scheduler_type", None):
        return _custom_scheduler(args.lr_scheduler_type, optimizer, extra, warmup)
    if name.lower().startswith("adafactor"):
        return _adafactor_scheduler(name, optimizer, warmup)
    if name == "piecewise_constant":
        return _piecewise_constant(optimizer, extra, warmup)
    return _transformers_scheduler(args, name, optimizer, total, warmup, decay, extra)


def _schedule_free_placeholder(optimizer, warmup: int, name: str):
    """Schedule-free optimizers keep their own schedule; a multiplier-1 LambdaLR keeps the loop uniform."""
    from torch.optim.lr_scheduler import LambdaLR

    if warmup or name not in ("constant", ""):
        logger.warning(
            f"schedule-free optimizer: --lr_scheduler {name} and --lr_warmup_steps are ignored; "
            "for warmup use --optimizer_args warmup_steps=N"
        )
    return LambdaLR(optimizer, _constant_one)


def _constant_one(_step: int) -> float:
    # module-level (not a lambda) so that the scheduler's state_dict stays picklable
    return 1.0


def _custom_scheduler(type_name: str, optimizer, extra: dict, warmup: int):
    import torch

    if warmup:
        raise UserError(
            f"--lr_scheduler_type {type_name} does not use --lr_warmup_steps; set it to 0 "
            "(pass the class's own warmup arguments with --lr_scheduler_args)"
        )
    module_name, _, class_name = type_name.rpartition(".")
    if module_name:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--lr_scheduler_type {type_name}: cannot import {module_name} ({e})") from None
    else:
        module = torch.optim.lr_scheduler
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"--lr_scheduler_type {type_name}: {module.__name__} has no {class_name}")
    logger.info(f"lr scheduler {type_name} {extra}")
    try:
        return cls(optimizer, **extra)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler_type {type_name} with --lr_scheduler_args {extra}: {e}") from None


def _adafactor_scheduler(name: str, optimizer, warmup: int):
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(optimizer, Adafactor):
        raise UserError("--lr_scheduler adafactor works only with --optimizer_type Adafactor")
    if warmup:
        logger.warning(
            "Adafactor with relative_step=True schedules its own learning rate: --lr_warmup_steps is ignored "
            "(use --optimizer_args warmup_init=True for its built-in warmup)"
        )
    _, _, text = name.partition(":")
    try:
        initial_lr = float(text) if text and text != "None" else 0.0
    except ValueError:
        raise UserError(f"--lr_scheduler {name}: expected adafactor or adafactor:<initial lr>") from None
    return AdafactorSchedule(optimizer, initial_lr)


def _piecewise_constant(optimizer, extra: dict, warmup: int):
    from diffusers.optimization import get_piecewise_constant_schedule

    if "step_rules" not in extra:
        raise UserError(
            "--lr_scheduler piecewise_constant needs its rules: "
            "--lr_scheduler_args 'step_rules=\"1:100,0.1:200,0.01\"' (multiplier:until_step,...,final multiplier)"
        )
    if warmup:
        logger.warning("--lr_scheduler piecewise_constant ignores --lr_warmup_steps (put the warmup in step_rules)")
    try:
        return get_piecewise_constant_schedule(optimizer, **extra)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler piecewise_constant with --lr_scheduler_args {extra}: {e}") from None


def _transformers_scheduler(args, name: str, optimizer, total: int, warmup: int, decay: int, extra: dict):
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    if name in METRIC_SCHEDULERS:
        raise UserError(f"--lr_scheduler {name} needs a metric at every step, which the trainers do not provide")
    try:
        schedule_type = SchedulerType(name)
    except ValueError:
        close = difflib.get_close_matches(name, SCHEDULER_NAMES, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; choose one of {', '.join(SCHEDULER_NAMES)}"
        raise UserError(f"--lr_scheduler {name!r} is unknown{hint}") from None
    if name == "constant" and warmup:
        raise UserError("--lr_scheduler constant has no warmup; use --lr_scheduler constant_with_warmup")

    kwargs = _schedule_kwargs(args, name, total, warmup, decay, extra)
    kwargs.update(extra)  # --lr_scheduler_args win over values derived from the flags
    function = TYPE_TO_SCHEDULER_FUNCTION[schedule_type]
    try:
        return function(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler {name} with {kwargs}: {e}") from None


def _schedule_kwargs(args, name: str, total: int, warmup: int, decay: int, extra: dict) -> dict:
    """The per-name arguments of sd-scripts' get_scheduler_fix."""
    cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    cycles = 1 if cycles is None else cycles
    min_lr_ratio: Optional[float] = getattr(args, "lr_scheduler_min_lr_ratio", None)
    if name == "constant":
        return {}
    if name == "constant_with_warmup":
        return {"num_warmup_steps": warmup}
    if name == "inverse_sqrt":
        return {"num_warmup_steps": warmup, "timescale": getattr(args, "lr_scheduler_timescale", None)}
    base = {"num_warmup_steps": warmup, "num_training_steps": total}
    if name in ("linear", "cosine"):
        return base
    if name == "cosine_with_restarts":
        return {**base, "num_cycles": cycles}
    if name == "polynomial":
        power = getattr(args, "lr_scheduler_power", 1.0)
        return {**base, "power": 1.0 if power is None else power}
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        if min_lr_ratio is None and "min_lr" not in extra and "min_lr_rate" not in extra:
            raise UserError(f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        kwargs = {**base, "num_cycles": cycles / 2}
        if min_lr_ratio is not None and "min_lr" not in extra:
            kwargs["min_lr_rate"] = min_lr_ratio
        return kwargs
    if name == "warmup_stable_decay":
        stable = total - warmup - decay
        if stable < 0:
            raise UserError(
                f"--lr_scheduler warmup_stable_decay: warmup {warmup} + decay {decay} steps exceed the "
                f"{total} scheduler steps; shorten --lr_warmup_steps or --lr_decay_steps"
            )
        return {
            "num_warmup_steps": warmup,
            "num_stable_steps": stable,
            "num_decay_steps": decay,
            "num_cycles": cycles / 2,
            "min_lr_ratio": 0.0 if min_lr_ratio is None else min_lr_ratio,
        }
    return _generic_kwargs(name, base, decay)


def _generic_kwargs(name: str, base: dict, decay: int) -> dict:
    """Other transformers schedules get W, T, D — only those their function accepts."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    offered = {**base, "num_decay_steps": decay}
    params = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
    return {k: v for k, v in offered.items() if k in params}
