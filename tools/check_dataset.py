"""Check a training dataset without loading any model: buckets, repeats, caption lengths, bad files.

    python tools/check_dataset.py --train_data_dir data/img --resolution 512 --enable_bucket
    python tools/check_dataset.py --dataset_config data.toml --sdxl --json report.json

Takes the trainers' dataset flags (other flags of a pasted training command are ignored with a
warning). Prints the buckets with sample counts, the images per subset with repeats, a histogram of
caption lengths in CLIP tokens, images without captions and every bad file with its reason.
Exit status: 0 when training could start, 1 when it would stop (bad files without
--skip_bad_images, or errors such as an empty dataset), 2 for a bad flag or config file.
See docs/dataset-check.md.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402

logger = logging.getLogger("check_dataset")


def build_parser() -> argparse.ArgumentParser:
    from library.data import check as dataset_check, flags as dataset_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_flags.add_dataset_arguments(p)
    dataset_flags.add_config_arguments(p)
    dataset_check.add_dataset_check_arguments(p, standalone=True)
    p.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="conditioning images (ControlNet-LLLite, or masks with --masked_loss)")
    p.add_argument("--masked_loss", action="store_true", help="accept ControlNet/mask subsets as --masked_loss does")
    p.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    p.add_argument("--train_batch_size", type=int, default=1, help="batch size (a default for every dataset)")
    p.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225],
                   help="caption token limit the histogram checks against (default 75)")
    family = p.add_mutually_exclusive_group()
    family.add_argument("--sdxl", action="store_true", help="SDXL: bucket_reso_steps must be a multiple of 32")
    family.add_argument("--v2", action="store_true", help="SD 2.x tokenizer (counts are the same as SD 1.x)")
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="a Diffusers model folder whose tokenizer to use (optional; nothing else is loaded)")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None, help="saved tokenizers (as the trainers use)")
    p.add_argument("--json", type=str, default=None, metavar="PATH", help="also write the report as JSON to PATH")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        logger.warning("ignoring flags that do not describe the dataset: %s", " ".join(ignored))

    from library.data.check import run_dataset_check

    # Accept every dataset kind: the check should describe a config, not reject it for one trainer.
    support = {"support_controlnet": True}
    if args.conditioning_data_dir and args.dataset_config is None:
        # Without a config, --conditioning_data_dir means one ControlNet subset (as the LLLite trainer reads it).
        support.update(support_dreambooth=False, support_finetuning=False)
    return run_dataset_check(args, json_path=args.json, **support)


if __name__ == "__main__":
    run(main)
