"""The tools (``commands/``, ``reports/``) use the models' public API only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "anomalib_mvfa"
TOOLS = sorted((PACKAGE / "commands").rglob("*.py")) + sorted((PACKAGE / "reports").rglob("*.py"))


def _trees() -> list[tuple[str, ast.AST]]:
    assert len(TOOLS) >= 15  # every command and report module, the benchmark package's included
    return [(str(path.relative_to(PACKAGE)), ast.parse(path.read_text())) for path in TOOLS]


def test_the_tools_import_only_mvfa_from_the_lightning_module() -> None:
    for name, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("lightning_model"):
                assert [alias.name for alias in node.names] == ["Mvfa"], name
            if isinstance(node, ast.Import):
                assert not [alias for alias in node.names if alias.name.endswith("lightning_model")], name


def test_the_tools_touch_no_private_attribute_and_no_model_inside_a_model() -> None:
    for name, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            assert not (private and owner not in ("self", "cls")), f"{name}:{node.lineno} {ast.unparse(node)}"
            assert not (node.attr == "model" and owner == "model"), f"{name}:{node.lineno} {ast.unparse(node)}"
