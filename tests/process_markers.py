"""The ``multiprocess`` marker: which tests start real processes, and a guard that checks it.

``pytest -m "not multiprocess"`` is the fast inner loop. Nobody has to remember the marker:

* **Classification** (at collection, :func:`starts_processes`): a test is ``multiprocess`` when
  its source, or any definition it reaches by name (module-level functions, classes, constants and
  fixtures of its module, and what it imports from the other modules of ``tests/``, transitively),

  - names a launcher: :data:`LAUNCHERS` (``fit_fork``, ``mp.start_processes``, ``subprocess``,
    ``os.fork``, ...), or
  - runs a Trainer (``.fit``/``.validate``/``.test``/``.predict``) configured for processes: a
    ``start_method=`` argument, ``devices=`` other than ``1``, a ``"..._fork"``/``"..._spawn"``
    strategy name, or ``trainer_kwargs(...)`` without ``devices=`` (its default is 2 devices).

  A test can also carry ``@pytest.mark.multiprocess`` itself.
* **Guard** (at run time, :func:`pytest_runtest_setup` and :func:`pytest_runtest_call`): every
  process started in this interpreter is counted (``os.fork``, ``subprocess.Popen``,
  ``posix_spawn``/``system`` through audit hooks, and ``multiprocessing`` ``Process.start`` for the
  spawn/forkserver methods, which raise no audit event), and a test without the marker that starts
  one fails, naming this module. So a test the reading above misses fails the first time it runs,
  instead of silently slowing the inner loop.
* ``tests/test_process_markers.py`` checks that every test module is classified as expected.
"""

from __future__ import annotations

import ast
import multiprocessing.process
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent

#: names (called functions, modules, attributes) that start processes wherever they appear
LAUNCHERS = frozenset(
    {
        "fit_fork",  # runners.fit_fork: a Trainer on n forked processes
        "start_processes",  # torch.multiprocessing.start_processes
        "subprocess",
        "Popen",
        "ProcessPoolExecutor",
        "spawn",  # torch.multiprocessing.spawn
        "fork",  # os.fork
        "posix_spawn",
        "Process",  # multiprocessing.Process
    }
)

#: Trainer methods that launch the strategy's processes
RUNS = frozenset({"fit", "validate", "test", "predict"})

#: helpers that build Trainer keyword arguments with several devices unless told ``devices=``
#: (read at their call sites, not through their bodies)
MULTI_DEVICE_BY_DEFAULT = frozenset({"trainer_kwargs"})

#: audit events of a new process (multiprocessing's spawn and forkserver raise none: see below)
PROCESS_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system"}
)


# ---------------------------------------------------------------------------------------------- reading
class _Module:
    """A test module's source: its module-level definitions and what it imports from ``tests/``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.defs: dict[str, list[ast.AST]] = {}
        self.imports: dict[str, tuple[str, str]] = {}
        self._index(self.tree.body)

    def _index(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs.setdefault(stmt.name, []).append(stmt)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name) and stmt.value is not None:
                            self.defs.setdefault(name.id, []).append(stmt.value)
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
                for alias in stmt.names:
                    self.imports[alias.asname or alias.name] = (stmt.module, alias.name)
            elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
                self._index(
                    [s for field in ("body", "orelse", "finalbody") for s in getattr(stmt, field, [])]
                )

    def find(self, qualname: str) -> ast.AST | None:
        """The definition of ``name`` or ``Class.name`` in this module."""
        node: Any = self.tree
        for part in qualname.split("."):
            node = next(
                (
                    n
                    for n in node.body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part
                ),
                None,
            )
            if node is None:
                return None
        return node


@cache
def _module(path: Path) -> _Module:
    return _Module(path)


def _local_module(name: str) -> _Module | None:
    """A module of ``tests/`` by its import name (``runners``, ``reference_outer``, ``test_monitor``)."""
    path = TESTS / f"{name}.py"
    return _module(path) if "." not in name and path.is_file() else None


def _is_one(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value in (1, "1")


def _reach(module: _Module, nodes: list[ast.AST]) -> Iterator[tuple[_Module, ast.AST]]:
    """Every AST node reachable from ``nodes`` through names defined in ``module`` or imported from
    ``tests/`` (each definition once), with the module it belongs to."""
    seen: set[tuple[Path, str]] = set()
    stack = [(module, n) for n in nodes]

    def follow(mod: _Module, name: str) -> None:
        if (mod.path, name) in seen or name in MULTI_DEVICE_BY_DEFAULT:
            return
        seen.add((mod.path, name))
        if name in mod.defs:
            stack.extend((mod, d) for d in mod.defs[name])
        elif name in mod.imports:
            source, original = mod.imports[name]
            other = _local_module(source)
            if other is not None:
                follow(other, original)

    while stack:
        mod, root = stack.pop()
        for node in ast.walk(root):
            yield mod, node
            if isinstance(node, ast.Name):
                follow(mod, node.id)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                other = _local_module(node.module)  # a function-local `from runners import X`
                for alias in node.names if other is not None else ():
                    follow(other, alias.name)


def starts_processes(module: _Module, nodes: list[ast.AST]) -> bool:
    """Whether the code of ``nodes`` (in ``module``) starts processes, by the rules of this module."""
    runs = multi = False
    for _, node in _reach(module, nodes):
        if isinstance(node, ast.Name) and node.id in LAUNCHERS:
            return True
        if isinstance(node, ast.Attribute) and node.attr in LAUNCHERS:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names]
            if any(n.split(".")[-1] in LAUNCHERS for n in names):
                return True
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in RUNS:
            runs = True
        if isinstance(node.func, ast.Name) and node.func.id in MULTI_DEVICE_BY_DEFAULT:
            multi |= not any(k.arg == "devices" for k in node.keywords)
        for k in node.keywords:
            if k.arg == "start_method":
                multi = True
            elif k.arg == "devices":
                multi |= not _is_one(k.value)
            elif k.arg == "strategy" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str):
                multi |= k.value.value.endswith(("_fork", "_spawn"))
        if runs and multi:
            return True
    return False


def _test_nodes(module: _Module, func: ast.AST, fixtures: tuple[str, ...] = ()) -> list[ast.AST]:
    """A test function and the module's definitions of the fixtures it asks for."""
    args = func.args if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    names = {a.arg for a in (args.posonlyargs + args.args + args.kwonlyargs)} if args else set()
    return [func, *(d for name in sorted(names | set(fixtures)) for d in module.defs.get(name, []))]


