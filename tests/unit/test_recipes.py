"""Lightning recipes (issue 16): argument checks and defaults, without processes (the recipes on
real processes: tests/multiprocess/test_recipes.py)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"bn_recalibration": -1}, "bn_recalibration"), ({"bn_forward": 3}, "bn_forward")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.DiLoCoStrategy(**kwargs)


def test_defaults():
    """BatchNorm statistics are re-estimated by default where the consensus is not the replicas'
    mean (outer optimizers, NoLoCo's momentum), not for plain averaging; validation of an
    unchanged model is skipped by default."""
    assert lf.DiLoCoStrategy().bn_recalibration == 8
    assert lf.CO2Strategy().bn_recalibration == 8
    assert lf.NoLoCoStrategy().bn_recalibration == 8
    assert lf.LocalSGDStrategy().bn_recalibration == 0
    assert lf.DiLoCoStrategy(bn_recalibration=0).bn_recalibration == 0
    assert lf.DiLoCoStrategy().skip_unchanged_validation
