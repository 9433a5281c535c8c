"""Every module states its public names in ``__all__``; tools and README's Python use only those names.

A module's ``__all__`` names only things it has, and every top-level function or class without a leading
underscore is in it (a helper meant for the module alone carries the underscore). Tools (``tools/*.py``)
and the README's Python block are the package's first users: what they import from ``gift_quant`` (``from
gift_quant.x import name``, or ``import gift_quant.x as m`` then ``m.name``) must be public.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gift_quant"
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def _public_defs(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not n.name.startswith("_")}


def _declares_all(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
               for n in tree.body)


@pytest.mark.parametrize("name", MODULES)
def test_module_states_its_public_names(name):
    path = Path(importlib.util.find_spec(name).origin)
    tree = ast.parse(path.read_text())
    defined = _public_defs(tree)
    if path.name == "__init__.py" and not defined and not _declares_all(tree):
        return  # a folder's __init__ holding only its one-sentence docstring: nothing to state
    assert _declares_all(tree), f"{name} has no __all__"
    module = importlib.import_module(name)
    names = list(module.__all__)
    assert len(names) == len(set(names)), f"{name}.__all__ repeats a name"
    missing = [x for x in names if not hasattr(module, x)]
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"
    assert not [x for x in names if x.startswith("_")], f"{name}.__all__ names a private name"
    assert defined <= set(names), f"{name}: public but not in __all__: {sorted(defined - set(names))}"


def _is_submodule(module: str, name: str) -> bool:
    return importlib.util.find_spec(module).submodule_search_locations is not None and \
        importlib.util.find_spec(f"{module}.{name}") is not None


def _uses(tree: ast.AST) -> list[tuple[str, str]]:
    """(module, name) for every name taken from gift_quant: ``from m import name`` and ``alias.name``
    after ``import m as alias`` or ``import gift_quant``."""
    uses, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "gift_quant":
            uses += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "gift_quant" and (a.asname or a.name == "gift_quant"):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.append((aliases[node.value.id], node.attr))
    return uses


def _readme_python() -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S))


USERS = {f"tools/{f.name}": ast.parse(f.read_text()) for f in sorted((ROOT / "tools").glob("*.py"))}
USERS["README.md"] = ast.parse(_readme_python())


@pytest.mark.parametrize("user", sorted(USERS))
def test_tools_and_readme_use_only_public_names(user):
    uses = _uses(USERS[user])
    private = sorted({f"{m}.{n}" for m, n in uses
                      if not _is_submodule(m, n) and n not in getattr(importlib.import_module(m), "__all__", ())})
    assert not private, f"{user} uses names its module does not make public: {private}"


def test_the_checks_see_the_readme_api():
    """The scan finds what README's block takes from the package (it would pass vacuously otherwise)."""
    uses = set(_uses(USERS["README.md"]))
    assert {("gift_quant", "load"), ("gift_quant", "load_tokenizer")} <= uses
    assert ("gift_quant.workflows.commands", "run_eval_ppl") in uses