def classify_item(item: pytest.Item) -> bool:
    """Whether the collected test ``item`` starts processes (False for what is not a test function,
    e.g. a doctest)."""
    if not isinstance(item, pytest.Function) or item.path.suffix != ".py":
        return False
    module = _module(item.path.resolve())
    name = item.originalname if item.cls is None else f"{item.cls.__name__}.{item.originalname}"
    func = module.find(name)
    if func is None:  # defined elsewhere (imported, inherited, generated): judge the whole module
        return bool(process_tests(item.path))
    return starts_processes(module, _test_nodes(module, func, tuple(item.fixturenames)))


def process_tests(path: Path) -> list[str]:
    """The test functions (``name`` or ``Class.name``) of the module at ``path`` that start processes.

    Example:
        >>> "test_matches_reference_h4" in process_tests(TESTS / "test_local_sgd.py")
        True
        >>> process_tests(TESTS / "test_schedules.py")
        []
    """
    module = _module(Path(path).resolve())
    found = []
    for stmt in module.tree.body:
        funcs = [(stmt.name, stmt)] if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(stmt, ast.ClassDef) and stmt.name.startswith("Test"):
            funcs = [
                (f"{stmt.name}.{f.name}", f)
                for f in stmt.body
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            ]
        for name, func in funcs:
            if name.split(".")[-1].startswith("test") and starts_processes(module, _test_nodes(module, func)):
                found.append(name)
    return found


# ---------------------------------------------------------------------------------------------- hooks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts processes ``multiprocess``."""
    for item in items:
        if item.get_closest_marker("multiprocess") is None and classify_item(item):
            item.add_marker(pytest.mark.multiprocess)


_started = [0]


def processes_started() -> int:
    """Processes this interpreter has started so far (forks, subprocesses, multiprocessing)."""
    return _started[0]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in PROCESS_EVENTS:
        _started[0] += 1


_original_start = multiprocessing.process.BaseProcess.start


def _counted_start(self: multiprocessing.process.BaseProcess) -> None:
    _started[0] += 1
    _original_start(self)


sys.addaudithook(_audit)  # (audit hooks cannot be removed; this one only counts)
multiprocessing.process.BaseProcess.start = _counted_start  # type: ignore[method-assign]


def _check(item: pytest.Item, before: int) -> None:
    started = processes_started() - before
    if started and item.get_closest_marker("multiprocess") is None:
        pytest.fail(
            f"{item.nodeid} started {started} process(es) but is not marked `multiprocess`, so "
            "`pytest -m 'not multiprocess'` would run it: add `@pytest.mark.multiprocess`, or teach "
            "tests/process_markers.py the launcher it uses",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    """Fail a test whose fixtures started a process without the ``multiprocess`` marker."""
    before = processes_started()
    result = yield
    _check(item, before)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Fail a test that started a process without the ``multiprocess`` marker."""
    before = processes_started()
    result = yield
    _check(item, before)
    return result
