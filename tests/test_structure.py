"""The package's layout holds: no import cycle, no jax in the grain workers, every exception in
``lens_jax/errors.py``, no module reaching into another's private names.

Read with ``ast`` only (nothing is imported), so these tests take about a second. In the import
graph every ``import`` of a ``lens_jax`` module counts, at module level or inside a function: a
function-level import is still a dependency, and a cycle through one is a cycle a reader has to
untangle. The last test runs each check on a small made-up package that breaks every rule.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = "lens_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Modules grain's worker processes (``data.worker_count > 0``) load: ``lens_jax.data.pipeline``
# (its ``_ExampleLoader`` is pickled to the workers, and unpickling imports its module), the
# record decoding, bucketing, tokenization and packing it calls. The closure over their imports
# is checked, so a module they import later is held to the same rule.
GRAIN_WORKER_MODULES = (
    "lens_jax.data.pipeline",
    "lens_jax.data.packing",
    "lens_jax.data.tokenize",
    "lens_jax.data.buckets",
    "lens_jax.data.records",
    "lens_jax.text",
)
JAX_PACKAGES = ("jax", "jaxlib", "flax", "optax")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported name: ``target`` the module (or ``module.attribute``) as written, absolute."""

    target: str
    names: tuple[str, ...]  # for ``from target import a, b``: ("a", "b"); () for ``import target``
    line: int


