import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# the `multiprocess` marker (set on every test that starts processes) and its run-time guard
from process_markers import (
    pytest_collection_modifyitems,
    pytest_runtest_call,
    pytest_runtest_setup,
)

__all__ = ["pytest_collection_modifyitems", "pytest_runtest_call", "pytest_runtest_setup"]

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
