"""The BLIP and GIT captioning tools: their flags (sd-scripts' `make_captions.py` and
`make_captions_by_git.py`) and the run over a folder.

Both write `<image stem>.caption` (UTF-8, the caption and a newline, atomically) beside every image,
overwriting an older one, and return the number of images that could not be read (listed and
skipped; the others are captioned). Options are checked and the model is loaded before any image is
read. BLIP seeds torch, numpy and random once with `--seed` (default 42), so a run is repeatable;
GIT decodes greedily and needs no seed.
"""

from __future__ import annotations

import argparse
import logging
import random

logger = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser, max_length: int) -> None:
    p.add_argument("train_data_dir", help="folder of images to caption")
    p.add_argument("--caption_extension", default=".caption", help="extension of the caption files (default .caption)")
    p.add_argument("--batch_size", type=int, default=1, help="images per generate call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="decode and prepare images in this many worker processes (default: in the main process)")
    p.add_argument("--pin_memory", action="store_true", help="pin the loader's memory (CUDA only)")
    p.add_argument("--max_length", type=int, default=max_length, help=f"longest caption in tokens (default {max_length})")
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    p.add_argument("--debug", action="store_true", help="print every caption")


def add_blip_arguments(p: argparse.ArgumentParser) -> None:
    from library.data.labelling.captioners import BLIP_URL

    _add_common(p, max_length=75)
    p.add_argument("--caption_weights", default=BLIP_URL,
                   help="a transformers BLIP folder (e.g. Salesforce/blip-image-captioning-large downloaded), a Hub "
                        "id in the local cache, or sd-scripts' BLIP .pth; the default URL is looked up in the torch "
                        "hub cache, where sd-scripts kept it. Nothing is downloaded")
    p.add_argument("--caption_extention", default=None, help="old misspelt name of --caption_extension")
    p.add_argument("--beam_search", action="store_true", help="beam search (default: nucleus sampling)")
    p.add_argument("--num_beams", type=int, default=1, help="beams of --beam_search")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling's top_p (without --beam_search)")
    p.add_argument("--min_length", type=int, default=5, help="shortest caption in tokens (default 5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling (default 42: repeatable runs)")


def add_git_arguments(p: argparse.ArgumentParser) -> None:
    from library.data.labelling.captioners import GIT_HUB_ID

    _add_common(p, max_length=50)
    p.add_argument("--model_id", default=GIT_HUB_ID,
                   help=f"a GIT model folder, or a Hub id in the local cache (default {GIT_HUB_ID}); nothing is "
                        "downloaded")
    p.add_argument("--remove_words", action="store_true",
                   help="delete text-reading phrases such as 'with the words ...' and 'that says ...'")


def _images(args):
    from library.data.metadata_json import list_images

    if args.max_length < 1:
        from library.errors import UserError

        raise UserError(f"--max_length {args.max_length}: must be at least 1")
    return list_images(args.train_data_dir, recursive=args.recursive)


def run_blip(args) -> int:
    import numpy as np
    import torch

    from library.data.labelling import caption_files
    from library.data.labelling.captioners import blip_generate_kwargs, load_blip

    extension = caption_files.resolve_extension(args.caption_extension, args.caption_extention)
    kwargs = blip_generate_kwargs(beam_search=args.beam_search, num_beams=args.num_beams, top_p=args.top_p,
                                  max_length=args.max_length, min_length=args.min_length)
    paths = _images(args)
    captioner = load_blip(args.caption_weights, kwargs)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    return caption_folder(captioner, paths, args, extension)


def run_git(args) -> int:
    from library.data.labelling import caption_files
    from library.data.labelling.captioners import load_git

    extension = caption_files.resolve_extension(args.caption_extension)
    paths = _images(args)
    captioner = load_git(args.model_id, args.max_length, args.remove_words)
    return caption_folder(captioner, paths, args, extension)


def caption_folder(captioner, paths, args, extension: str) -> int:
    import torch

    from library.data.labelling import caption_files
    from library.data.labelling.image_batches import ImageBatches

    logger.info(f"{len(paths)} images in {args.train_data_dir}")
    batches = ImageBatches(paths, captioner.prepare, args.batch_size, args.max_data_loader_n_workers,
                           args.pin_memory, desc="captioning")
    for batch in batches:
        texts = captioner.caption(torch.stack([image.payload for image in batch]))
        for image, text in zip(batch, texts):
            caption_files.write_caption(caption_files.caption_path(image.path, extension), text)
            if args.debug:
                logger.info(f"{image.path}: {text}")
    batches.report_failures()
    return len(batches.failed)
