"""Shared behaviour of every entry script: logging set-up and one-line errors for bad input.

Kept free of heavy imports so that `--help` answers instantly: scripts parse their arguments with
plain argparse first and import torch, diffusers and the rest only when they are going to run.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from library.errors import UserError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )


def run(main: Callable[[], object]) -> None:
    """Call `main`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    setup_logging(os.environ.get("SDTRAIN_VERBOSE") == "1")
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)
