"""A crafted pickle for the trust tests (tests/unit/test_trust.py and tests/multiprocess/test_trust.py)."""

from __future__ import annotations

from typing import Any


class Payload:
    """Unpickling it creates the file ``marker`` (what a crafted pickle could do instead: anything)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))
