"""The data flow goes one way: rules -> IR -> passes -> reference / codegen -> front end.

An ast scan of the sources (imports anywhere in a file, including inside functions, and
``importlib.import_module("...")`` / ``__import__("...")`` with a constant name):

* the rule side (dsl, ir, passes, reference, dtypes, optimizers/*) never imports ``codegen``;
* ``codegen/*`` never imports the front end (``fusedopt.optim``, ``fusedopt.torch_compat``, or the
  names the package re-exports from them);
* among ``fusedopt``'s modules only the front ends ``optim.py`` and ``window_optimizer.py`` import
  ``codegen`` (``window_optimizer.py`` lazily, inside the functions that reach the kernel).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fusedopt"
CODEGEN = ROOT / "codegen"

RULE_SIDE = ["dsl.py", "ir.py", "passes.py", "reference.py", "dtypes.py"]
FRONT_END_MODULES = {"fusedopt.optim", "fusedopt.torch_compat"}
FRONT_END_NAMES = {"optim", "torch_compat", "FusedOptimizer", "Adam", "AdamW", "SGD", "Lion"}


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of everything ``source`` (the module ``module``, e.g. "fusedopt.ir") imports;
    ``from pkg import name`` yields both "pkg" and "pkg.name"."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                mod = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _imports(path: Path) -> set[str]:
    # "fusedopt/optimizers/adam.py" -> "fusedopt.optimizers.adam"; an __init__ keeps its name, so
    # relative imports in it resolve against its own package
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return imported_modules(path.read_text(), module)


def _touches(names: set[str], top: str) -> list[str]:
    return sorted(n for n in names if n == top or n.startswith(top + "."))


def _rule_side_files() -> list[Path]:
    files = [PKG / f for f in RULE_SIDE] + sorted((PKG / "optimizers").glob("*.py"))
    assert all(f.exists() for f in files), [str(f) for f in files if not f.exists()]
    return files


@pytest.mark.parametrize("path", _rule_side_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_rule_side_never_imports_codegen(path):
    assert not _touches(_imports(path), "codegen"), f"{path.name} imports codegen"


FRONT_ENDS_WITH_KERNELS = ["fusedopt/optim.py", "fusedopt/window_optimizer.py"]


def test_only_front_ends_import_codegen_within_fusedopt():
    importers = sorted(str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if _touches(_imports(p), "codegen"))
    assert set(importers) <= set(FRONT_ENDS_WITH_KERNELS), importers


def test_window_optimizer_imports_codegen_lazily():
    """Importing fusedopt.window_optimizer (MicroAdam's front end; eager use, CPU-only installs) must not
    import codegen or triton: only the functions that reach the fused kernel import it."""
    tree = ast.parse((PKG / "window_optimizer.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = set()
    for node in top_level:
        names.update(imported_modules(ast.unparse(node), "fusedopt.window_optimizer"))
    assert not _touches(names, "codegen"), sorted(names)


def _codegen_files() -> list[Path]:
    return sorted(CODEGEN.rglob("*.py")) if CODEGEN.exists() else []


@pytest.mark.skipif(not _codegen_files(), reason="no codegen package yet")
@pytest.mark.parametrize("path", _codegen_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_codegen_never_imports_the_front_end(path):
    names = _imports(path)
    bad = sorted(n for n in names if any(n == m or n.startswith(m + ".") for m in FRONT_END_MODULES)
                 or (n.startswith("fusedopt.") and n.split(".", 1)[1] in FRONT_END_NAMES))
    assert not bad, f"{path.name} imports the front end: {bad}"


# ---- the scanner itself -------------------------------------------------------------------------

@pytest.mark.parametrize("source, module, expected", [
    ("import codegen.ops", "fusedopt.ir", "codegen.ops"),
    ("from codegen import ops", "fusedopt.ir", "codegen.ops"),
    ("def f():\n    from codegen.launch import eligible", "fusedopt.passes", "codegen.launch.eligible"),
    ("import importlib\nimportlib.import_module('codegen.ops')", "fusedopt.ir", "codegen.ops"),
    ("__import__('codegen')", "fusedopt.ir", "codegen"),
    ("from ..fusedopt import optim", "codegen.ops", "fusedopt.optim"),
    ("from fusedopt import FusedOptimizer", "codegen.ops", "fusedopt.FusedOptimizer"),
    ("from . import optim", "fusedopt.reference", "fusedopt.optim"),
    ("from .optimizers import adam", "fusedopt.__init__", "fusedopt.optimizers.adam"),
])
def test_scanner_finds_imports_in_every_form(source, module, expected):
    assert expected in imported_modules(source, module)


def test_scanner_flags_a_violation():
    names = imported_modules("def step():\n    from codegen import ops\n", "fusedopt.reference")
    assert _touches(names, "codegen") == ["codegen", "codegen.ops"]
