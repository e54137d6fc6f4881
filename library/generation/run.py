"""The command-line run of gen_img.py / sdxl_gen_img.py: prompts → per-image (settings, job) → batches → PNGs.

`run_from_args` takes the parsed arguments (library/generation/args.py), reads the `--image_path` /
`--mask_path` images, builds the engine (library/generation/loading.py) and feeds it the prompt entries
(library/generation/prompt_options.py). `CommandLineRun` turns each entry into one job per image (seed, dynamic
prompt, init image and mask resized to the batch size, ControlNet-LLLite guide images in turn), starts a
new batch when the settings change or the batch is full, and saves every image as a PNG with its
settings (library/generation/png_info.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import List, Optional, Sequence

from library.errors import UserError
from library.generation.control import guide_groups
from library.models.atomic_writes import check_writable_folder
from library.generation.loading import build_engine
from library.generation.engine import BatchSettings, GenerationEngine, HighresFix, ImageJob

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def load_images(path: Optional[str], what: str) -> list:
    """An image file, or the images of a folder (sorted); each keeps its path in `.filename`."""
    from PIL import Image

    if not path:
        return []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"{path}: {what} not found")
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder given as {what}")
    images = []
    for file in files:
        try:
            image = Image.open(file)
            image.load()
        except OSError as e:
            raise UserError(f"{file}: cannot read the image ({e})") from None
        image.filename = file
        images.append(image)
    return images


class CommandLineRun:
    """One gen_img run: turns prompt dicts into jobs, batches them, saves the images."""

    def __init__(self, args, engine: GenerationEngine, images: list, masks: list, seeds, guides: Sequence = ()):
        self.args, self.engine, self.images, self.masks, self.seeds = args, engine, images, masks, seeds
        self.guides = list(guides)  # per generated image in turn: one guide image per LLLite model
        self.number = 0
        self.batch: List[ImageJob] = []
        self.settings: Optional[BatchSettings] = None
        self.fix = (HighresFix(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                               args.highres_fix_latents_upscaling, args.highres_fix_disable_control_net)
                    if args.highres_fix_scale else None)
        self.model_name = os.path.splitext(os.path.basename(os.path.normpath(args.ckpt)))[0]

    def add_entry(self, entry: dict, iteration_seed: Optional[int]) -> None:
        """Queue the images of one prompt; the batch is flushed when settings change or it is full."""
        from PIL import Image

        from library.generation.prompt_options import dynamic_prompt, image_settings

        for k in range(self.args.images_per_prompt):
            seed = self.seeds.seed_for(entry.get("seeds") or [], k, iteration_seed)
            image = self.images[self.number % len(self.images)] if self.images else None
            mask = self.masks[self.number % len(self.masks)] if self.masks else None
            settings = BatchSettings(**image_settings(entry, self.args, self.engine.family.is_sdxl,
                                                      image.size if image else None))
            size = (settings.width, settings.height)
            name = entry.get("filename")
            if name and self.args.images_per_prompt > 1:
                name = "{0}_{2}{1}".format(*os.path.splitext(name), k)
            job = ImageJob(
                prompt=dynamic_prompt(entry["prompt"], seed), negative_prompt=entry.get("negative_prompt") or "",
                seed=seed, init_image=image.convert("RGB").resize(size, Image.LANCZOS) if image else None,
                mask_image=mask.convert("L").resize(size, Image.LANCZOS) if mask else None,
                filename=name, source_name=getattr(image, "filename", None), number=self.number,
                guide_images=self.guides[self.number % len(self.guides)] if self.guides else (),
            )
            if self.batch and (settings != self.settings or len(self.batch) >= self.args.batch_size):
                self.flush()
            self.batch.append(job)
            self.settings = settings
            self.number += 1

    def flush(self) -> None:
        if not self.batch:
            return
        jobs, settings, self.batch = self.batch, self.settings, []
        logger.info("generating %d image(s): %s", len(jobs), jobs[0].prompt[:80])
        if not self.fix:
            self._save(jobs, self.engine.generate(jobs, settings), settings, "")
            return
        first, final = self.engine.generate_highres(jobs, settings, self.fix)
        if first is not None and self.args.highres_fix_save_1st:
            width, height = first[0].size
            self._save(jobs, first, replace(settings, width=width, height=height, steps=self.fix.steps), "0")
        self._save(jobs, final, settings, "1")

    def _networks_text(self, settings: BatchSettings) -> Optional[str]:
        if not self.engine.networks:
            return None
        muls = settings.network_muls or self.engine.network_default_muls
        files = self.args.network_weights[-len(self.engine.networks):]  # merged ones come first
        return ", ".join(f"{os.path.splitext(os.path.basename(f))[0]}:{m}" for f, m in zip(files, muls))

    def _save(self, jobs: Sequence[ImageJob], images: list, settings: BatchSettings, hires_prefix: str) -> None:
        from library.generation.png_info import first_available, image_info, output_name, save_png

        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        for i, (job, image) in enumerate(zip(jobs, images)):
            original = job.source_name if self.args.use_original_file_name else None
            name = output_name(stamp, job.seed, i, job.number + 1, sequential=self.args.sequential_file_name,
                               hires_prefix=hires_prefix, original=original, explicit=job.filename)
            path = os.path.join(self.args.outdir, first_available(self.args.outdir, name))
            info = image_info(job, settings, sdxl=self.engine.family.is_sdxl, model=self.model_name,
                              clip_skip=self.args.clip_skip, hires=self.fix, networks=self._networks_text(settings),
                              control_nets=self.engine.control_nets)
            save_png(image, path, info)
            logger.info("saved %s", path)


def run_from_args(args, sdxl: Optional[bool] = None) -> int:
    """gen_img.py / sdxl_gen_img.py after argument parsing: returns the exit status."""
    from library.generation.args import check_args
    from library.generation.prompt_options import SeedPlan, iter_prompt_entries

    check_args(args)
    images = load_images(args.image_path, "--image_path")
    masks = load_images(args.mask_path, "--mask_path")
    guides = guide_groups([g for path in args.guide_image_path or [] for g in load_images(path, "--guide_image_path")],
                          len(args.control_net_lllite_models or []))
    entries = iter_prompt_entries(args, images)
    iterations = 1 if args.interactive else args.n_iter
    if not args.interactive:
        entries = list(entries)
    single = not args.interactive and iterations * len(entries) * args.images_per_prompt == 1
    check_writable_folder(args.outdir, "--outdir")  # before the model loads
    engine = build_engine(args, sdxl)
    seeds = SeedPlan(args.seed, single)
    run = CommandLineRun(args, engine, images, masks, seeds, guides)
    for _ in range(iterations):
        iteration_seed = seeds.iteration_seed(args.iter_same_seed)
        order = entries
        if args.shuffle_prompts and not args.interactive:
            order = list(entries)
            seeds.random.shuffle(order)
        for entry in order:
            run.add_entry(entry, iteration_seed)
            if args.interactive:
                run.flush()  # show each answer before reading the next prompt
    run.flush()
    return 0
