"""Heterogeneous local work: the argument checks of wall-clock-bounded rounds, without processes
(a deliberately slow rank: tests/multiprocess/test_heterogeneous.py)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf


@pytest.mark.parametrize(
    "factory",
    [
        lambda: lf.LocalSGDStrategy(round_seconds=0.0),
        lambda: lf.NoLoCoStrategy(round_seconds=1.0),
        lambda: lf.FedSpeedStrategy(round_seconds=1.0),
        lambda: lf.DiLoCoStrategy(sync_every=8, fragments=2, round_seconds=1.0),
    ],
)
def test_round_seconds_bad_input(factory):
    with pytest.raises(ValueError, match="round_seconds"):
        factory()
