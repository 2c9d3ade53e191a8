"""A griffe extension for the API reference: the docstrings of ``lightning_prune`` are written for ``help()``
and Sphinx-style readers (``:class:`~lightning_prune.store.MaskStore```, ``Example::`` blocks of doctests).
For the site, roles become cross-references (or code where the target is not documented) and ``Example::``
becomes Google style's ``Examples:`` section, so that the doctests render as code.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``); nothing here is part of
the package.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")
_API = Path(__file__).parent / "api"
_EXAMPLE = re.compile(r"^(\s*)Examples?(?: \(([^)]*)\))?::\s*$", re.MULTILINE)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and ``Example::`` blocks in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The full path of a documented object that ``target`` names, seen from ``obj``; ``None`` if none."""
    scopes = []
    o: griffe.Object | None = obj
    while o is not None:
        scopes.append(o.path)
        o = o.parent
    candidates = [target] + [f"{scope}.{target}" for scope in scopes]
    for path in candidates:
        if not path.startswith(pkg.path + ".") and path != pkg.path:
            continue
        try:
            found = pkg[path[len(pkg.path) + 1 :]] if path != pkg.path else pkg
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if found.is_alias:
            try:
                found = found.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
        if any(part.startswith("_") for part in found.path.split(".")):
            return None  # private: not rendered
        module = found if found.is_module else found.module
        if not (_API / f"{module.path.rpartition('.')[2]}.md").is_file():
            return None  # a module without a page of its own in docs/api/
        return found.path
    return None


def _rewrite(text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    def role(match: re.Match[str]) -> str:
        short, target, explicit = match.group(1), match.group(2).strip(), match.group(3)
        if explicit:
            label, target = target, explicit.strip()
        else:
            label = target.rsplit(".", 1)[-1] if short else target
        path = _resolve(target, obj, pkg)
        return f"[`{label}`][{path}]" if path else f"`{label}`"

    text = _ROLE.sub(role, text)
    return _EXAMPLE.sub(lambda m: f"{m.group(1)}Examples:", text)
