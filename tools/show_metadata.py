"""Print the metadata of a .safetensors file (training settings, modelspec.*) as JSON.

    python tools/show_metadata.py MODEL.safetensors
    python tools/show_metadata.py --model MODEL.safetensors   (sd-scripts' spelling)
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.errors import UserError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a .safetensors file")
    p.add_argument("--model", dest="model_option", metavar="MODEL", default=None,
                   help="the same, as sd-scripts' tools/show_metadata.py spells it")
    args = p.parse_args(argv)
    if args.model and args.model_option and args.model != args.model_option:
        raise UserError(f"two files given ({args.model} and --model {args.model_option}); pass one")
    model = args.model or args.model_option
    if not model:
        raise UserError("no file given: pass MODEL.safetensors (or --model MODEL.safetensors)")
    from library.models.safetensors_io import read_metadata

    metadata = read_metadata(model)
    decoded = {}
    for key, value in metadata.items():
        # sd-scripts stores nested structures (tag frequencies, dataset dirs) as JSON strings
        if value[:1] in "{[":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        decoded[key] = value
    print(json.dumps(decoded, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    run(main)
