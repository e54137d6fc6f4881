"""The images of a folder, prepared in DataLoader workers and handed out in full batches.

`ImageBatches(paths, prepare, batch_size, workers)` iterates lists of `PreparedImage`. `prepare` is
a picklable `path → (payload, (w, h))` that raises `UserError` for an unreadable file; such a file is
logged with its reason, counted in `failed`, and skipped, and the batches are refilled from the
next images so every batch but the last is full (a model with a fixed batch size needs that).

`workers` None or 0 prepares in the main process (sd-scripts' default); N > 0 uses N DataLoader
worker processes, so decoding overlaps the model. A progress bar with the rate and ETA counts
images, failed ones included.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    path: str
    payload: object  # whatever `prepare` returns for the model (array, tensor)
    size: tuple  # original (w, h)


class _PrepareDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], prepare: Callable):
        self.paths = list(paths)
        self.prepare = prepare

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            payload, size = self.prepare(path)
        except UserError as e:
            return path, None, None, str(e)
        except Exception as e:  # a decoder error the image reader did not anticipate must not stop the run
            return path, None, None, f"{path}: {type(e).__name__}: {e}"
        return path, payload, size, None


def _as_list(items):
    return items


class ImageBatches:
    """Iterate `prepare`d images in batches of `batch_size`; see the module docstring."""

    def __init__(self, paths: Sequence[str], prepare: Callable, batch_size: int, workers: Optional[int] = None,
                 pin_memory: bool = False, desc: str = "images"):
        if batch_size < 1:
            raise UserError(f"--batch_size {batch_size}: must be at least 1")
        if workers is not None and workers < 0:
            raise UserError(f"--max_data_loader_n_workers {workers}: must be 0 or more")
        self.paths = list(paths)
        self.prepare = prepare
        self.batch_size = batch_size
        self.workers = workers or 0
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.desc = desc
        self.failed: list = []  # (path, reason)

    def __iter__(self) -> Iterator[list]:
        loader = torch.utils.data.DataLoader(
            _PrepareDataset(self.paths, self.prepare), batch_size=self.batch_size, shuffle=False,
            num_workers=self.workers, collate_fn=_as_list, pin_memory=self.pin_memory,
            prefetch_factor=2 if self.workers else None, persistent_workers=False,
            # its own generator: starting the loader must not draw from the global RNG a seeded sampler uses
            generator=torch.Generator().manual_seed(0))
        pending: list = []
        with tqdm(total=len(self.paths), unit="image", desc=self.desc, smoothing=0.05) as progress:
            for items in loader:
                for path, payload, size, reason in items:
                    if reason is not None:
                        self.failed.append((path, reason))
                        progress.write(f"skipped: {reason}", file=sys.stderr)
                    else:
                        pending.append(PreparedImage(path, payload, size))
                while len(pending) >= self.batch_size:
                    batch, pending = pending[:self.batch_size], pending[self.batch_size:]
                    yield batch
                    progress.update(len(batch))
                progress.update(sum(1 for item in items if item[3] is not None))
            if pending:
                yield pending
                progress.update(len(pending))

    def report_failures(self) -> None:
        if self.failed:
            logger.error(f"{len(self.failed)} of {len(self.paths)} images could not be read and were skipped "
                         "(listed above as 'skipped:'); fix or remove them and run again for those")
