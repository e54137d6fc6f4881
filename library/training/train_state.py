"""Saving and restoring the training state for `--save_state` / `--resume`.

A state folder holds what the run cannot recompute: the trainable weights, the optimizer and
scheduler states, and the position (`train_state.json`: epoch, step, micro-batch). Everything random
in a step is derived from (seed, step), and the batch order from (seed, epoch), so these are enough
for a resumed run to continue exactly as an uninterrupted one would. The folder is written beside
its final name and renamed into place, so a kill during a save leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict

import torch

from library.models import safetensors_io
from library.errors import UserError

STATE_FILE = "train_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


@dataclass
class Position:
    epoch: int = 0  # finished epochs
    step: int = 0  # finished optimizer steps
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    seed: int = 0

    # sd-scripts' train_state.json keys, kept for tools that read them
    def to_json(self) -> dict:
        data = asdict(self)
        data.update(current_epoch=self.epoch, current_step=self.step)
        return data


def save_state(
    folder: str,
    trainable: Dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: Position,
    extra: Dict[str, object] | None = None,
) -> None:
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", suffix=".tmp", dir=parent)
    try:
        safetensors_io.save_tensors(
            {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, os.path.join(tmp, WEIGHTS_FILE)
        )
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict() if scheduler is not None else {}, os.path.join(tmp, SCHEDULER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({**position.to_json(), **(extra or {})}, f, indent=2)
        old = None
        if os.path.exists(folder):
            old = folder + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(folder: str) -> tuple:
    """(the state's JSON data, its Position)."""
    state_json = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_json):
        raise UserError(f"--resume {folder}: not a state folder of ours (no {STATE_FILE}); pass a *-state folder")
    try:
        with open(state_json, encoding="utf-8") as f:
            data = json.load(f)
        position = Position(epoch=int(data["epoch"]), step=int(data["step"]),
                            batch_in_epoch=int(data["batch_in_epoch"]), seed=int(data.get("seed", 0)))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume {folder}: {STATE_FILE} is damaged ({e}); resume from another state folder") from None
    return data, position


def read_position(folder: str) -> Position:
    """The position a state folder records (its seed too), without reading its tensors."""
    return _read_json(folder)[1]


def load_state(folder: str) -> tuple:
    """(trainable tensors, optimizer state dict, scheduler state dict, Position, extra dict)."""
    data, position = _read_json(folder)
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"--resume {folder}: {name} is missing; the state folder is incomplete")
    trainable = safetensors_io.load_tensors(os.path.join(folder, WEIGHTS_FILE))
    try:
        optimizer = torch.load(os.path.join(folder, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        scheduler = torch.load(os.path.join(folder, SCHEDULER_FILE), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged state
        raise UserError(f"--resume {folder}: cannot read the optimizer/scheduler state ({e})") from None
    extra = {k: v for k, v in data.items() if k not in Position().to_json()}
    return trainable, optimizer, scheduler, position, extra
