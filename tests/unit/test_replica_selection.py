"""Loss-based replica selection: its arguments (the partial-participation rounds on real processes:
tests/multiprocess/test_replica_selection.py)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf
from lightning_fedopt.data import ReplicaSelection


def test_selection_arguments():
    with pytest.raises(ValueError, match="participation"):
        lf.LocalSGDStrategy(selection=ReplicaSelection())  # full participation: nothing to select
    with pytest.raises(ValueError, match="selection"):
        lf.LocalSGDStrategy(participation=0.5, selection="loss")
    with pytest.raises(ValueError, match="group_size"):
        lf.LocalSGDStrategy(participation=0.5, selection=ReplicaSelection(), group_size=2)
