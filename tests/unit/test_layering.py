"""The package's import graph, read from the source with ``ast`` (nothing is imported).

* no cycle between the modules of ``lightning_fedopt`` (imports inside functions count too: a
  lazy import that closes a cycle is still a cycle, just one that fails later; imports under
  ``if TYPE_CHECKING:`` do not);
* ``lightning_fedopt.comm`` (the network) imports nothing from ``lightning_fedopt.compression``:
  compression is built on the network, not the other way round;
* only ``lightning_fedopt/comm.py`` imports :mod:`torch.distributed`, in any form;
* the layers: ``errors`` imports nothing of the package; ``runtime`` (the replica runtime's parts)
  imports neither the strategies, the callbacks nor ``fault_tolerance``; ``fault_tolerance`` not the
  strategies nor the callbacks; an algorithm family (``strategies.local_sgd``, ``strategies.diloco``,
  ``strategies.gossip``) imports another only for the parts listed in ``SHARED_ALGORITHM_PARTS``;
* composition over inheritance: no class inherits more than two of the package's own classes, and
  no class reads a private attribute (``_name``) that another of the package's classes owns, on
  ``self`` (a base class's) or on another object (a part's): parts talk through public names;
* no ``# type: ignore[attr-defined]`` in the package (the type checker runs in CI).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "lightning_fedopt"
ROOT = Path(__file__).resolve().parents[2] / PKG


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


# ---------------------------------------------------------------------------------------- layers
#: modules of one algorithm family that another family may import (shared algorithm parts)
SHARED_ALGORITHM_PARTS = {f"{PKG}.strategies.local_sgd.sam"}  # SAM: FedSpeed's and DFedSAM's (gossip)


def _layer_violations() -> list[str]:
    _, raw = _graph()
    bad = []
    for m, imports in raw.items():
        targets = {t for t, _, _ in imports if t == PKG or t.startswith(PKG + ".")}
        if m == f"{PKG}.errors":
            bad += [f"{m} -> {t}" for t in targets]
        if m.startswith(f"{PKG}.runtime"):
            bad += [
                f"{m} -> {t}"
                for t in targets
                if t.startswith((f"{PKG}.strategies", f"{PKG}.callbacks", f"{PKG}.fault_tolerance"))
            ]
        if m.startswith(f"{PKG}.fault_tolerance"):
            bad += [f"{m} -> {t}" for t in targets if t.startswith((f"{PKG}.strategies", f"{PKG}.callbacks"))]
        for family in ("local_sgd", "diloco", "gossip"):
            if m.startswith(f"{PKG}.strategies.{family}"):
                for t in targets:
                    other = t.startswith(f"{PKG}.strategies.") and not t.startswith(
                        f"{PKG}.strategies.{family}"
                    )
                    shared = t in SHARED_ALGORITHM_PARTS or t.split(".")[2:3] in (["replica"], ["ddp"])
                    if other and not shared:
                        bad.append(f"{m} -> {t}")
    return bad


def test_layers():
    bad = _layer_violations()
    assert not bad, f"imports against the layering rule: {bad}"


# ---------------------------------------------------------------------------------------- composition
def _classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Every class of the package, by name: ``[(module, node)]``."""
    out: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for m, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append((m, node))
    return out


def _base_names(node: ast.ClassDef) -> list[str]:
    names = []
    for b in node.bases:
        if isinstance(b, ast.Name):
            names.append(b.id)
        elif isinstance(b, ast.Attribute):
            names.append(b.attr)
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


def _owned(node: ast.ClassDef) -> set[str]:
    """The private names a class defines: its ``_methods``, class attributes and the ``self._x``
    it assigns."""
    owned = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(item.name):
            owned.add(item.name)
        elif isinstance(item, ast.Assign):
            owned |= {t.id for t in item.targets if isinstance(t, ast.Name) and _is_private(t.id)}
        elif (
            isinstance(item, ast.AnnAssign)
            and isinstance(item.target, ast.Name)
            and _is_private(item.target.id)
        ):
            owned.add(item.target.id)
    for sub in ast.walk(node):
        targets: list[ast.expr] = []
        if isinstance(sub, ast.Assign):
            targets = list(sub.targets)
        elif isinstance(sub, (ast.AnnAssign, ast.AugAssign)):
            targets = [sub.target]
        for t in targets:
            for el in ast.walk(t):
                if (
                    isinstance(el, ast.Attribute)
                    and isinstance(el.value, ast.Name)
                    and el.value.id == "self"
                    and _is_private(el.attr)
                ):
                    owned.add(el.attr)
    return owned


#: where a class may not read its (project) base classes' private attributes either: the machinery
#: that owns parts (compressors and merge schemes keep template-method bases with protected state)
STRICT = (f"{PKG}.runtime", f"{PKG}.fault_tolerance", f"{PKG}.strategies")


def _ancestors(
    name: str, classes: dict[str, list[tuple[str, ast.ClassDef]]], seen: set[str] | None = None
) -> set[str]:
    seen = set() if seen is None else seen
    for _, node in classes.get(name, []):
        for b in _base_names(node):
            if b in classes and b not in seen:
                seen.add(b)
                _ancestors(b, classes, seen)
    return seen


def _private_reads() -> list[str]:
    """``Class reads holder._x`` for every private attribute a class reads that another of the
    package's classes owns: on another object (a part's), or on ``self`` when a base class owns it
    (in the :data:`STRICT` packages)."""
    classes = _classes()
    owned = {name: set().union(*(_owned(node) for _, node in defs)) for name, defs in classes.items()}
    owners: dict[str, set[str]] = {}
    for name, attrs in owned.items():
        for attr in attrs:
            owners.setdefault(attr, set()).add(name)
    bad = []
    for name, defs in classes.items():
        inherited = set().union(*(owned[a] for a in _ancestors(name, classes))) - owned[name]
        for m, node in defs:
            for sub in ast.walk(node):
                if not isinstance(sub, ast.Attribute) or not _is_private(sub.attr) or sub.attr in owned[name]:
                    continue
                holder = ast.unparse(sub.value)
                if holder in ("self", "cls", "super()"):
                    if m.startswith(STRICT) and sub.attr in inherited:
                        bad.append(f"{m}.{name} reads {holder}.{sub.attr} (a base class's)")
                elif sub.attr in owners:
                    bad.append(f"{m}.{name} reads {holder}.{sub.attr} (owned by {sorted(owners[sub.attr])})")
    return bad


def test_no_class_inherits_more_than_two_of_the_packages_classes():
    classes = _classes()
    heavy = {
        f"{m}.{name}": ours
        for name, defs in classes.items()
        for m, node in defs
        if len(ours := [b for b in _base_names(node) if b in classes]) > 2
    }
    assert not heavy, f"classes built from more than two of the package's classes: {heavy}"


def test_no_class_reads_another_classs_private_attributes():
    bad = _private_reads()
    assert not bad, "private attributes read across classes:\n" + "\n".join(bad)


def test_no_attr_defined_type_ignores():
    hits = [
        f"{path.relative_to(ROOT.parent)}:{i}"
        for path in sorted(ROOT.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "type: ignore[attr-defined]" in line
    ]
    assert not hits, f"`# type: ignore[attr-defined]` left in the package: {hits}"
