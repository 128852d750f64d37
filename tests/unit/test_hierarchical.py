"""Hierarchical groups: the group size must divide the world size (the groups on real processes:
tests/multiprocess/test_hierarchical.py)."""

from __future__ import annotations

import lightning as L
import pytest

import lightning_fedopt as lf


def test_group_size_must_divide_world_size():
    with pytest.raises(ValueError, match="group_size"):
        lf.LocalSGDStrategy(group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        L.Trainer(accelerator="cpu", devices=3, strategy=lf.DiLoCoStrategy(group_size=2), logger=False)
