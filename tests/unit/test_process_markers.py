"""The ``multiprocess`` marker by folder: every test module is in ``tests/unit/`` or
``tests/multiprocess/``, the tests of the second (and only those) carry the marker, and the run-time
guard fails an unmarked test that starts a process (tests/multiprocess/test_process_markers.py
checks the guard end to end, in a pytest run of its own)."""

from __future__ import annotations

from pathlib import Path

import conftest
import process_guard
import pytest
from process_guard import pytest_runtest_call

TESTS = Path(conftest.__file__).resolve().parent
UNIT, MULTIPROCESS = TESTS / "unit", TESTS / "multiprocess"


def test_every_test_module_is_classified():
    """A test module goes into unit/ (it starts no process) or multiprocess/ (it does); none stays
    directly in tests/."""
    left = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not left, f"move {left} to tests/unit/ or tests/multiprocess/"
    assert set(TESTS.glob("*/**/test_*.py")) <= set(UNIT.glob("test_*.py")) | set(
        MULTIPROCESS.glob("test_*.py")
    ), "test modules go directly in tests/unit/ or tests/multiprocess/"
    assert list(UNIT.glob("test_*.py")) and list(MULTIPROCESS.glob("test_*.py"))


def _collected(request: pytest.FixtureRequest) -> list[pytest.Item]:
    """Every test of this session, those `-m`/`-k` deselected included (the terminal reporter keeps
    them: the "N deselected" of its summary)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    deselected = reporter.stats.get("deselected", []) if reporter is not None else []
    return [*request.session.items, *deselected]


def test_marks_follow_the_folder(request):
    """Each collected test under multiprocess/ carries the marker, none under unit/ does."""
    items = _collected(request)
    assert any(item.path.resolve() == Path(__file__).resolve() for item in items)
    for item in items:
        path = item.path.resolve()
        if path.is_relative_to(MULTIPROCESS):
            assert item.get_closest_marker("multiprocess") is not None, item.nodeid
        elif path.is_relative_to(UNIT):
            assert item.get_closest_marker("multiprocess") is None, item.nodeid


class _Unmarked:
    nodeid = "tests/unit/test_x.py::test_y"

    def get_closest_marker(self, name: str) -> None:
        return None


def test_guard_fails_an_unmarked_test_that_started_a_process():
    guard = pytest_runtest_call(_Unmarked())
    next(guard)
    process_guard._started[0] += 1  # what a fork in the test would count
    try:
        with pytest.raises(pytest.fail.Exception, match=r"not marked `multiprocess`.*tests/multiprocess/"):
            guard.send(None)
    finally:
        process_guard._started[0] -= 1  # (else the guard fails this test, which started none)
    quiet = pytest_runtest_call(_Unmarked())
    next(quiet)
    with pytest.raises(StopIteration):  # nothing started: the test's result passes through
        quiet.send(None)
