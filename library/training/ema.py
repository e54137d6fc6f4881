"""Exponential moving average (EMA) of the trained weights, for every trainer (full models, LoRA, ...).

With `--ema_decay d` the loop keeps a float32 shadow copy `s` of every parameter the optimizer
trains and, every `--ema_update_every` optimizer steps, moves it towards the live weights `w`:

    s ← d_n · s + (1 − d_n) · w,    d_n = d                        (default)
                                    d_n = min(d, (1 + n) / (10 + n))  (--ema_warmup)

where n is the number of EMA updates made before this one. The warm-up keeps the first updates
from being dominated by the starting weights (0.1, 0.18, 0.25, ... until it reaches d).

`--save_ema` saves the EMA weights instead of the raw ones (every save: step, epoch and final),
`--sample_ema` renders sample images with them. Both use `EMA.swap()`, which puts the EMA values
into the live parameters and restores the raw ones afterwards, so training continues unaffected.
State folders (`--save_state`) hold the raw weights plus the shadow copies and the update count,
so `--resume` continues the average exactly. `--ema_on_cpu` keeps the shadow in CPU memory (it costs
one float32 copy of the trained weights), at the price of a device-to-host copy per update.

Only the standard library is imported at module level: argument parsers import this module.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
from typing import Dict, Optional, Tuple

from library.errors import UserError

logger = logging.getLogger(__name__)

STATE_PREFIX = "__ema__."
_UPDATES_KEY = STATE_PREFIX + "num_updates"
_SHADOW_KEY = re.compile(re.escape(STATE_PREFIX) + r"(\d+)$")
WARMUP_OFFSET = 10  # d_n = (1 + n) / (WARMUP_OFFSET + n) during --ema_warmup


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("EMA of the trained weights (see docs/full-training.md)")
    g.add_argument("--ema_decay", type=float, default=None,
                   help="keep an exponential moving average of the trained weights with this decay per update, "
                   "e.g. 0.999 (off when unset)")
    g.add_argument("--ema_update_every", type=int, default=1, help="update the EMA every N optimizer steps")
    g.add_argument("--ema_warmup", action="store_true",
                   help="ramp the decay up as min(decay, (1+n)/(10+n)) over the first updates n")
    g.add_argument("--ema_on_cpu", action="store_true", help="hold the EMA copy in CPU memory, not on the accelerator")
    g.add_argument("--save_ema", action="store_true", help="saved models / networks hold the EMA weights")
    g.add_argument("--sample_ema", action="store_true", help="sample images are made with the EMA weights")


def check_ema_args(args) -> None:
    """UserError for EMA flags that cannot work together."""
    decay = getattr(args, "ema_decay", None)
    if decay is None:
        used = [f"--{name}" for name in ("save_ema", "sample_ema", "ema_warmup", "ema_on_cpu") if getattr(args, name, False)]
        if used:
            raise UserError(f"{', '.join(used)} needs --ema_decay (e.g. --ema_decay 0.999)")
        return
    if not 0.0 < decay < 1.0:
        raise UserError(f"--ema_decay {decay}: must be between 0 and 1 (exclusive), e.g. 0.999")
    every = getattr(args, "ema_update_every", 1)
    if every is None or every < 1:
        raise UserError(f"--ema_update_every {every}: must be 1 or more")


def decay_at(decay: float, updates_done: int, warmup: bool) -> float:
    """The decay used by the update that follows `updates_done` earlier ones."""
    if not warmup:
        return decay
    return min(decay, (1.0 + updates_done) / (WARMUP_OFFSET + updates_done))


class EMA:
    """Shadow float32 copies of `params`, updated with `update(step)` after optimizer steps."""

    def __init__(self, params, decay: float, update_every: int = 1, warmup: bool = False, on_cpu: bool = False):
        import torch

        self.params = list(params)
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.warmup = bool(warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = [self._fresh_copy(p, on_cpu) for p in self.params]

    @staticmethod
    def _fresh_copy(param, on_cpu: bool):
        import torch

        device = torch.device("cpu") if on_cpu else param.device
        return param.detach().to(device=device, dtype=torch.float32, copy=True)

    @classmethod
    def from_args(cls, args, params) -> Optional["EMA"]:
        """An EMA of `params` as the flags ask, or None without --ema_decay."""
        check_ema_args(args)
        if getattr(args, "ema_decay", None) is None:
            return None
        ema = cls(params, args.ema_decay, getattr(args, "ema_update_every", 1) or 1,
                  getattr(args, "ema_warmup", False), getattr(args, "ema_on_cpu", False))
        where = ", on CPU" if getattr(args, "ema_on_cpu", False) else ""
        logger.info("EMA of %d trained tensors: decay %s every %d step(s)%s%s", len(ema.params), ema.decay,
                    ema.update_every, ", warm-up" if ema.warmup else "", where)
        return ema

    # --- training -----------------------------------------------------------------------------

    def update(self, step: int) -> bool:
        """Call after the optimizer step that finished `step` (1-based); True when the EMA moved."""
        import torch

        if step % self.update_every:
            return False
        weight = 1.0 - decay_at(self.decay, self.num_updates, self.warmup)
        with torch.no_grad():
            same, cross = [], []
            for s, p in zip(self.shadow, self.params):
                (same if s.device == p.device and p.dtype == s.dtype else cross).append((s, p))
            if same:
                torch._foreach_lerp_([s for s, _ in same], [p.detach() for _, p in same], weight)
            for s, p in cross:  # one tensor at a time: no second full copy of the weights
                s.lerp_(p.detach().to(s.device, s.dtype), weight)
        self.num_updates += 1
        return True

    @contextlib.contextmanager
    def swap(self):
        """Within the block the parameters hold the EMA weights; the raw ones come back after.

        Same-dtype parameters exchange values with their shadow one tensor at a time (no extra full
        copy); half-precision ones (--full_fp16/bf16) keep a backup so the float32 EMA stays exact.
        """
        import torch

        backups: Dict[int, object] = {}
        with torch.no_grad():
            for i, (s, p) in enumerate(zip(self.shadow, self.params)):
                if p.dtype == s.dtype:
                    raw = p.detach().to(s.device, copy=True)
                    p.copy_(s)
                    s.copy_(raw)
                else:
                    backups[i] = p.detach().clone()
                    p.copy_(s)
        try:
            yield self
        finally:
            with torch.no_grad():
                for i, (s, p) in enumerate(zip(self.shadow, self.params)):
                    if i in backups:
                        p.copy_(backups.pop(i))
                    else:
                        ema = p.detach().to(s.device, copy=True)
                        p.copy_(s)
                        s.copy_(ema)

    # --- state folders ------------------------------------------------------------------------

    def state_tensors(self) -> Dict[str, object]:
        """Tensors for a state folder (stored beside the task's under the `__ema__.` prefix)."""
        import torch

        out: Dict[str, object] = {f"{STATE_PREFIX}{i:05d}": s for i, s in enumerate(self.shadow)}
        out[_UPDATES_KEY] = torch.tensor([self.num_updates], dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: Dict[str, object], where: str) -> None:
        """Restore from `state_tensors()` output; with none (a state saved without EMA) the
        average restarts from the current weights."""
        import torch

        if not tensors:
            logger.warning("%s holds no EMA; the EMA starts from the resumed weights", where)
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    s.copy_(p.detach())
            self.num_updates = 0
            return
        shadows = {int(m.group(1)): v for k, v in tensors.items() if (m := _SHADOW_KEY.match(k))}
        if sorted(shadows) != list(range(len(self.shadow))):
            raise UserError(f"{where}: its EMA has {len(shadows)} tensors but this run trains {len(self.shadow)}; "
                            "resume with the same training settings (or without --ema_decay)")
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                if tuple(shadows[i].shape) != tuple(s.shape):
                    raise UserError(f"{where}: EMA tensor {i} has shape {tuple(shadows[i].shape)}, this run's is "
                                    f"{tuple(s.shape)}; resume with the same training settings")
                s.copy_(shadows[i].to(s.device, s.dtype))
        self.num_updates = int(tensors[_UPDATES_KEY].reshape(-1)[0]) if _UPDATES_KEY in tensors else 0


def split_state(tensors: Dict[str, object]) -> Tuple[Dict[str, object], Dict[str, object]]:
    """(EMA tensors, the task's tensors) of a state folder's trainable tensors."""
    ema = {k: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    rest = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    return ema, rest


def weights(ema: Optional[EMA], wanted: bool):
    """A context with the EMA weights in place when `wanted` and an EMA exists; else does nothing."""
    if ema is not None and wanted:
        return ema.swap()
    return contextlib.nullcontext()

