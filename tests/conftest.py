import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules (runners, modules, ...) by name

# the run-time guard of the `multiprocess` marker: a test without it that starts a process fails
from process_guard import pytest_runtest_call, pytest_runtest_setup

__all__ = ["pytest_runtest_call", "pytest_runtest_setup"]

TESTS = Path(__file__).resolve().parent
MULTIPROCESS = TESTS / "multiprocess"

#: tests/scripts/ holds programs the tests run as processes: not test modules, and not imported for
#: doctests (`--doctest-modules` would run their module-level code, e.g. reading their environment)
collect_ignore_glob = ["scripts/*.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `multiprocess` marker by folder: every test under tests/multiprocess/ carries it."""
    for item in items:
        path = item.path.resolve()
        if path.is_relative_to(MULTIPROCESS):
            item.add_marker(pytest.mark.multiprocess)


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _fresh_port():
    """Each multi-process run picks its own free port (Lightning keeps MASTER_PORT in os.environ)."""
    for var in ("MASTER_PORT", "MASTER_ADDR"):
        os.environ.pop(var, None)
    yield
    for var in ("MASTER_PORT", "MASTER_ADDR"):
        os.environ.pop(var, None)


try:  # property tests run on slow shared CI machines: no per-example deadline
    from hypothesis import settings

    settings.register_profile("ci", deadline=None, max_examples=100)
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
