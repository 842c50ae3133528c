"""The package's seams, read from its source with ``ast``: what may touch what.

- Only ``anomalib_mvfa/_compat.py`` reaches into other libraries' private attributes (Lightning's loop
  data sources and root folder, torchmetrics' sync flag, anomalib's dataset tables), swaps an object's
  ``__class__`` or writes a module global of another package.
- ``support/``, ``data/``, ``reports/`` and ``commands/`` use the Lightning module only through ``Mvfa``;
  ``support/`` does not import it at all (the support set is a service ``Mvfa`` calls, never the reverse).
- No module installs a process-wide warning filter that is not scoped to a module.
- ``Mvfa`` and ``MvfaModel`` stay small enough to read.

Each rule is a function over source text, checked first on a planted violation (so that it can fail)
and then on every module of the package.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import anomalib_mvfa

PACKAGE = Path(anomalib_mvfa.__file__).parent
COMPAT = PACKAGE / "_compat.py"
# private attributes of Lightning's loops and trainer, torchmetrics' metrics and anomalib's datasets
PRIVATE_INTERNALS = ("_data_source", "_to_sync", "_default_root_dir", "_samples", "_combined_loader")
TOOL_FOLDERS = ("support", "data", "reports", "commands")
MAX_CLASS_LINES = {("lightning_model.py", "Mvfa"): 320, ("torch_model.py", "MvfaModel"): 420}


def modules(*, but: tuple[Path, ...] = ()) -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path not in but)


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def absolute_import(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` imports from, relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


# ------------------------------------------------------------------------------------------- rules


def private_internals(source: str) -> Iterator[str]:
    """Names of other libraries' private attributes that ``source`` reads, writes or names in a string."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_INTERNALS:
            yield f"line {node.lineno}: .{node.attr}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PRIVATE_INTERNALS:
            yield f"line {node.lineno}: {node.value!r}"


