"""``strategy="muloco"`` on 2 real gloo ranks against the single-process reference of
tests/unit/test_muloco.py (Muon inside, 2-bit error-feedback pseudo-gradients, outer Nesterov SGD),
every byte of the synchronisations counted; a BatchNorm net's statistics travel exact."""

from __future__ import annotations

import pytest
from runners import TIMEOUT, assert_close_state, fit_fork
from unit.test_muloco import MuonModule, bn_net, ref_nbytes, reference_muloco

from lightning_fedopt.strategies.diloco.muloco import MuLoCoStrategy

BITS = 2


@pytest.mark.multiprocess
def test_two_ranks_match_the_reference_and_count_every_byte(tmp_path):
    """Defaults except H=4 (12 steps: three rounds) on 2 gloo ranks, each training with
    MuonAdamW (Muon on ``net.0.weight``, AdamW on the rest): every rank equals the reference
    replica, which sends ``Q(e_r)`` with error feedback and steps the outer Nesterov SGD (lr 0.7,
    momentum 0.6) on the mean. Bytes: per round one all-reduce of the 3 fp32 counters and one
    all-gather of a 1-byte header + each tensor's codes and 4 fp32 levels (the 1-value bias
    travels dense, 4 bytes)."""
    strategy = MuLoCoStrategy(sync_every=4, start_method="fork", timeout=TIMEOUT)
    ranks = fit_fork(tmp_path, MuonModule(), strategy, max_steps=12)
    ref = reference_muloco(2, 12, 4)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
    exact = reference_muloco(2, 12, 4, compress=False)
    assert (ref[0]["net.0.weight"] - exact[0]["net.0.weight"]).abs().max() > 1e-4, "compression is real"
    # net.0.weight 64 values, net.0.bias 16, net.2.weight 16: compressed; net.2.bias: dense fp32
    message = 1 + ref_nbytes(64, BITS) + 2 * ref_nbytes(16, BITS) + 4
    assert message == 1 + (16 + 16) + 2 * (4 + 16) + 4
    for r in range(2):
        comm = ranks[r]["comm"]
        assert ranks[r]["sync_count"] == 3
        assert comm["by_op"]["all_gather"]["bytes_sent"] == 3 * message
        assert comm["by_purpose"]["sync"]["bytes_sent"] == 3 * (message + 3 * 4)


class BNMuonModule(MuonModule):
    """The test net with a BatchNorm layer (floating-point running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = bn_net()


@pytest.mark.multiprocess
def test_batchnorm_statistics_travel_exact(tmp_path):
    """A BatchNorm net, H=4, 8 steps, no re-estimation of the statistics: every rank equals the
    reference, whose parameters travel as 2-bit messages and whose running statistics become the
    replicas' exact mean (at 1e-6: a 2-bit message would be far off). Bytes per round:
    the counters twice (one exact all-reduce before the compressed message, one with the
    statistics), the parameters' message, the 2 x 16 fp32 statistics."""
    strategy = MuLoCoStrategy(sync_every=4, bn_recalibration=0, start_method="fork", timeout=TIMEOUT)
    ranks = fit_fork(tmp_path, BNMuonModule(), strategy, max_steps=8)
    ref = reference_muloco(2, 8, 4, bn=True)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-6)
    # net.0.weight 64 values; the BatchNorm gain and bias, net.3.weight 16 each; net.3.bias dense
    message = 1 + ref_nbytes(64, BITS) + 3 * ref_nbytes(16, BITS) + 4
    for r in range(2):
        comm = ranks[r]["comm"]
        assert comm["by_op"]["all_gather"]["bytes_sent"] == 2 * message
        assert comm["by_purpose"]["sync"]["bytes_sent"] == 2 * (3 * 4 + message + (2 * 16 + 3) * 4)
