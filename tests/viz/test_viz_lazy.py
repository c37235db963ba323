"""vlm_lens.viz is optional: the core never imports it, and it imports its drawing libraries lazily."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "vlm_lens"


def _imports(path, top_level_only=False):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_core_does_not_import_viz_at_import_time():
    for path in PACKAGE.rglob("*.py"):
        if "viz" in path.relative_to(PACKAGE).parts:
            continue
        names = list(_imports(path, top_level_only=True))
        assert not any(name == "vlm_lens.viz" or name.startswith("vlm_lens.viz.") for name in names), path


def test_viz_imports_drawing_libraries_inside_functions():
    for path in (PACKAGE / "viz").glob("*.py"):
        heavy = [n for n in _imports(path, top_level_only=True) if n.split(".")[0] in ("matplotlib", "circuitsvis")]
        assert not heavy, (path, heavy)
