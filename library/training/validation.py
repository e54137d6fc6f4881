"""Validation loss on the images held out by `--validation_split`.

A validation pass measures the loss of every held-out batch (at most `--max_validation_steps`) at
fixed timesteps, `linspace(min_timestep, max_timestep, 6)[1:-1]` (200/400/600/800 by default), with
noise drawn from generators seeded by `--validation_seed` (else `--seed`) and the batch index, and
the same captions and crops every time: two passes differ only because the weights did. Trained
modules run in eval mode (no dropout) and without gradients.

Passes run every `--validate_every_n_steps` steps and at the end of every
`--validate_every_n_epochs` epochs (every epoch when that flag is not given, as in sd-scripts).
The loss is logged as `loss/validation/{step,epoch}_average`, and its distance to the training
loss as `loss/validation/{step,epoch}_divergence` (validation minus training average).
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

from library.training.run import step_generator
from library.training.step_loss import micro_step_loss

logger = logging.getLogger(__name__)

POINTS = 6  # linspace points; the two ends are dropped


def validation_timesteps(min_timestep: Optional[int], max_timestep: Optional[int], num_train_timesteps: int = 1000) -> List[int]:
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    return [int(t) for t in torch.linspace(low, high, POINTS)[1:-1].tolist()]


class Validator:
    """Runs validation passes for one training run over its held-out dataset."""

    def __init__(self, run, dataset, task):
        args = run.args
        self.run = run
        self.dataset = dataset
        self.task = task
        self.every_n_steps = args.validate_every_n_steps
        self.every_n_epochs = args.validate_every_n_epochs
        self.max_batches = args.max_validation_steps
        self.seed = args.validation_seed if args.validation_seed is not None else run.seed
        self.timesteps = validation_timesteps(args.min_timestep, args.max_timestep)

    @classmethod
    def from_run(cls, run, task) -> Optional["Validator"]:
        dataset = run.extra.get("validation_dataset")
        if dataset is None or len(dataset) == 0:
            return None
        return cls(run, dataset, task)

    def step_due(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def epoch_due(self, epoch: int) -> bool:
        if self.every_n_epochs is None:
            return True
        return self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0

    def batches(self) -> list:
        """This process's share of the held-out batches, with their index (the noise seed)."""
        batches = self.dataset.epoch_batches(1)
        count = len(batches) if not self.max_batches else min(self.max_batches, len(batches))
        rank, processes = self.run.accelerator.process_index, self.run.num_processes
        return [(i, batches[i]) for i in range(rank, count, processes)]

    def loss(self) -> float:
        """The mean validation loss over every held-out batch and timestep, all processes together."""
        from library.generation.sampling import eval_mode

        run, task = self.run, self.task
        total = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss sum, count
        modules = [run.models.unet, *run.models.text_encoders, *task.sampling_networks()]
        with torch.no_grad(), eval_mode(modules):
            for index, batch in self.batches():
                loaded = self.dataset.load_batch(batch, 1, 0)
                size = len(batch.items)
                for t in self.timesteps:
                    generator = step_generator(self.seed, 0, index, run.device)
                    timesteps = torch.full((size,), t, dtype=torch.long, device=run.device)
                    total[0] += float(micro_step_loss(run, task, loaded, generator, timesteps))
                    total[1] += 1
        if run.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] else float("nan")
