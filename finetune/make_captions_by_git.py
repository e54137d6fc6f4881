"""Caption images with GIT (transformers' GitForCausalLM), offline.

    python finetune/make_captions_by_git.py [flags] TRAIN_DATA_DIR

Writes `<image stem>.caption` beside every image. --model_id is a GIT model folder, or a Hub id
already in the local Hugging Face cache (default microsoft/git-large-textcaps); nothing is
downloaded: a missing model is one line saying what to download. --remove_words deletes the
text-reading phrases TextCaps models add ("with the words ..."). Unreadable images are listed and
skipped. Exit status: 0; 1 when some images could not be read; 2 for bad arguments or a missing
model. See docs/labelling.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from library.data.labelling.caption_run import add_git_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_git_arguments(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from library.data.labelling.caption_run import run_git

    return 1 if run_git(args) else 0


if __name__ == "__main__":
    run(main)