def _calls(node: ast.AST, function: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function


def assignment_targets(node: ast.AST) -> list[ast.expr]:
    """What ``node`` assigns to (``a.b = ...``, ``a.b += ...``, ``a.b: T = ...``); nothing for other nodes."""
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    return []


def class_swaps(source: str) -> Iterator[str]:
    """Assignments of ``__class__`` (``x.__class__ = ...`` or ``setattr(x, "__class__", ...)``)."""
    for node in ast.walk(ast.parse(source)):
        targets = assignment_targets(node)
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == "__class__":
                yield f"line {node.lineno}: {ast.unparse(target)} = ..."
        if _calls(node, "setattr") and len(node.args) > 1 and ast.unparse(node.args[1]) == "'__class__'":
            yield f"line {node.lineno}: setattr(..., '__class__', ...)"


def _is_module(name: str) -> bool:
    try:
        return isinstance(importlib.import_module(name), ModuleType)
    except ImportError:
        return False


def foreign_module_writes(
    source: str, importer: str = "anomalib_mvfa.module", is_package: bool = False
) -> Iterator[str]:
    """Assignments to a module global of another package (``torch_model.PRETRAINED = ...``, ``setattr(module, ..)``)."""
    tree = ast.parse(source)
    foreign: dict[str, str] = {}  # local name -> module of another package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                imported = alias.name if alias.asname else alias.name.split(".")[0]
                if not imported.startswith("anomalib_mvfa"):
                    foreign[local] = imported
        elif isinstance(node, ast.ImportFrom):
            origin = absolute_import(node, importer, is_package)
            if origin.startswith("anomalib_mvfa"):
                continue
            for alias in node.names:
                if _is_module(f"{origin}.{alias.name}"):
                    foreign[alias.asname or alias.name] = f"{origin}.{alias.name}"
    for node in ast.walk(tree):
        targets = assignment_targets(node)
        for target in targets:
            root = target
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in foreign:
                owner = ast.unparse(target.value)
                if _is_module(foreign[root.id] + owner[len(root.id) :]) or owner == root.id:
                    yield f"line {node.lineno}: {ast.unparse(target)} = ... (a global of {foreign[root.id]})"
        if _calls(node, "setattr") and node.args and ast.unparse(node.args[0]) in foreign:
            yield f"line {node.lineno}: setattr({node.args[0].id}, ...) (a global of {foreign[node.args[0].id]})"


def lightning_model_imports(
    source: str,
    importer: str = "anomalib_mvfa.support.module",
    is_package: bool = False,
    allowed: tuple[str, ...] = ("Mvfa",),
) -> Iterator[str]:
    """Imports of ``anomalib_mvfa.lightning_model`` other than the names in ``allowed``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            origin = absolute_import(node, importer, is_package)
            if origin == "anomalib_mvfa.lightning_model":
                yield from (f"line {node.lineno}: {alias.name}" for alias in node.names if alias.name not in allowed)
            elif origin == "anomalib_mvfa" and any(alias.name == "lightning_model" for alias in node.names):
                yield f"line {node.lineno}: the module lightning_model"
        elif isinstance(node, ast.Import):
            yield from (
                f"line {node.lineno}: {a.name}" for a in node.names if a.name == "anomalib_mvfa.lightning_model"
            )


def global_warning_filters(source: str) -> Iterator[str]:
    """``warnings.filterwarnings``/``simplefilter`` outside a ``warnings.catch_warnings()`` scope, without ``module=``.

    A scope is a ``with warnings.catch_warnings():`` block, or a function that enters one by hand
    (``scope = warnings.catch_warnings()`` then ``scope.__enter__()``, for a scope that spans callbacks).
    """

    def enters_a_scope(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        scopes = {
            ast.unparse(target)
            for node in ast.walk(function)
            if isinstance(node, ast.Assign) and "catch_warnings(" in ast.unparse(node.value)
            for target in node.targets
        }
        return any(
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "__enter__"
            and ast.unparse(node.func.value) in scopes
            for node in ast.walk(function)
        )

    def visit(node: ast.AST, guarded: bool) -> Iterator[str]:
        if isinstance(node, ast.With | ast.AsyncWith):
            guarded = guarded or any("catch_warnings" in ast.unparse(item.context_expr) for item in node.items)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            guarded = guarded or enters_a_scope(node)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"filterwarnings", "simplefilter"}
            and not guarded
            and not any(keyword.arg == "module" for keyword in node.keywords)
        ):
            yield f"line {node.lineno}: {ast.unparse(node.func)}(...)"
        for child in ast.iter_child_nodes(node):
            yield from visit(child, guarded)

    yield from visit(ast.parse(source), guarded=False)


def class_lengths(source: str) -> dict[str, int]:
    """Lines of each top-level class body, decorators left out."""
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
    }


# ------------------------------------------------------------------- each rule can fail


def test_each_rule_finds_a_planted_violation() -> None:
    assert list(private_internals("trainer.fit_loop._data_source.instance = self"))
    assert list(private_internals("aupro._to_sync = False"))
    assert list(private_internals("getattr(trainer, '_default_root_dir')"))
    assert list(private_internals("dataset._samples = table"))
    assert not list(private_internals("dataset.samples = table\nn_samples = 3"))
    assert list(class_swaps("dataset.__class__ = Other"))
    assert list(class_swaps("setattr(dataset, '__class__', Other)"))
    assert not list(class_swaps("kind = dataset.__class__"))
    assert list(
        foreign_module_writes("from anomalib.models.image.winclip import torch_model\ntorch_model.PRETRAINED = {}")
    )
    assert list(foreign_module_writes("import anomalib.models.image.winclip.torch_model as tm\ntm.PRETRAINED = {}"))
    assert list(foreign_module_writes("import torch\ntorch.backends.cudnn.benchmark = True"))
    assert list(foreign_module_writes("import warnings\nsetattr(warnings, 'filters', [])"))
    assert not list(foreign_module_writes("from torch import nn\nlayer = nn.Linear(1, 1)\nlayer.weight = None"))
    assert not list(foreign_module_writes("from . import utils\nutils.VALUE = 1"))
    assert list(lightning_model_imports("from ..lightning_model import Mvfa, checkpoint_feature_pipeline"))
    assert list(lightning_model_imports("from .. import lightning_model"))
    assert list(lightning_model_imports("import anomalib_mvfa.lightning_model"))
    assert not list(lightning_model_imports("from ..lightning_model import Mvfa"))
    assert list(global_warning_filters("import warnings\nwarnings.filterwarnings('ignore')"))
    assert not list(
        global_warning_filters("import warnings\nwith warnings.catch_warnings():\n    warnings.simplefilter('ignore')")
    )
    assert not list(global_warning_filters("import warnings\nwarnings.filterwarnings('ignore', module='timm')"))
    entered = "def f(self):\n    self.scope = warnings.catch_warnings()\n    self.scope.__enter__()\n"
    assert not list(global_warning_filters(f"import warnings\n{entered}    warnings.simplefilter('ignore')"))
    not_entered = "def f(self):\n    self.scope = warnings.catch_warnings()\n    other.__enter__()\n"
    assert list(global_warning_filters(f"import warnings\n{not_entered}    warnings.simplefilter('ignore')"))
    assert class_lengths("class A:\n    x = 1\n\n    def f(self):\n        pass\n") == {"A": 5}


# --------------------------------------------------------------------------- the package


def findings(rule, paths: list[Path], **arguments) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} {finding}"
        for path in paths
        for finding in rule(path.read_text(), **arguments)
    ]


def test_only_compat_touches_private_internals_of_other_libraries() -> None:
    assert findings(private_internals, modules(but=(COMPAT,))) == []


def test_only_compat_swaps_classes() -> None:
    assert findings(class_swaps, modules(but=(COMPAT,))) == []


def test_no_module_writes_a_global_of_another_package() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)} {finding}"
        for path in modules(but=(COMPAT,))
        for finding in foreign_module_writes(path.read_text(), module_name(path), path.name == "__init__.py")
    ]
    assert found == []


@pytest.mark.parametrize("folder", TOOL_FOLDERS)
def test_tools_use_the_lightning_module_only_through_mvfa(folder: str) -> None:
    allowed = () if folder == "support" else ("Mvfa",)
    found = [
        f"{path.relative_to(PACKAGE.parent)} {finding}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for finding in lightning_model_imports(path.read_text(), module_name(path), path.name == "__init__.py", allowed)
    ]
    assert found == []


def test_no_process_wide_warning_filter() -> None:
    assert findings(global_warning_filters, modules()) == []


@pytest.mark.parametrize(("file", "name"), sorted(MAX_CLASS_LINES))
def test_the_central_classes_stay_small(file: str, name: str) -> None:
    length = class_lengths((PACKAGE / file).read_text())[name]
    assert length <= MAX_CLASS_LINES[file, name], f"{name} is {length} lines"
