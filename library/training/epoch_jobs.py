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


class _JobOrder(torch.utils.data.Sampler):
    """The current epoch's jobs, in order, handed to the workers as keys of `_LoadJob`; set anew each
    epoch, so one DataLoader (and, with persistent workers, one set of worker processes) serves them all."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class _LoadJob(torch.utils.data.Dataset):
    """Loads the batch of one job key (epoch, step, index, batch) in a worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        epoch, step, index, batch = key
        return step, index, self.dataset.load_batch(batch, epoch, step)


def epoch_loader(run, jobs: EpochJobs):
    """The jobs' loaded batches, in order: from DataLoader workers, or in this process when
    workers are off or batches may still encode latents that this process's cache must keep.

    The DataLoader is made once per run. With `--persistent_data_loader_workers` its workers live
    from the first epoch that uses them to the end of the run (as in sd-scripts); without it they
    start anew every epoch. Workers hold a copy of the dataset made when they start: in-process
    caches are complete by then (latents pending keep the loading in this process)."""
    workers = min(run.args.max_data_loader_n_workers or 0, os.cpu_count() or 1)
    if workers == 0 or latents_pending(run):  # latents encoded now must land in this process's cache
        return (jobs[i] for i in range(len(jobs)))
    loader = run.extra.get("epoch_loader")
    if loader is None:
        loader = run.extra["epoch_loader"] = torch.utils.data.DataLoader(
            _LoadJob(run.dataset), batch_size=None, sampler=_JobOrder(), num_workers=workers,
            collate_fn=_as_loaded, prefetch_factor=2,
            persistent_workers=bool(getattr(run.args, "persistent_data_loader_workers", False)))
    loader.sampler.keys = [(jobs.epoch, step, index, batch) for step, index, batch in jobs.jobs]
    return iter(loader)


def _as_loaded(item):
    return item


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
