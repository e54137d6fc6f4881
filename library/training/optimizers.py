"""Optimizers chosen by sd-scripts' flags (`--optimizer_type`, `--optimizer_args`, legacy aliases).

`add_optimizer_arguments` adds sd-scripts' optimizer flags (the scheduler flags join their group from
`library.training.lr_schedulers`) with their names and defaults; `build_optimizer` turns them into an optimizer plus the `ss_optimizer` metadata pieces;
`optimizer_train_mode` / `optimizer_eval_mode` switch schedule-free optimizers around training,
sampling and saving. Schedulers live in `library.training.lr_schedulers`.

Deliberate differences from sd-scripts (documented in docs/optimizers.md):
* bitsandbytes optimizers fall back to their 32-bit torch/lion-pytorch equivalent, with one
  warning, when bitsandbytes is missing or there is no CUDA device (sd-scripts crashes);
* with D-Adaptation/Prodigy, different non-zero group lrs are set to the first group's lr, which
  is what sd-scripts' warning promises (the optimizers themselves raise at the first step);
* `--optimizer_args lr=...` overrides `--learning_rate` instead of failing with a duplicate argument.

Only the standard library is imported at module level so that `--help` stays instant.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerChoice:
    name: str  # canonical --optimizer_type spelling
    module: str
    cls: str
    package: str  # pip package to suggest when the import fails
    fixed: Tuple[Tuple[str, Any], ...] = ()  # always passed, not logged (as sd-scripts does with nesterov)
    defaults: Tuple[Tuple[str, Any], ...] = ()  # used unless --optimizer_args sets them; logged
    fallback: Optional[str] = None  # 32-bit choice when bitsandbytes cannot run here


_NESTEROV = (("nesterov", True),)
_MOMENTUM = (("momentum", 0.9),)

_CHOICES = [
    OptimizerChoice("AdamW", "torch.optim", "AdamW", "torch"),
    OptimizerChoice("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", fallback="AdamW"),
    OptimizerChoice("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", fallback="AdamW"),
    OptimizerChoice("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", "bitsandbytes", fallback="AdamW"),
    OptimizerChoice("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes", fallback="AdamW"),
    OptimizerChoice("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
    OptimizerChoice("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bitsandbytes", fallback="Lion"),
    OptimizerChoice("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", "bitsandbytes", fallback="Lion"),
    OptimizerChoice("SGDNesterov", "torch.optim", "SGD", "torch", _NESTEROV, _MOMENTUM),
    OptimizerChoice("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", "bitsandbytes", _NESTEROV, _MOMENTUM,
                    fallback="SGDNesterov"),
    OptimizerChoice("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    OptimizerChoice("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    OptimizerChoice("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
    OptimizerChoice("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
    OptimizerChoice("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
    OptimizerChoice("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    OptimizerChoice("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
    OptimizerChoice("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
    OptimizerChoice("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    OptimizerChoice("Adafactor", "transformers.optimization", "Adafactor", "transformers"),
    OptimizerChoice("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree"),
    OptimizerChoice("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
    OptimizerChoice("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree"),
]
OPTIMIZERS = {c.name.lower(): c for c in _CHOICES}
OPTIMIZER_TYPES = tuple(c.name for c in _CHOICES)


# ---------------------------------------------------------------------------------------------
# flags


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """sd-scripts' optimizer flags (names, types and defaults as sd-scripts); returns their group, which
    `lr_schedulers.add_lr_scheduler_arguments` fills with the scheduler flags."""
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer_type", type=str, default="",
                   help="optimizer (default AdamW): " + ", ".join(OPTIMIZER_TYPES)
                   + ", any torch.optim class name, or module.Class")
    g.add_argument("--use_8bit_adam", action="store_true", help="legacy alias of --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="legacy alias of --optimizer_type Lion")
    g.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 = no clipping")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                   help='optimizer keyword arguments as k=v Python literals, e.g. weight_decay=0.01 "betas=0.9,0.999"')
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="step each parameter during the backward pass to save memory (Adafactor, sdxl_train)")
    return g


# Learning-rate flags of the trainers (those a script lacks are skipped); 0 is meaningful (frozen part).
LEARNING_RATE_FLAGS = ("learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_te", "learning_rate_te1",
                       "learning_rate_te2")


def check_learning_rates(args: argparse.Namespace) -> None:
    """A negative (or NaN) learning rate is a one-line error naming its flag, before any work."""
    for name in LEARNING_RATE_FLAGS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not v >= 0:
                raise UserError(f"--{name} {v}: a learning rate must be 0 or more (e.g. 1e-4)")


def parse_kv_args(items: Any, flag: str) -> dict:
    """`["k=v", ...]` → `{k: ast.literal_eval(v)}`; a value that is not a Python literal is an error (never eval'd)."""
    import ast

    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    parsed = {}
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{flag}: {item!r} is not key=value (e.g. weight_decay=0.01)")
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise UserError(
                f"{flag}: the value of {key!r} ({text!r}) is not a Python literal; "
                f'numbers, True/False/None, tuples like 0.9,0.999 and quoted strings like {key}="text" are accepted'
            ) from None
    return parsed


def resolve_optimizer_type(args: argparse.Namespace) -> str:
    """`--optimizer_type` after the legacy aliases; "" ⇒ "AdamW"."""
    optimizer_type = (getattr(args, "optimizer_type", None) or "").strip()
    use_8bit_adam = getattr(args, "use_8bit_adam", False)
    use_lion = getattr(args, "use_lion_optimizer", False)
    if use_8bit_adam and use_lion:
        raise UserError("--use_8bit_adam and --use_lion_optimizer contradict each other; use --optimizer_type")
    for flag, enabled, alias in (("--use_8bit_adam", use_8bit_adam, "AdamW8bit"),
                                 ("--use_lion_optimizer", use_lion, "Lion")):
        if enabled:
            if optimizer_type:
                raise UserError(f"{flag} and --optimizer_type {optimizer_type} are both given; keep only --optimizer_type")
            return alias
    return optimizer_type or "AdamW"


# ---------------------------------------------------------------------------------------------
# construction


def build_optimizer(args: argparse.Namespace, param_groups: Iterable) -> Tuple[str, str, Any]:
    """(`module.Class` for ss_optimizer, "k=v,…" of the logged arguments, optimizer).

    `param_groups` is an iterable of tensors or of param-group dicts. For Adafactor with
    relative_step=True this follows sd-scripts and changes `args`: `learning_rate` (and `unet_lr`/
    `text_encoder_lr` when group lrs were given) become None and `lr_scheduler` becomes
    "adafactor:<lr>", which `build_lr_scheduler` turns into transformers' AdafactorSchedule.
    """
    type_name = resolve_optimizer_type(args)
    kwargs = parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    _check_fused_backward_pass(args, type_name)
    params = _as_param_list(param_groups)
    lr = getattr(args, "learning_rate", None)

    choice = OPTIMIZERS.get(type_name.lower())
    if choice is None:
        cls = _custom_optimizer_class(type_name)
        fixed: dict = {}
    else:
        choice = _usable_choice(choice, kwargs)
        for key, value in choice.defaults:
            kwargs.setdefault(key, value)
        cls = _import_choice(choice, type_name)
        fixed = dict(choice.fixed)
        if choice.name == "Adafactor":
            lr = _prepare_adafactor(args, params, kwargs, lr)
        elif choice.name.startswith("DAdapt") or choice.name == "Prodigy":
            _check_adaptive_lrs(choice.name, params, lr)
        if choice.name == "AdamW" and not {"fused", "foreach"} & kwargs.keys() and _fusable(params):
            # one kernel over every tensor: a LoRA has hundreds of small ones, where the default
            # per-tensor (foreach) step costs about 3x as much on CPU
            fixed["fused"] = True

    logger.info(f"optimizer {cls.__module__}.{cls.__name__} | {kwargs}")
    optimizer = _construct(cls, type_name, params, lr, fixed, kwargs)
    if is_schedule_free(optimizer):
        optimizer.train()  # schedule-free optimizers refuse to step until put in train mode
    optimizer_name = f"{cls.__module__}.{cls.__name__}"
    optimizer_args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return optimizer_name, optimizer_args, optimizer


def optimizer_metadata(optimizer_name: str, optimizer_args: str) -> str:
    """The `ss_optimizer` value: `module.Class` or `module.Class(k=v,…)`."""
    return f"{optimizer_name}({optimizer_args})" if optimizer_args else optimizer_name


def _as_param_list(param_groups: Iterable) -> List:
    params = list(param_groups)
    if not params:
        raise UserError("nothing to train: the optimizer got no parameters (check which parts have a learning rate > 0)")
    return params


def _check_fused_backward_pass(args: argparse.Namespace, type_name: str) -> None:
    if not getattr(args, "fused_backward_pass", False):
        return
    if type_name.lower() != "adafactor":
        raise UserError(f"--fused_backward_pass works only with --optimizer_type Adafactor, not {type_name}")
    if (getattr(args, "gradient_accumulation_steps", 1) or 1) != 1:
        raise UserError("--fused_backward_pass needs --gradient_accumulation_steps 1")


def _bitsandbytes_problem() -> Optional[str]:
    """Why bitsandbytes optimizers cannot run here, or None when they can."""
    import torch

    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # a broken install raises more than ImportError
        return "bitsandbytes is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _usable_choice(choice: OptimizerChoice, kwargs: dict) -> OptimizerChoice:
    """`choice`, or its 32-bit fallback (one warning; kwargs the fallback lacks are dropped)."""
    if choice.fallback is None:
        return choice
    problem = _bitsandbytes_problem()
    if problem is None:
        return choice
    fallback = OPTIMIZERS[choice.fallback.lower()]
    cls = _import_choice(fallback, choice.fallback)
    accepted = inspect.signature(cls.__init__).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    dropped = [k for k in kwargs if k not in accepted and not has_var_kw]
    for key in dropped:
        del kwargs[key]
    note = f"; ignoring --optimizer_args {', '.join(dropped)}" if dropped else ""
    logger.warning(
        f"--optimizer_type {choice.name} needs bitsandbytes on a CUDA device ({problem}): "
        f"using {cls.__module__}.{cls.__name__} (32-bit) instead{note}"
    )
    return fallback


def _import_choice(choice: OptimizerChoice, type_name: str):
    try:
        module = importlib.import_module(choice.module)
    except ImportError as e:
        raise UserError(
            f"--optimizer_type {type_name} needs the {choice.package} package ({e}); install it with "
            f"pip install -r requirements.txt"
        ) from None
    return getattr(module, choice.cls)


def _custom_optimizer_class(type_name: str):
    """`Name` ⇒ torch.optim.Name (case-insensitive); `module.Class` ⇒ that class."""
    import torch

    module_name, _, class_name = type_name.rpartition(".")
    if module_name:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--optimizer_type {type_name}: cannot import {module_name} ({e})") from None
    else:
        module = torch.optim
    cls = getattr(module, class_name, None)
    if cls is None:
        by_lower = {n.lower(): n for n in dir(module) if isinstance(getattr(module, n, None), type)}
        if class_name.lower() in by_lower:
            cls = getattr(module, by_lower[class_name.lower()])
    if not isinstance(cls, type):
        known = list(OPTIMIZER_TYPES) + ([n for n in dir(torch.optim) if n[:1].isupper()] if not module_name else [])
        close = difflib.get_close_matches(type_name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"--optimizer_type {type_name}: unknown optimizer{hint}")
    return cls


def _prepare_adafactor(args: argparse.Namespace, params: list, kwargs: dict, lr: Optional[float]) -> Optional[float]:
    """sd-scripts' Adafactor rules; returns the lr to pass (None with relative_step)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.warning("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if lr is None:
            raise UserError("Adafactor with relative_step=False needs --learning_rate")
        hints = []
        if getattr(args, "max_grad_norm", 0.0):
            hints.append("--max_grad_norm 0")
        if getattr(args, "lr_scheduler", "constant") != "constant_with_warmup":
            hints.append("--lr_scheduler constant_with_warmup")
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            hints.append("clip_threshold=1.0")
        if hints:
            logger.info(f"Adafactor with a fixed lr usually works best with {', '.join(hints)}")
        return lr

    group_lrs = [g.pop("lr") for g in params if isinstance(g, dict) and "lr" in g]
    ignored = "--learning_rate" + (" and the per-part learning rates" if group_lrs else "")
    scheduler = getattr(args, "lr_scheduler", "constant") or "constant"
    replaced = "" if scheduler.startswith("adafactor") else f", --lr_scheduler {scheduler}"
    logger.warning(
        f"Adafactor relative_step=True computes its own learning rate: {ignored}{replaced} ignored "
        f"(AdafactorSchedule logs {lr} until the first step); use --optimizer_args relative_step=False for a fixed lr"
    )
    args.learning_rate = None
    if group_lrs:
        for name in ("unet_lr", "text_encoder_lr"):
            if hasattr(args, name):
                setattr(args, name, None)
    args.lr_scheduler = f"adafactor:{lr}"
    return None


def _check_adaptive_lrs(type_name: str, params: list, lr: Optional[float]) -> None:
    """D-Adaptation/Prodigy want lr ≈ 1 and one lr for all groups (0 = frozen is allowed)."""
    groups = [g for g in params if isinstance(g, dict)]
    first = groups[0].get("lr", lr) if groups else lr
    if first is not None and first <= 0.1:
        logger.warning(f"{type_name}: learning rate {first} is low; this optimizer expects about 1.0 (e.g. --learning_rate 1)")
    lrs = {g.get("lr", lr) for g in groups} - {0, 0.0}
    if len(lrs) > 1:
        logger.warning(f"{type_name} supports one learning rate: every group now uses the first group's lr {first}")
        for g in groups:
            if g.get("lr", lr) != 0:
                g["lr"] = first


def _fusable(params: list) -> bool:
    """Every tensor floating-point on a device torch's fused AdamW kernel supports."""
    for group in params:
        if isinstance(group, dict):
            group["params"] = list(group["params"])
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


def _construct(cls, type_name: str, params: list, lr: Optional[float], fixed: dict, kwargs: dict):
    call = dict(fixed)
    if lr is not None:
        call["lr"] = lr
    call.update(kwargs)  # --optimizer_args win, including lr
    try:
        return cls(params, **call)
    except (TypeError, ValueError) as e:
        raise UserError(f"--optimizer_type {type_name} with --optimizer_args {kwargs}: {e}") from None


# ---------------------------------------------------------------------------------------------
# schedule-free and adaptive optimizers during training


def _unwrap(optimizer):
    """The real optimizer inside accelerate's (or any) `.optimizer` wrapper."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        inner = getattr(optimizer, "optimizer")
        if inner is optimizer or inner is None:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def is_schedule_free(optimizer) -> bool:
    """True for schedule-free optimizers (class name ends in ScheduleFree), wrapped or not."""
    inner = _unwrap(optimizer)
    return type(inner).__name__.lower().endswith("schedulefree") and callable(getattr(inner, "train", None))


def optimizer_train_mode(optimizer) -> None:
    """Call before training steps: schedule-free optimizers switch their weights to the training point."""
    if is_schedule_free(optimizer):
        optimizer.train()


def optimizer_eval_mode(optimizer) -> None:
    """Call before sampling, validation and saving: schedule-free weights move to the averaged point."""
    if is_schedule_free(optimizer):
        optimizer.eval()


def adaptive_lrs(optimizer) -> Optional[List[float]]:
    """`d·lr` of every group for D-Adaptation/Prodigy (sd-scripts logs them as lr/d*lr/<group>), else None."""
    groups = _unwrap(optimizer).param_groups
    if not groups or "d" not in groups[0]:
        return None
    return [float(g["d"]) * float(g["lr"]) for g in groups]
