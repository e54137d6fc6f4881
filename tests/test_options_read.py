"""Every option of every script is read by the code, or accounted for in library/refused_options.py.

The parser of each entry script is captured the moment the script parses its command line (no model
loads), so a script added later is covered without a list here. "Read" means a non-parser line of the
code base accesses an attribute of that name (`args.flag`, `run.args.flag`) or names it as a string
(`getattr(args, "flag")`, a settings class's field list): an option nothing mentions outside its own
`add_argument` parses and then does nothing, which is what this test catches.
"""

import argparse
import ast
import runpy
import sys
from pathlib import Path

import pytest

from library.refused_options import is_registered

ROOT = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("library", "networks", "tools", "finetune")


def entry_scripts() -> list:
    """Every script a user runs: the top-level ones and those in tools/, finetune/, networks/."""
    candidates = [p for p in ROOT.glob("*.py") if p.name != "setup.py"]
    for folder in ("tools", "finetune", "networks"):
        candidates += list((ROOT / folder).glob("*.py"))
    return sorted(p for p in candidates if '__name__ == "__main__"' in p.read_text(encoding="utf-8"))


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__("parsed")
        self.parser = parser


def captured_parser(script: Path, monkeypatch):
    """The ArgumentParser `script` parses its command line with, or None for a module with no main."""
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [str(script)])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed as parsed:
        return parsed.parser
    except SystemExit:
        return None
    return None


def _names_read() -> set:
    """Attribute names and string constants used anywhere in the code outside `add_argument(...)` calls."""
    names = set()
    files = [p for folder in CODE_FOLDERS for p in (ROOT / folder).rglob("*.py")] + list(ROOT.glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                node.args, node.keywords = [], []  # the definition itself is not a read
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


NAMES_READ = _names_read()
SCRIPTS = entry_scripts()


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_every_option_is_read_or_registered(script, monkeypatch):
    parser = captured_parser(script, monkeypatch)
    assert parser is not None, f"{script.name} did not reach its argument parser"
    unread = [action.option_strings[0] for action in parser._actions
              if action.option_strings and action.dest != "help"
              and action.dest not in NAMES_READ and not is_registered(action.dest)]
    assert unread == [], f"{script.name}: options read by nothing (implement, or register in library/refused_options.py)"


def test_the_guard_catches_an_unread_option(tmp_path, monkeypatch):
    script = tmp_path / "made_up_tool.py"
    script.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--zz_never_read_flag')\n"
                      "args = p.parse_args()\n", encoding="utf-8")
    parser = captured_parser(script, monkeypatch)
    dests = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]
    assert dests == ["zz_never_read_flag"] and "zz_never_read_flag" not in NAMES_READ

