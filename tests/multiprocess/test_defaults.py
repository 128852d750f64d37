"""The defaults from the evidence on 2 real gloo ranks: DiLoCo's outer learning rate by number of
replicas, CO2's outer momentum by world size, against the single-process references."""

from __future__ import annotations

import pytest
import torch
from modules import KnownBatchModule
from reference_outer import reference_co2, reference_diloco
from runners import TIMEOUT, assert_close_state, fit_fork

import lightning_fedopt as lf


@pytest.mark.multiprocess
def test_diloco_default_on_two_ranks_is_the_scaling_law_value(tmp_path):
    """DiLoCo with no outer arguments on 2 gloo ranks equals the reference with Nesterov SGD at
    lr 0.6 (M = 2), and not the one at 0.7 (the DiLoCo paper's, the old default)."""
    strategy = lf.DiLoCoStrategy(sync_every=4, start_method="fork", timeout=TIMEOUT)
    ranks = fit_fork(tmp_path, KnownBatchModule(), strategy, max_steps=12)

    def nesterov(lr):
        return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)

    ref = reference_diloco(2, 12, 4, outer=nesterov(0.6))
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    old = reference_diloco(2, 12, 4, outer=nesterov(0.7))
    assert (old[0]["net.0.weight"] - ref[0]["net.0.weight"]).abs().max() > 1e-4


@pytest.mark.multiprocess
def test_co2_default_on_two_ranks_has_no_outer_momentum(tmp_path):
    """CO2 with no outer_momentum on 2 processes takes beta = 0 (the authors' rule up to 16)."""
    strategy = lf.CO2Strategy(sync_every=3, start_method="fork", timeout=TIMEOUT)
    ranks = fit_fork(tmp_path, KnownBatchModule(), strategy, max_steps=13)
    ref = reference_co2(2, 13, 3, beta=0.0)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    old = reference_co2(2, 13, 3, beta=0.5)
    assert (old[0]["net.0.weight"] - ref[0]["net.0.weight"]).abs().max() > 1e-4
