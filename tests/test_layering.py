"""The package's import graph, read from the source with ``ast`` (nothing is imported).

* no cycle between the modules of ``lightning_fedopt`` (imports inside functions count too: a
  lazy import that closes a cycle is still a cycle, just one that fails later; imports under
  ``if TYPE_CHECKING:`` do not);
* ``lightning_fedopt.comm`` (the network) imports nothing from ``lightning_fedopt.compression``:
  compression is built on the network, not the other way round;
* only ``lightning_fedopt/comm.py`` imports :mod:`torch.distributed`, in any form.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "lightning_fedopt"
ROOT = Path(__file__).resolve().parent.parent / PKG


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import outside ``if TYPE_CHECKING:``."""
    out: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, [], child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                out.append((base, [a.name for a in child.names], child.lineno))
            visit(child)

    visit(tree)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, list[str], int]]]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    raw: dict[str, list[tuple[str, list[str], int]]] = {}
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        raw[m] = _imports(tree, m, path.name == "__init__.py")
        for target, names, _ in raw[m]:
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            for t in subs or [target]:
                if t in mods and t != m:
                    edges[m].add(t)
    return edges, raw


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_graph_is_read_from_every_module():
    edges, _ = _graph()
    assert f"{PKG}.comm" in edges and f"{PKG}.compression.collective" in edges
    assert f"{PKG}.comm" in edges[f"{PKG}.compression.collective"]  # compression is built on comm


def test_no_import_cycle():
    edges, _ = _graph()
    cycles = _cycles(edges)
    detail = [{m: sorted(edges[m] & set(c)) for m in c} for c in cycles]
    assert not cycles, f"import cycles between modules of {PKG}: {detail}"


def test_comm_imports_nothing_from_compression():
    _, raw = _graph()
    bad = [(t, line) for t, _, line in raw[f"{PKG}.comm"] if t.startswith(f"{PKG}.compression")]
    bad += [(t, line) for t, names, line in raw[f"{PKG}.comm"] if t == PKG and "compression" in names]
    assert not bad, f"lightning_fedopt/comm.py imports compression: {bad}"


def _uses_torch_distributed(target: str, names: list[str]) -> bool:
    if target == "torch.distributed" or target.startswith("torch.distributed."):
        return True
    return target == "torch" and "distributed" in names


def _attribute_uses(tree: ast.AST) -> list[int]:
    """Lines that spell ``torch.distributed`` as an attribute (``torch.distributed.barrier()``)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    ]


def test_only_comm_imports_torch_distributed():
    _, raw = _graph()
    offenders = {
        m: [line for t, names, line in imports if _uses_torch_distributed(t, names)]
        for m, imports in raw.items()
        if m != f"{PKG}.comm"
    }
    for m, path in _modules().items():  # `import torch` then `torch.distributed.<...>`
        if m != f"{PKG}.comm":
            offenders.setdefault(m, []).extend(_attribute_uses(ast.parse(path.read_text())))
    offenders = {m: lines for m, lines in offenders.items() if lines}
    assert not offenders, f"modules other than comm.py importing torch.distributed (lines): {offenders}"


def test_the_checks_catch_what_they_look_for():
    """Each form of import the rules are about is recognised (on made-up sources)."""
    forms = [
        "import torch.distributed",
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import GradBucket",
        "from torch.distributed.algorithms import join",
        "def f():\n    import torch.distributed as dist",
    ]
    for src in forms:
        imports = _imports(ast.parse(src), f"{PKG}.x", False)
        assert any(_uses_torch_distributed(t, n) for t, n, _ in imports), src
    assert _attribute_uses(ast.parse("import torch\ntorch.distributed.barrier()")) == [2]
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch.distributed\n"
    assert not any(_uses_torch_distributed(t, n) for t, n, _ in _imports(ast.parse(guarded), "m", False))
    rel = _imports(ast.parse("from ..comm import Communicator"), f"{PKG}.compression.collective", False)
    assert rel[0][0] == f"{PKG}.comm"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
