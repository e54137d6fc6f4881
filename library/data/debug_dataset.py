"""`--debug_dataset`: the batches a run would train on, written out as pictures and captions, with no model.

The trainer builds the training dataset exactly as for a run (buckets, crops, flips, caption transforms,
alpha masks and conditioning images) and, instead of training, walks the batches of the run's steps in
training order: the first `--max_train_steps` steps (or `--max_train_epochs` epochs), each step taking
`--gradient_accumulation_steps` batches. Every batch goes into a folder of its own,

    <output_dir>/debug_dataset-<YYYYmmddHHMMSS>/<epoch:03d>-<step:06d>-<micro>/
        <i>-<image stem>[-flipped].png     the pixels the VAE would get (after resize, crop and flip)
        <i>-<image stem>[-flipped].txt     the caption the text encoder would get
        <i>-<image stem>[-flipped]-mask.png, -conditioning.png   when the batch has them

and a summary is printed. Nothing is trained and no model is read. sd-scripts shows the same images in
a window one by one; files work on machines without a screen and can be compared between runs.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from library.errors import UserError

SUMMARY_CAPTIONS = 3  # captions quoted in the summary


@dataclass
class DebugSummary:
    folder: str
    batches: int = 0
    images: int = 0
    flipped: int = 0
    empty_captions: int = 0
    masks: int = 0
    conditioning: int = 0
    buckets: Counter = field(default_factory=Counter)
    captions: list = field(default_factory=list)

    def lines(self) -> list:
        out = [f"--debug_dataset: {self.batches} batch(es), {self.images} image(s) written to {self.folder}"]
        for (w, h), n in sorted(self.buckets.items()):
            out.append(f"  bucket {w}x{h}: {n} image(s)")
        out.append(f"  flipped: {self.flipped}; empty captions: {self.empty_captions}; "
                   f"masks: {self.masks}; conditioning images: {self.conditioning}")
        out += [f"  caption: {c!r}" for c in self.captions]
        out.append("nothing was trained and no model was written")
        return out


def planned_batches(dataset, args) -> int:
    """How many batches the run's steps load, in one process: steps × gradient accumulation."""
    accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
    per_epoch = max(1, math.ceil(dataset.num_batches(1) / accumulation))
    epochs = getattr(args, "max_train_epochs", None)
    steps = epochs * per_epoch if epochs else int(getattr(args, "max_train_steps", 0) or 0)
    return steps * accumulation


def write_debug_batches(dataset, out_root: str, total_batches: int, accumulation: int = 1) -> DebugSummary:
    """Walk `total_batches` batches in training order and write each one; returns the summary."""
    folder = os.path.join(out_root, "debug_dataset-" + time.strftime("%Y%m%d%H%M%S"))
    try:
        os.makedirs(folder, exist_ok=False)
    except OSError as e:
        raise UserError(f"--debug_dataset: cannot create {folder} ({e.strerror}); choose a writable --output_dir") from None
    summary = DebugSummary(folder)
    accumulation = max(1, accumulation)
    epoch, done = 1, 0
    while done < total_batches:
        batches = dataset.epoch_batches(epoch)
        if len(batches) == 0:
            raise UserError("--debug_dataset: the dataset yields no batches")
        for k in range(min(len(batches), total_batches - done)):
            step = (done // accumulation) + 1
            batch = dataset.load_batch(batches[k], epoch, step - 1)
            _write_batch(batch, os.path.join(folder, f"{epoch:03d}-{step:06d}-{done % accumulation}"), summary)
            done += 1
        epoch += 1
    return summary


def _to_rgb(tensor) -> Image.Image:
    array = ((tensor.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _write_batch(batch: dict, folder: str, summary: DebugSummary) -> None:
    os.makedirs(folder)
    images = batch.get("images")
    if images is None:
        raise UserError("--debug_dataset: the batches hold cached latents, not pixels; run it without latent caching")
    masks, conditioning = batch.get("alpha_masks"), batch.get("conditioning_images")
    for i, (path, caption, flipped) in enumerate(zip(batch["image_paths"], batch["captions"], batch["flipped"])):
        stem = f"{i}-{os.path.splitext(os.path.basename(path))[0]}{'-flipped' if flipped else ''}"
        _to_rgb(images[i]).save(os.path.join(folder, stem + ".png"))
        with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption)
        if masks is not None:
            mask = (masks[i].float().clamp(0, 1) * 255).round().byte().numpy()
            Image.fromarray(mask, mode="L").save(os.path.join(folder, stem + "-mask.png"))
            summary.masks += 1
        if conditioning is not None:
            _to_rgb(conditioning[i]).save(os.path.join(folder, stem + "-conditioning.png"))
            summary.conditioning += 1
        summary.images += 1
        summary.flipped += bool(flipped)
        summary.empty_captions += not caption.strip()
        summary.buckets[tuple(batch["bucket"])] += 1
        if len(summary.captions) < SUMMARY_CAPTIONS:
            summary.captions.append(caption)
    summary.batches += 1
