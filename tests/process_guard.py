"""The run-time guard of the ``multiprocess`` marker: a test that starts a process must carry it.

Tests that start real processes live in ``tests/multiprocess/``, whose tests ``tests/conftest.py``
marks ``multiprocess``, so ``pytest -m "not multiprocess"`` is the fast inner loop. A test elsewhere
that starts one would silently slow that loop down; this guard makes it fail instead, the first time
it runs: every process this interpreter starts is counted (``os.fork``, ``subprocess.Popen``,
``posix_spawn``/``system`` through audit hooks, and ``multiprocessing`` ``Process.start`` for the
spawn/forkserver methods, which raise no audit event), and a test without the marker whose setup or
call started one fails, naming the rule.
"""

from __future__ import annotations

import multiprocessing.process
import sys
from typing import Any

import pytest

#: audit events of a new process (multiprocessing's spawn and forkserver raise none: see below)
PROCESS_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system"}
)

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
            "`pytest -m 'not multiprocess'` would run it: tests that start processes go in "
            "tests/multiprocess/ (tests/conftest.py marks every test there)",
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
