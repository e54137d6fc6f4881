"""Training logs: loss, moving-average loss, learning rate per parameter group, epoch.

`--logging_dir` + `--log_with tensorboard|wandb|all` as in sd-scripts: runs go to
`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`. A logger whose package is missing is skipped with
one warning; training never stops for logging. `--log_tracker_config` is a TOML file of keyword
arguments per tracker (`[wandb]`, `[tensorboard]` tables, as accelerate's `init_trackers(init_kwargs=...)`
takes them in sd-scripts), passed to `wandb.init` and tensorboard's `SummaryWriter`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Dict

from library.errors import UserError

logger = logging.getLogger(__name__)

AVERAGE_WINDOW = 100  # steps in the moving average shown on the progress bar
TRACKERS = ("tensorboard", "wandb")


def tracker_init_kwargs(path: str) -> Dict[str, dict]:
    """`--log_tracker_config`: {tracker: init keyword arguments} from a TOML file, checked."""
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--log_tracker_config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"--log_tracker_config {path}: not a readable TOML file ({e})") from None
    for name, value in table.items():
        if name not in TRACKERS or not isinstance(value, dict):
            raise UserError(f"--log_tracker_config {path}: [{name}] is not a tracker table; use "
                            + " / ".join(f"[{t}]" for t in TRACKERS) + " with keyword arguments for that tracker")
    return table


class TrainLogger:
    def __init__(self, run):
        self.run = run
        self.window = deque(maxlen=AVERAGE_WINDOW)
        self.epoch_losses = []
        self.writers = []
        args = run.args
        if not run.is_main or not args.log_with:
            return
        if not args.logging_dir:
            logger.warning("--log_with %s needs --logging_dir; not logging", args.log_with)
            return
        name = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
        folder = os.path.join(args.logging_dir, name)
        init = tracker_init_kwargs(args.log_tracker_config) if args.log_tracker_config else {}
        if args.log_with in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writers.append(("tensorboard", SummaryWriter(**{"log_dir": folder, **init.get("tensorboard", {})})))
            except ImportError:
                logger.warning("--log_with tensorboard: the tensorboard package is not installed; not logging there")
        if args.log_with in ("wandb", "all"):
            try:
                import wandb

                if args.wandb_api_key:
                    wandb.login(key=args.wandb_api_key)
                wandb.init(**{"project": args.log_tracker_name or "network_train", "name": args.wandb_run_name,
                              "dir": folder, "config": vars(args) if args.log_config else None, **init.get("wandb", {})})
                self.writers.append(("wandb", wandb))
            except ImportError:
                logger.warning("--log_with wandb: the wandb package is not installed (pip install wandb); not logging there")

    def _write(self, values: Dict[str, float], step: int) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
            else:
                writer.log(values, step=step)

    def step(self, step: int, epoch: int, loss: float, extra: Dict[str, float]) -> float:
        self.window.append(loss)
        self.epoch_losses.append(loss)
        average = sum(self.window) / len(self.window)
        if self.writers:
            values = {"loss/current": loss, "loss/average": average, "epoch": epoch}
            descriptions = self.run.extra.get("group_descriptions") or []
            for i, group in enumerate(self.run.optimizer.param_groups):
                name = descriptions[i] if i < len(descriptions) else f"group{i}"
                values[f"lr/{name}"] = group["lr"]
            values.update(extra)
            self._write(values, step)
        return average

    def validation(self, kind: str, index: int, loss: float) -> None:
        """A validation pass's loss after step or epoch `index`; divergence is its distance to the
        training loss (the moving average for steps, the epoch's mean for epochs)."""
        losses = self.window if kind == "step" else self.epoch_losses
        train = sum(losses) / len(losses) if losses else float("nan")
        logger.info("validation loss after %s %d: %.5f (training %.5f)", kind, index, loss, train)
        if self.writers:
            self._write({f"loss/validation/{kind}_average": loss,
                         f"loss/validation/{kind}_divergence": loss - train}, index)

    def epoch_end(self, epoch: int) -> None:
        if self.writers and self.epoch_losses:
            self._write({"loss/epoch": sum(self.epoch_losses) / len(self.epoch_losses)}, epoch)
        self.epoch_losses = []

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            else:
                writer.finish()
