"""Print the metadata of a .safetensors file (training settings, modelspec.*) as JSON.

    python tools/show_metadata.py MODEL.safetensors
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .safetensors file")
    args = p.parse_args(argv)
    from library.models.safetensors_io import read_metadata

    metadata = read_metadata(args.model)
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
