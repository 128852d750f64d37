"""CommunicationMonitor's argument checks (the real loggers on real processes:
tests/multiprocess/test_monitor.py)."""

from __future__ import annotations

import pytest

from lightning_fedopt.callbacks import CommunicationMonitor


def test_monitor_bad_argument():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        CommunicationMonitor(log_every_n_steps=0)
