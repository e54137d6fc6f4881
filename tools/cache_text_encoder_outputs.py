"""Encode the captions of a dataset into the text-encoder output disk cache, as a training run would.

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path MODEL --train_data_dir DIR \
        --resolution 1024 [--max_token_length 225] [--clip_skip 2] [--weighted_captions] [--cache_dir DIR]

Pass the training run's own command line or --config_file (every trainer option is accepted; those
that do not change the cache are named in one line and ignored): entries are keyed on the processed
caption text, chunk count, clip_skip, weighted-caption mode and the encoders' identity, so the run
then finds every entry. Works for SD1.x, SD2.x and SDXL (sd-scripts: SDXL only).
Refused when captions change between steps (shuffle, dropout, token warm-up, wildcards).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.caching.settings import add_cache_arguments  # noqa: E402
from library.training.trainer_options import add_trainer_options  # noqa: E402
from tools.cache_latents import (  # noqa: E402
    TRAINER_OPTIONS, add_dataset_flags, add_model_flags, detect_family, load_config, model_dtype, parse_tool_args,
)


def build_parser():
    """(parser, the trainer options it accepts but ignores)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    g = p.add_argument_group("text encoding")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder to read tokenizers from, or save the offline-built ones to")
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
                   help="caption length in tokens: 75 (default), 150 or 225")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the k-th last text-encoder layer")
    g.add_argument("--weighted_captions", action="store_true", help="captions carry (word:1.2) weights")
    g.add_argument("--text_encoder_batch_size", type=int, default=None,
                   help="captions per text-encoder call (default: --vae_batch_size, at least 8)")
    add_dataset_flags(p)
    add_cache_arguments(p, support_text_encoder_caching=True, trainer=False)
    return p, add_trainer_options(p, TRAINER_OPTIONS)


def main(argv=None):
    args = parse_tool_args(build_parser, argv)
    import torch

    from library.caching.settings import disk_location
    from library.caching.tools import collect_cache_items
    from library.models.loading import load_models
    from library.caching.text_encoder_cache import (
        TextEncoderOutputCache, TextSample, check_text_encoder_caching, fixed_caption,
    )
    from library.text.encoding import TextConditioner, training_clip_skip
    from library.text.tokenizer import load_tokenizers

    family = detect_family(args)
    config = load_config(args, family)
    check_text_encoder_caching(config)
    clip_skip, warning = training_clip_skip(family, args.clip_skip)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model_dtype(args, device)
    models = load_models(args.pretrained_model_name_or_path, v2=True if args.v2 else None,
                         sdxl=True if args.sdxl else None, dtype=dtype)
    del models.unet, models.vae  # only the text side is needed
    encoders = [e.to(device).eval() for e in models.text_encoders]
    tokenizers = load_tokenizers(family, args.pretrained_model_name_or_path, args.tokenizer_cache_dir)
    conditioner = TextConditioner(family, tokenizers, encoders)

    items = collect_cache_items(config, num_workers=max(1, min(4, os.cpu_count() or 1)), skip_bad=args.skip_bad_images)
    samples = [TextSample(fixed_caption(item.caption, item.subset), item.path) for item in items]
    batch = args.text_encoder_batch_size or max(8, args.vae_batch_size or 1)
    cache = TextEncoderOutputCache(conditioner, disk_location(args.cache_dir), batch, max_token_length=args.max_token_length,
                                   clip_skip=clip_skip, weighted=args.weighted_captions, skip_check=args.skip_cache_check)
    print(f"{len(items)} images, {len(set(s.caption for s in samples))} distinct captions ({family.title}, {dtype}, {device})")
    stats = cache.ensure(samples)
    where = args.cache_dir or "a .sdtrain_cache folder in each image folder"
    print(f"text encoder outputs: {stats.summary('entries')}; cache: {where}")


if __name__ == "__main__":
    run(main)
