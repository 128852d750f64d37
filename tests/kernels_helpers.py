"""Whether triton is installed, for the kernel tests (tests/unit/test_kernels.py and
tests/multiprocess/test_kernels.py)."""

from __future__ import annotations

HAS_TRITON = True
try:
    import importlib.util

    HAS_TRITON = importlib.util.find_spec("triton") is not None
except Exception:  # pragma: no cover
    HAS_TRITON = False
