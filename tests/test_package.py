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
    assert len(names) <= 36
    index = (ROOT / "docs" / "api" / "index.md").read_text()
    assert all(f"`{n}`" in index for n in names), sorted(n for n in names if f"`{n}`" not in index)
    from lightning_prune import migration

    assert {"upgrade_state_dict", "convert_on_load", "make_permanent"} <= set(migration.__all__)


def _sources() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{name}: from {node.module} import {alias.name}"
        for name, tree in _sources().items()
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
    assert len((PACKAGE / "callback.py").read_text().splitlines()) <= 405  # issue 29: 5 marked lines