def _walk(tree: ast.AST, into_functions: bool) -> Iterable[ast.AST]:
    """``ast.walk``; without ``into_functions``, only what runs on import (class bodies do,
    function bodies do not)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if into_functions or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                        ast.Lambda)):
                todo.append(child)


def _imports(tree: ast.AST, module: str, is_package: bool,
             into_functions: bool = True) -> Iterable[Import]:
    for node in _walk(tree, into_functions):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of `module` (itself for a package)
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield Import(target, tuple(a.name for a in node.names), node.lineno)


@dataclasses.dataclass
class Package:
    root: Path
    modules: dict[str, Path]
    trees: dict[str, ast.Module]
    edges: dict[str, set[str]]     # module -> package modules it imports (anywhere in it)
    on_import: dict[str, set[str]]  # module -> top-level outside packages its import runs


def load_package(root: Path = ROOT) -> Package:
    """The package under ``root`` (a folder with ``__init__.py``), parsed, not imported."""
    package = root.name
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in modules.items()}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    on_import: dict[str, set[str]] = {m: set() for m in modules}

    def owning_module(name: str) -> str | None:
        # `lens_jax.a.b.func` -> `lens_jax.a.b`: the longest prefix that is a module.
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    for m, tree in trees.items():
        is_package = modules[m].name == "__init__.py"
        for imp in _imports(tree, m, is_package, into_functions=False):
            if imp.target.split(".")[0] != package:
                on_import[m].add(imp.target.split(".")[0])
        for imp in _imports(tree, m, is_package):
            if imp.target.split(".")[0] != package:
                continue
            # `from a import b` where b is a submodule depends on a.b (and, by Python's import
            # system, on a itself); `import a.b` depends on a.b and on a.
            targets = [imp.target] + [f"{imp.target}.{n}" for n in imp.names]
            for t in targets:
                owner = owning_module(t)
                if owner is not None and owner != m:
                    edges[m].add(owner)
    return Package(root, modules, trees, edges, on_import)


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the SCCs of the graph, each a list of nodes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                components.append(component)
    return components


def find_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One cycle inside a strongly connected component, as ``[a, b, ..., a]`` (breadth-first)."""
    members = set(component)
    start = min(component)
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(edges[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{component} is not strongly connected")


def cycles(package: Package) -> list[list[str]]:
    return [find_cycle(c, package.edges)
            for c in strongly_connected_components(package.edges) if len(c) > 1]


def imported_on_load(package: Package, roots: Iterable[str]) -> set[str]:
    """Package modules that may be imported with ``roots``: the closure over every package import
    (function-level ones too: the function may run in the worker) and the parent packages
    (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(package.edges[m])
        parts = m.split(".")
        todo.extend(".".join(parts[:n]) for n in range(1, len(parts)) if ".".join(parts[:n])
                    in package.modules)
    return seen


def jax_importers(package: Package, roots: Iterable[str]) -> dict[str, set[str]]:
    """Modules loaded with ``roots`` whose import runs ``import jax`` (or jaxlib, flax, optax)."""
    return {m: package.on_import[m] & set(JAX_PACKAGES)
            for m in sorted(imported_on_load(package, roots))
            if package.on_import[m] & set(JAX_PACKAGES)}


def exception_classes(package: Package) -> dict[str, str]:
    """Public exception classes: ``{"module.Class": "file:line"}``, found by their bases (a
    builtin exception, a name ending in ``Error`` / ``Exception``, or an exception class of the
    package itself)."""
    exceptions = {name for name, obj in vars(builtins).items()
                  if isinstance(obj, type) and issubclass(obj, BaseException)}
    classes = [(m, node) for m, tree in package.trees.items() for node in tree.body
               if isinstance(node, ast.ClassDef)]
    found: dict[str, str] = {}
    while True:  # until no class is added (a subclass may come before its base)
        before = len(exceptions)
        for m, node in classes:
            bases = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                     if isinstance(b, (ast.Name, ast.Attribute))}
            if bases & exceptions or any(b.endswith(("Error", "Exception")) for b in bases):
                exceptions.add(node.name)
                if not node.name.startswith("_"):
                    found[f"{m}.{node.name}"] = (
                        f"{package.modules[m].relative_to(package.root.parent)}:{node.lineno}")
        if len(exceptions) == before:
            return found


def private_reach_ins(package: Package) -> list[str]:
    """``from pkg.x import _name`` and ``x._name`` (x a package module bound by an import) in a
    module other than ``pkg.x``: "file:line: what"."""
    found = []
    name = package.root.name

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    for m, tree in package.trees.items():
        is_package = package.modules[m].name == "__init__.py"
        where = package.modules[m].relative_to(package.root.parent)
        bound: dict[str, str] = {}  # local name -> package module it is bound to
        for imp in _imports(tree, m, is_package):
            if imp.target.split(".")[0] != name:
                continue
            for n in imp.names:
                if private(n) and imp.target != m:
                    found.append(f"{where}:{imp.line}: from {imp.target} import {n}")
                elif f"{imp.target}.{n}" in package.modules:
                    bound[n] = f"{imp.target}.{n}"
            if not imp.names:
                bound[imp.target.split(".")[0]] = imp.target.split(".")[0]
        for node in ast.walk(tree):
            for alias in getattr(node, "names", ()):
                if isinstance(alias, ast.alias) and alias.asname and isinstance(node, ast.Import):
                    bound[alias.asname] = alias.name
                elif isinstance(alias, ast.alias) and alias.asname and alias.name in bound:
                    bound[alias.asname] = bound.pop(alias.name)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            # Dotted chain `a.b.c._x`: resolve `a.b.c` through the names bound by imports.
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in bound:
                continue
            target = ".".join([bound[value.id]] + chain[::-1])
            if target in package.modules and target != m:
                found.append(f"{where}:{node.lineno}: {target}.{node.attr}")
    return sorted(found)


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> Package:
    return load_package()


def test_no_import_cycle(package):
    """No strongly connected component of the import graph has more than one module."""
    found = cycles(package)
    assert not found, "import cycles in lens_jax:\n" + "\n".join(" -> ".join(c) for c in found)


def test_grain_worker_modules_do_not_import_jax(package):
    """The modules grain's worker processes load do not import jax, jaxlib, flax or optax.

    ``GRAIN_WORKER_MODULES``: the per-example loader and packer (``lens_jax.data.pipeline``'s
    ``_ExampleLoader`` is unpickled there, so its module is loaded too) and what they call.
    Only our own modules are held to this: ``import grain`` itself imports jax in grain 0.2.x.
    A module counts if its import runs ``import jax`` (module level or a class body); every
    ``lens_jax`` module it imports anywhere (function bodies too) is followed.
    """
    assert set(GRAIN_WORKER_MODULES) <= set(package.modules)
    offenders = jax_importers(package, GRAIN_WORKER_MODULES)
    assert not offenders, f"grain worker modules pull in jax: {offenders}"


def tfds_importers(package: Package, roots: Iterable[str]) -> dict[str, list[int]]:
    """Modules loaded with ``roots`` that import ``tensorflow_datasets`` anywhere (function bodies
    too): ``{module: [line, ...]}``."""
    found: dict[str, list[int]] = {}
    for m in sorted(imported_on_load(package, roots)):
        for node in ast.walk(package.trees[m]):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "tensorflow_datasets" or n.startswith("tensorflow_datasets.") for n in names):
                found.setdefault(m, []).append(node.lineno)
    return found


def test_grain_worker_modules_do_not_import_tensorflow_datasets(package):
    """Record decoding in the workers never imports tensorflow-datasets: imported from two
    prefetch threads of one worker at once it deadlocked in its lazy imports (benchmarks/data.py
    --workers 4 hung on 2026-12-02); ``lens_jax.data.example_proto`` defines the message instead."""
    offenders = tfds_importers(package, GRAIN_WORKER_MODULES)
    # opened by sources.open_source for a "tfds:" spec, in the main process before workers start
    offenders.pop("lens_jax.data.tfds_builder")
    assert not offenders, f"grain worker modules import tensorflow_datasets: {offenders}"
    # the finder works: the TFDS builder module imports it
    assert tfds_importers(package, ["lens_jax.data.tfds_builder"])


def test_exceptions_are_defined_in_errors(package):
    """Every public exception class lives in ``lens_jax/errors.py`` (private control-flow ones,
    ``_Name``, may stay where they are raised and caught)."""
    found = exception_classes(package)
    elsewhere = {k: v for k, v in found.items() if not k.startswith(f"{PACKAGE}.errors.")}
    assert not elsewhere, f"exception classes outside lens_jax/errors.py: {elsewhere}"
    assert len(found) >= 8  # CheckpointError, RecordError, OutputError, ... (the finder works)


def test_no_private_names_across_modules(package):
    found = private_reach_ins(package)
    assert not found, "modules reach into another's private names:\n" + "\n".join(found)


# --- the checks themselves can fail -----------------------------------------------------------


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Package:
    root = tmp_path / "fakepkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return load_package(root)


def test_checks_find_a_cycle_jax_a_private_reach_in_and_an_exception(tmp_path):
    pkg = _fake_package(tmp_path, {
        "sub/__init__.py": "",
        "sub/a.py": "from fakepkg.sub import b\n",
        "sub/b.py": "def f():\n    from . import c\n",  # relative, function-level
        "sub/c.py": "import fakepkg.sub.a as a\nx = a._hidden\n",
        "d.py": "from fakepkg.sub.a import _hidden\nimport fakepkg.e\n",
        "e.py": "import numpy\ndef f():\n    import jax\n",
        "w.py": "from fakepkg import e\nclass C:\n    import optax\n",
        "v.py": "def f():\n    from fakepkg import w\n",
        "x.py": "class BadInput(ValueError):\n    pass\nclass _Stop(Exception):\n    pass\n"
                "class Worse(BadInput):\n    pass\nclass Plain:\n    pass\n",
    })
    assert cycles(pkg) == [["fakepkg.sub.a", "fakepkg.sub.b", "fakepkg.sub.c", "fakepkg.sub.a"]]
    # e imports jax only inside a function: not on import; w's class body runs on import.
    assert jax_importers(pkg, ["fakepkg.e"]) == {}
    assert jax_importers(pkg, ["fakepkg.w"]) == {"fakepkg.w": {"optax"}}
    assert jax_importers(pkg, ["fakepkg.v"]) == {"fakepkg.w": {"optax"}}  # followed from f()
    assert private_reach_ins(pkg) == ["fakepkg/d.py:1: from fakepkg.sub.a import _hidden",
                                      "fakepkg/sub/c.py:2: fakepkg.sub.a._hidden"]
    assert exception_classes(pkg) == {"fakepkg.x.BadInput": "fakepkg/x.py:1",
                                      "fakepkg.x.Worse": "fakepkg/x.py:5"}
