"""The registry of refused options (library/refused_options.py): each refusal is one line naming its flag,
and docs/refused-options.md lists exactly the registry."""

import argparse
import re
from pathlib import Path

import pytest

from library.errors import UserError
from library.refused_options import ALWAYS_SO, MODIFIES_REFUSED, REFUSED, refuse_set_options

DOC = Path(__file__).resolve().parent.parent / "docs" / "refused-options.md"


@pytest.mark.parametrize("dest", sorted(REFUSED))
def test_each_refused_option_stops_with_its_one_line(dest):
    parser = argparse.ArgumentParser()
    parser.add_argument(f"--{dest}", default=None)
    refuse_set_options(parser.parse_args([]), parser)  # unset: accepted
    with pytest.raises(UserError) as caught:
        refuse_set_options(parser.parse_args([f"--{dest}", "x"]), parser)
    line = str(caught.value)
    assert line.startswith(f"--{dest}") and "\n" not in line and "\x1b" not in line


def test_a_modifier_of_a_refused_feature_is_accepted_alone():
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--deepspeed", action="store_true")
    refuse_set_options(parser.parse_args(["--zero_stage", "3"]), parser)
    with pytest.raises(UserError, match="^--deepspeed "):
        refuse_set_options(parser.parse_args(["--zero_stage", "3", "--deepspeed"]), parser)


def test_the_doc_table_lists_exactly_the_registry():
    listed = re.findall(r"^\| `--([a-z0-9_]+)` \|", DOC.read_text(encoding="utf-8"), re.M)
    assert sorted(listed) == sorted(set(REFUSED) | set(MODIFIES_REFUSED) | set(ALWAYS_SO))
