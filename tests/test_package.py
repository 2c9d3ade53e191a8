"""The package as a whole: a light import, the public names, and the boundaries between its modules (torch's
pruning form in one module, no module importing another's private names)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_prune

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_prune"


@pytest.mark.slow  # a subprocess or a whole benchmark: over ten seconds
def test_import_adds_no_heavy_or_second_lightning_package() -> None:
    code = (
        "import sys, torch, pytorch_lightning\n"
        "before = set(sys.modules)\n"
        "import lightning_prune\n"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    added = set(eval(out.stdout))
    assert "lightning_prune" in added
    assert not added & {"torch_pruning", "matplotlib", "torchvision", "lightning", "transformers", "timm"}, added


def test_root_exports_what_users_call_and_the_api_index_lists_them() -> None:
    names = set(lightning_prune.__all__) - {"__version__"}
    assert all(hasattr(lightning_prune, n) for n in names)
    assert not names & {"upgrade_state_dict", "convert_on_load", "make_permanent"}  # lightning_prune.migration
    assert len(names) <= 42  # what users call, by task: grown with MoE-era features, never internals
    index = (ROOT / "docs" / "api" / "index.md").read_text()
    assert all(f"`{n}`" in index for n in names), sorted(n for n in names if f"`{n}`" not in index)
    from lightning_prune import migration

    assert {"upgrade_state_dict", "convert_on_load", "make_permanent"} <= set(migration.__all__)


def _sources() -> dict[str, ast.Module]:
    """Every module of the package by its path (``methods/wanda.py``)."""
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


# thin permanent aliases: names that saved files hold (a pickled function, pickled classes)
ALIASES = {"sparse_checkpoint.py", "_sparse_layers.py"}


def _imports(tree: ast.Module) -> set[str]:
    """The package modules a module imports (``lightning_prune.x.y``), at any depth of its code."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_prune"):
            found.add(node.module or "")
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_prune"))
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{name}: from {node.module} import {alias.name}"
        for name, tree in _sources().items()
        if name not in ALIASES
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_prune.")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_torch_pruning_form_is_known_to_reparam_only() -> None:
    """``<name>_orig`` / ``<name>_mask`` (torch's reparametrization) appear in code in reparam.py alone."""
    found = []
    for name, tree in _sources().items():
        if name == "reparam.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ("_orig", "_mask"):
                found.append(f"{name}:{node.lineno}")
    assert found == []


def test_callback_module_stays_thin() -> None:
    source = (PACKAGE / "callback.py").read_text()
    assert len(source.splitlines()) <= 400
    statements = [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.stmt)]
    assert len(statements) == len(set(statements))  # one statement a line: the cap is not met by packing


def _layer(module: str) -> str:
    """The concern a module belongs to: its subpackage, or ``core``."""
    parts = module.removeprefix("lightning_prune").lstrip(".").split(".")
    return parts[0] if parts[0] in ("methods", "files", "inference", "_utils") else "core"


@pytest.mark.parametrize(
    ("concern", "forbidden"),
    [
        ("_utils", {"core", "methods", "files", "inference"}),
        ("methods", {"files", "inference"}),
        ("files", {"methods", "inference"}),
    ],
)
def test_subpackages_import_only_downward(concern: str, forbidden: set[str]) -> None:
    drivers = {"lightning_prune.callback", "lightning_prune.step"}
    bad = []
    for name, tree in _sources().items():
        if _layer(name.replace("/", ".").removesuffix(".py")) != concern:
            continue
        for module in _imports(tree):
            if module in drivers or (_layer(module) in forbidden and module != "lightning_prune"):
                bad.append(f"{name} imports {module}")
    assert bad == []


def test_pure_modules_import_no_module_that_changes_a_model() -> None:
    """Schedules, targets, counting and N:M patterns are arithmetic; reports import no method."""
    allowed = {"lightning_prune._utils.checks", "lightning_prune.targets"}
    for name in ("schedules.py", "targets.py", "counting.py", "patterns.py", "shards.py"):
        modules = {m for m in _imports(_sources()[name]) if m.count(".") == 1 or m.startswith("lightning_prune._")}
        assert {m.rsplit(".", 1)[0] if m.count(".") > 1 else m for m in modules} <= allowed | {
            "lightning_prune._utils"
        }, (name, modules)
    assert not {m for m in _imports(_sources()["report.py"]) if m.startswith("lightning_prune.methods")}


def test_every_function_fits_on_one_screen() -> None:
    """At most 60 lines of body (the docstring not counted) in every function of the package."""
    long = []
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:]
                if body and (node.end_lineno or 0) - body[0].lineno + 1 > 60:
                    long.append(f"{name}:{node.name}")
    assert long == []


def test_names_that_saved_files_hold_stay_importable() -> None:
    from lightning_prune.files.checkpoint import _rebuild_from_bitmask_v1
    from lightning_prune.sparse_checkpoint import _rebuild_from_bitmask_v1 as alias

    assert alias is _rebuild_from_bitmask_v1
    assert f"{alias.__module__}.{alias.__qualname__}" == "lightning_prune.sparse_checkpoint._rebuild_from_bitmask_v1"
