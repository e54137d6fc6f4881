"""Print the statistics of every tensor of a LoRA (or LyCORIS) file: shape, mean |w|, min |w|.

    python networks/check_lora_weights.py FILE [-s]

One line per factor tensor: `key,(d0-d1-...),mean|w|,min|w|` (computed in float32). With -s the
other tensors (alpha, DoRA scales...) follow, each listed once.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402

FACTOR_NAMES = ("lora_up", "lora_down", "lora_mid", "lora_A", "lora_B", "oft_", "hada_", "lokr_")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=str, help="LoRA file to check")
    p.add_argument("-s", "--show_all_keys", action="store_true", help="also list the tensors that are not factors")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from networks.lora_files import read_lora

    tensors = read_lora(args.file).tensors
    factors = [k for k in tensors if any(n in k for n in FACTOR_NAMES)]
    print(f"number of LoRA modules: {len(factors)}")
    keys = factors
    if args.show_all_keys:
        keys = factors + [k for k in tensors if k not in set(factors)]
        print(f"number of all modules: {len(keys)}")
    for key in keys:
        value = tensors[key].float().abs()
        shape = str(tuple(tensors[key].shape)).replace(", ", "-")
        print(f"{key},{shape},{float(value.mean()) if value.numel() else 0.0},{float(value.min()) if value.numel() else 0.0}")


if __name__ == "__main__":
    run(main)
