"""Imports run one way: a module imports only modules of its own or a lower layer, and never in a cycle.

The layer order is written once, here. Every import inside the package counts, including the ones
inside functions (a lazy import is still a dependency). A new module must be placed in a layer.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gift_quant"

# lowest first: one folder (subpackage) per layer; a folder's modules import each other freely (no cycles)
LAYERS: list[tuple[str, list[str]]] = [
    ("util: process plumbing", ["gift_quant.util*"]),
    ("config: settings", ["gift_quant.config*"]),
    ("data: text in, token windows out", ["gift_quant.data*"]),
    ("model: Hugging Face models, blocks, activation capture", ["gift_quant.model*"]),
    ("packed: the native on-disk format", ["gift_quant.packed*"]),
    ("quant: grid, statistics, sensitivity, GPTQ, RTN, engine", ["gift_quant.quant*"]),
    ("recover: trainable layers, objectives, training", ["gift_quant.recover*"]),
    ("eval: perplexity, zero-shot", ["gift_quant.eval*"]),
    ("export: serving formats and inspect", ["gift_quant.export*"]),
    ("workflows: the commands as stage sequences", ["gift_quant.workflows*"]),
    ("compare: method comparisons", ["gift_quant.compare*"]),
    ("cli: the command line", ["gift_quant.cli*"]),
    ("public API", ["gift_quant"]),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    names = [base]
    # "from . import datasets" imports a submodule
    if node.module is None:
        names = [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n == "gift_quant" or n.startswith("gift_quant.")]


def package_imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("gift_quant")]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, path.name == "__init__.py", node)
            for t in targets:
                # "from .recover.model import x" depends on gift_quant.recover.model; "from . import y" on y
                while t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: put it in a folder of LAYERS in {__file__}")


def test_modules_live_in_layer_folders():
    """The tree is the architecture: besides the public API's __init__, every module sits in a layer folder."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    loose = [m for m, p in modules.items() if p.parent == PACKAGE and p.name != "__init__.py"]
    assert not loose, f"modules outside a layer folder: {loose}"


def test_every_folder_says_what_it_is():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.strip(), f"{init} has no one-sentence docstring"


def test_every_module_has_a_layer():
    for module in package_imports():
        layer_of(module)


def test_no_upward_imports():
    bad = []
    for mod, deps in package_imports().items():
        for d in sorted(deps):
            if d == "gift_quant":
                continue  # the package's own __init__ re-exports only
            if layer_of(d) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {d for d in deps if d != "gift_quant"} for m, deps in package_imports().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
