"""FedSpeed's argument checks, without processes (the real processes:
tests/multiprocess/test_fedspeed.py)."""

from __future__ import annotations

import pytest

import lightning_fedopt as lf


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"rho": -0.1}, "rho"),
        ({"perturb_alpha": 1.5}, "perturb_alpha"),
        ({"prox_lambda": 0.0}, "prox_lambda"),
        ({"participation": 0.5}, "participation"),
        ({"group_size": 2}, "group_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.FedSpeedStrategy(**kwargs)
