"""When to save during training, what the files are called, and which old ones to prune.

Names and rules follow sd-scripts so existing scripts that pick up `<name>-000004.safetensors` or
`<name>-step00000100-state` keep working:

* epoch saves `<name>-<epoch:06d><ext>`, step saves `<name>-step<step:08d><ext>`, the final `<name><ext>`;
* states `<name>-<epoch:06d>-state`, `<name>-step<step:08d>-state`, `<name>-state`;
* the output folder is checked before any model loads (`prepare_output_dir`: a folder we can write
  in), and temporary files a killed run left there are cleaned up;
* an epoch save happens when `epoch % every == 0` and it is not the last epoch (that one is the final
  file); `--save_last_n_epochs K` removes the save `every × K` epochs back, `--save_last_n_steps K`
  the step save `K` steps back (rounded down to a multiple of `every`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Optional


logger = logging.getLogger(__name__)


def epoch_name(name: str, epoch: int, ext: str) -> str:
    return f"{name}-{epoch:06d}{ext}"


def step_name(name: str, step: int, ext: str) -> str:
    return f"{name}-step{step:08d}{ext}"


def final_name(name: str, ext: str) -> str:
    return f"{name}{ext}"


def epoch_state_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}-state"


def step_state_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}-state"


def final_state_name(name: str) -> str:
    return f"{name}-state"


@dataclass
class SavePolicy:
    output_dir: str
    name: str
    ext: str
    every_n_epochs: Optional[int] = None
    every_n_steps: Optional[int] = None
    keep_last_n_epochs: Optional[int] = None
    keep_last_n_epochs_state: Optional[int] = None
    keep_last_n_steps: Optional[int] = None
    keep_last_n_steps_state: Optional[int] = None
    save_state: bool = False

    @classmethod
    def from_args(cls, args, ext: str, num_epochs: int) -> "SavePolicy":
        every_epochs = args.save_every_n_epochs
        if getattr(args, "save_n_epoch_ratio", None):
            every_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
        return cls(
            output_dir=args.output_dir, name=args.output_name or "last", ext=ext,
            every_n_epochs=every_epochs, every_n_steps=args.save_every_n_steps,
            keep_last_n_epochs=args.save_last_n_epochs, keep_last_n_epochs_state=args.save_last_n_epochs_state,
            keep_last_n_steps=args.save_last_n_steps, keep_last_n_steps_state=args.save_last_n_steps_state,
            save_state=args.save_state,
        )

    def path(self, filename: str) -> str:
        return os.path.join(self.output_dir, filename)

    def epoch_due(self, epoch: int, num_epochs: int) -> bool:
        """`epoch` is 1-based and finished; the last epoch is saved as the final file instead."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < num_epochs

    def step_due(self, step: int, max_steps: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and step < max_steps

    def epoch_to_remove(self, epoch: int, keep: Optional[int]) -> Optional[int]:
        if not keep or not self.every_n_epochs:
            return None
        old = epoch - self.every_n_epochs * keep
        return old if old > 0 else None

    def step_to_remove(self, step: int, keep: Optional[int]) -> Optional[int]:
        if not keep or not self.every_n_steps:
            return None
        old = step - keep - 1
        old -= old % self.every_n_steps
        return old if old > 0 else None

    def prune_after_epoch(self, epoch: int) -> None:
        old = self.epoch_to_remove(epoch, self.keep_last_n_epochs)
        if old is not None:
            remove(self.path(epoch_name(self.name, old, self.ext)))
        old = self.epoch_to_remove(epoch, self.keep_last_n_epochs_state or self.keep_last_n_epochs)
        if old is not None:
            remove(self.path(epoch_state_name(self.name, old)))

    def prune_after_step(self, step: int) -> None:
        old = self.step_to_remove(step, self.keep_last_n_steps)
        if old is not None:
            remove(self.path(step_name(self.name, old, self.ext)))
        old = self.step_to_remove(step, self.keep_last_n_steps_state or self.keep_last_n_steps)
        if old is not None:
            remove(self.path(step_state_name(self.name, old)))


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
        logger.info("removed old %s", path)
    elif os.path.exists(path):
        os.remove(path)
        logger.info("removed old %s", path)


def prepare_output_dir(output_dir: str, name: str) -> None:
    """Create `--output_dir` and prove it writable, before any work is done; then clean what an interrupted
    run left there (library/models/atomic_writes.py)."""
    from library.models.atomic_writes import check_writable_folder, remove_leftovers

    check_writable_folder(output_dir, "--output_dir")
    remove_leftovers(output_dir, name)
