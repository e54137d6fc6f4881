"""Saving and restoring the training state for `--save_state` / `--resume`.

A state folder holds what the run cannot recompute: the trainable weights, the optimizer and
scheduler states, and the position (`train_state.json`: epoch, step, micro-batch). Everything random
in a step is derived from (seed, step), and the batch order from (seed, epoch), so these are enough
for a resumed run to continue exactly as an uninterrupted one would. The folder is written beside
its final name and swapped into place (library/models/atomic_writes.py), so a kill during a save
leaves the previous state intact, under its name; where the file system cannot swap folders, a kill
between the two renames leaves it under a hidden `.old` name, which `--resume` finds by itself.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict

import torch

from library.errors import UserError
from library.models import atomic_writes, safetensors_io

logger = logging.getLogger(__name__)

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
    with atomic_writes.atomic_folder(folder) as tmp:
        safetensors_io.save_tensors(
            {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, os.path.join(tmp, WEIGHTS_FILE)
        )
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict() if scheduler is not None else {}, os.path.join(tmp, SCHEDULER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({**position.to_json(), **(extra or {})}, f, indent=2)


_reported = set()


def resolve_state_folder(folder: str) -> str:
    """`folder`, or the copy of it a save set aside and did not put back (killed while replacing it)."""
    if os.path.isdir(folder):
        return folder
    aside = atomic_writes.find_replaced_folder(folder)
    if aside and os.path.isfile(os.path.join(aside, STATE_FILE)):
        if aside not in _reported:
            _reported.add(aside)
            logger.warning("--resume %s: not found, but %s is: the run that wrote it was stopped while replacing it; "
                           "resuming from that copy", folder, aside)
        return aside
    return folder


def _read_json(folder: str) -> tuple:
    """(the state's JSON data, its Position)."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume {folder}: no such state folder")
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
    """The position a state folder records (its seed too), after a cheap check that every file of it can be
    read (the safetensors header, the pickles memory-mapped): a damaged state stops the run at its start."""
    folder = resolve_state_folder(folder)
    position = _read_json(folder)[1]
    _check_files(folder)
    safetensors_io.read_header(os.path.join(folder, WEIGHTS_FILE))
    _read_pickle(folder, OPTIMIZER_FILE, "optimizer state", mmap=True)
    _read_pickle(folder, SCHEDULER_FILE, "scheduler state", mmap=True)
    return position


def _check_files(folder: str) -> None:
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"--resume {folder}: {name} is missing; the state folder is incomplete")


def load_state(folder: str) -> tuple:
    """(trainable tensors, optimizer state dict, scheduler state dict, Position, extra dict)."""
    folder = resolve_state_folder(folder)
    data, position = _read_json(folder)
    _check_files(folder)
    trainable = safetensors_io.load_tensors(os.path.join(folder, WEIGHTS_FILE))
    optimizer = _read_pickle(folder, OPTIMIZER_FILE, "optimizer state")
    scheduler = _read_pickle(folder, SCHEDULER_FILE, "scheduler state")
    extra = {k: v for k, v in data.items() if k not in Position().to_json()}
    return trainable, optimizer, scheduler, position, extra


def _read_pickle(folder: str, name: str, what: str, mmap: bool = False) -> dict:
    """A state's .pt file, read with weights_only; a damaged or code-carrying file is one line naming it."""
    from library.models.checkpoint_io import torch_load_safely

    path = os.path.join(folder, name)
    try:
        data = torch_load_safely(path, mmap=mmap, what=what)
    except UserError as e:
        raise UserError(f"--resume: {e}; resume from another state folder") from None
    if not isinstance(data, dict):
        raise UserError(f"--resume: {path}: not a {what} (holds a {type(data).__name__}); resume from another state folder")
    return data
