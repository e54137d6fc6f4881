"""Shared behaviour of every entry script: logging set-up and one-line errors for bad input.

Kept free of heavy imports so that `--help` answers instantly: scripts parse their arguments with
plain argparse first and import torch, diffusers and the rest only when they are going to run.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable

from library.errors import UserError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )


def apply_console_log_flags(args) -> None:
    """sd-scripts' `--console_log_level` (level of the log lines, default INFO) and `--console_log_file`
    (log lines go to this file, overwritten, with time and level, instead of the console)."""
    level = getattr(args, "console_log_level", None)
    path = getattr(args, "console_log_file", None)
    root = logging.getLogger()
    if level:
        root.setLevel(getattr(logging, level))
    if path:
        try:
            handler = logging.FileHandler(path, mode="w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--console_log_file {path}: cannot write there ({e.strerror}); choose a writable file") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for old in list(root.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                root.removeHandler(old)
        root.addHandler(handler)


def one_line(message: str) -> str:
    """A message as one plain line: no terminal colour codes (they may come from a library's text), no breaks."""
    message = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", message)
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def run(main: Callable[[], object]) -> None:
    """Call `main`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    setup_logging(os.environ.get("SDTRAIN_VERBOSE") == "1")
    try:
        result = main()
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)
