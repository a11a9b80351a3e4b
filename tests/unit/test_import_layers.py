"""The import structure of the core: no cycles, and no arrow pointing back down the layers.

Read from the source (every ``import`` statement, module level or inside a function), so
a lazy import cannot hide an arrow. Layers, bottom up:

- ``piston.step``: imports nothing else of piston (and neither torch nor jax);
- ``piston.checkpoint``: the step layer only (plus the model cache location);
- ``piston.core`` (scheduler, KV cache): the step layer only;
- ``piston.executor``: never the engine or the front end;
- and no module imports a platform package (piston_cpu, piston_cuda, piston_tpu).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "common" / "piston"


def _module_name(path: Path) -> str:
    parts = ["piston", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The modules ``name`` imports (a ``from pkg import sub`` counts as pkg.sub when sub is
    a module), resolved to the modules of this tree and to top-level external names."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: {m for m in _imports(name) if m in MODULES} for name in MODULES}


def _layer_imports(prefix: str) -> dict[str, set[str]]:
    return {n: _imports(n) for n in MODULES if n == prefix or n.startswith(prefix + ".")}


def test_the_core_import_graph_has_no_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w == v or w == v.rpartition(".")[0]:
                continue  # a module importing its own package's __init__ is not an arrow between modules
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer, allowed", [
    ("piston.step", ("piston.step",)),
    ("piston.checkpoint", ("piston.step", "piston.checkpoint", "piston.model_resolver")),
    ("piston.core", ("piston.step", "piston.core")),
])
def test_lower_layers_import_only_what_lies_below_them(layer, allowed):
    bad = {n: sorted(m for m in imports if (m == "piston" or m.startswith("piston."))
                     and not m.startswith(allowed))
           for n, imports in _layer_imports(layer).items()}
    assert not {n: b for n, b in bad.items() if b}, f"{layer} imports above itself: {bad}"


def test_executors_never_import_the_engine_or_the_front_end():
    bad = {n: sorted(m for m in imports if m.startswith(("piston.engine", "piston.entrypoints")))
           for n, imports in _layer_imports("piston.executor").items()}
    assert not {n: b for n, b in bad.items() if b}, bad


@pytest.mark.parametrize("layer", ["piston.step", "piston.checkpoint", "piston.core", "piston.hal"])
def test_torch_free_layers_never_name_torch_or_jax(layer):
    bad = {n: sorted(m for m in imports if m.split(".")[0] in ("torch", "jax", "jaxlib"))
           for n, imports in _layer_imports(layer).items()}
    assert not {n: b for n, b in bad.items() if b}, bad


def test_the_core_never_imports_a_platform_package():
    bad = {n: sorted(m for m in imports if m.split(".")[0] in ("piston_cpu", "piston_cuda", "piston_tpu"))
           for n, imports in ((n, _imports(n)) for n in MODULES)}
    assert not {n: b for n, b in bad.items() if b}, bad
