"""Which batches each step of an epoch trains on, and how they are loaded.

An epoch's batch order is a function of (seed, epoch) (`TrainDataset.epoch_batches`); a step owns a
fixed run of consecutive batches, split over processes and gradient-accumulation micro-batches.
So the step number alone says where a run is, and a resumed run loads exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import os

import torch

from library.caching.training_caches import latents_pending


def micro_batches(run, batches, step_in_epoch: int) -> list:
    """This process's micro-batches for one optimizer step: the step owns the consecutive
    batches [k·A·P, (k+1)·A·P) of the epoch; process p takes every P-th of them."""
    per_step = run.args.gradient_accumulation_steps * run.num_processes
    start = step_in_epoch * per_step
    own = range(start + run.accelerator.process_index, min(start + per_step, len(batches)), run.num_processes)
    return [(i - start, batches[i]) for i in own]


class EpochJobs(torch.utils.data.Dataset):
    """The micro-batches this process loads in one epoch, in order, as (step, index, batch dict).

    Loading runs in DataLoader workers (single-threaded, so small image ops do not fight the
    model's threads) while the main process trains on the previous batch."""

    def __init__(self, run, epoch: int, first_step: int, first_step_in_epoch: int):
        self.dataset = run.dataset
        self.epoch = epoch
        batches = run.dataset.epoch_batches(epoch)
        self.jobs = []
        step = first_step
        for k in range(first_step_in_epoch, run.steps_per_epoch):
            if step >= run.max_steps:
                break
            for index, batch in micro_batches(run, batches, k):
                self.jobs.append((step, index, batch))
            step += 1
        self.steps = step - first_step

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        step, index, batch = self.jobs[i]
        return step, index, self.dataset.load_batch(batch, self.epoch, step)


def epoch_loader(run, jobs: EpochJobs):
    """The jobs' loaded batches, in order: from DataLoader workers, or in this process when
    workers are off or batches may still encode latents that this process's cache must keep."""
    workers = min(run.args.max_data_loader_n_workers or 0, os.cpu_count() or 1)
    if workers == 0 or latents_pending(run):  # latents encoded now must land in this process's cache
        return (jobs[i] for i in range(len(jobs)))
    return torch.utils.data.DataLoader(jobs, batch_size=None, shuffle=False, num_workers=workers,
                                       collate_fn=lambda item: item, prefetch_factor=2)


def by_step(items):
    """Group consecutive (step, index, batch) items into (step, [(index, batch)...])."""
    current, group = None, []
    for step, index, batch in items:
        if current is not None and step != current:
            yield current, group
            group = []
        current = step
        group.append((index, batch))
    if group:
        yield current, group
