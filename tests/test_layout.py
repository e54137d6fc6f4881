"""The layout of `library/` (docs/architecture.md): six packages importing one way, no import circles,
and every test fixture inside the repository."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "library"
# Lower numbers sit lower; a package may import its own level's helpers only from itself.
LEVELS = {"text": 1, "models": 2, "data": 3, "generation": 3, "caching": 4, "training": 5}
TOP_LEVEL_HELPERS = {"__init__.py", "errors.py", "cli.py", "refused_options.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Every `library...` module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("library"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("library") and not node.level:
            found.add(node.module)
            # `from library.data import scan` imports the module library.data.scan
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (LIBRARY.parent / node.module.replace(".", "/") / f"{a.name}.py").exists())
    return found


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in LIBRARY.rglob("*.py")}


def test_library_top_level_holds_only_the_packages_and_small_helpers():
    entries = {e.name for e in LIBRARY.iterdir() if e.name != "__pycache__"}
    assert entries - set(LEVELS) == TOP_LEVEL_HELPERS
    for package in LEVELS:
        init = LIBRARY / package / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} needs a docstring"


def test_every_module_says_its_job():
    missing = [str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert missing == []


def test_packages_import_only_downwards():
    wrong = []
    for module, imported in _graph().items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in LEVELS:
            continue
        own = parts[1]
        for target in imported:
            target_package = target.split(".")[1] if target.count(".") else None
            if target_package not in LEVELS or target_package == own:
                continue
            if LEVELS[target_package] >= LEVELS[own]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_circles():
    graph = _graph()
    state, circles = {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert circles == []


def test_fixtures_live_in_the_repository():
    """The suite reads other tools' formats from tests/fixtures, never from outside the clone."""
    fixtures = ROOT / "tests" / "fixtures"
    for name in ("checkpoint-keys/sd15.json", "checkpoint-keys/sd21v.json", "checkpoint-keys/sdxl_base.json",
                 "sd-scripts/lora_sd15_lierla_dim4.safetensors", "sd-scripts/ti_sd15_2vec.safetensors",
                 "sd-scripts/controlnet_lllite_sdxl.keys.json"):
        assert (fixtures / name).is_file(), name
    beside = "sha" "red"  # the reference folder beside the repository, which CI does not have
    outside_paths = (f"../{beside}", f"/work/{beside}", f'"{beside}", "fixtures"')
    outside = [p.name for p in (ROOT / "tests").glob("*.py")
               if any(text in p.read_text(encoding="utf-8") for text in outside_paths)]
    assert outside == []
