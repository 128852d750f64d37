"""LocalSGDStrategy(merge=...): FedAvg rounds that combine the replicas with a merge operator."""

from __future__ import annotations

import pytest
import torch
from modules import KnownBatchModule, make_batch, make_net
from runners import TIMEOUT, assert_close_state, fit_fork

import lightning_fedopt as lf
from lightning_fedopt.merging import Contribution, ContributionSet, Merge


def reference_merge_rounds(n, steps, every, merge):
    """Replicas train on make_batch(r, step); every ``every`` steps they all become
    merge({(r, round): theta_r}, base = the previous round's result)."""
    nets = [make_net(0) for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets]
    base = [p.detach().clone() for p in nets[0].parameters()]
    rounds = 0
    for step in range(steps):
        for r in range(n):
            x, y = make_batch(r, step)
            opts[r].zero_grad()
            torch.nn.functional.mse_loss(nets[r](x), y).backward()
            opts[r].step()
        if (step + 1) % every == 0:
            s = ContributionSet(
                Contribution(r, rounds, tuple(p.detach().clone() for p in nets[r].parameters()))
                for r in range(n)
            )
            new = merge(s, base=base)
            with torch.no_grad():
                for m in nets:
                    for p, v in zip(m.parameters(), new):
                        p.copy_(v)
            base = [v.clone() for v in new]
            rounds += 1
    return [{f"net.{k}": v.detach().clone() for k, v in m.state_dict().items()} for m in nets]


def test_ties_rounds_match_reference(tmp_path):
    merge = Merge("ties", density=0.5)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        lf.LocalSGDStrategy(sync_every=4, merge=merge, start_method="fork", timeout=TIMEOUT),
        max_steps=8,
    )
    ref = reference_merge_rounds(2, 8, 4, merge)
    mean = reference_merge_rounds(2, 8, 4, Merge("mean"))
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    assert not torch.allclose(ref[0]["net.0.weight"], mean[0]["net.0.weight"], atol=1e-4)
    assert ranks[0]["comm"]["by_op"]["all_gather"]["rounds"] >= 2


@pytest.mark.parametrize("merge", [Merge("task_arithmetic"), Merge("dare", density=1.0)])
def test_task_arithmetic_and_dare_rounds_average_on_real_processes(tmp_path, merge):
    """Two ranks, H=4, 8 steps: task arithmetic (and DARE keeping every entry) of the replicas'
    deltas from the last round's result is their mean, so every rank ends as plain Local SGD does
    (before the fix each round added the two deltas up)."""
    from references import reference_local_sgd

    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        lf.LocalSGDStrategy(sync_every=4, merge=merge, start_method="fork", timeout=TIMEOUT),
        max_steps=8,
    )
    ref = reference_local_sgd(2, 8, lf.Periodic(4))
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)


def test_merge_needing_more_replicas_is_refused_at_setup(tmp_path):
    """Krum with f=5 needs 13 models: on 2 ranks it used to fall back to the mean silently every round."""
    with pytest.raises(Exception, match=r"ValueError: `merge` Merge\('krum', f=5\) needs 13 models"):
        fit_fork(
            tmp_path,
            KnownBatchModule(),
            lf.LocalSGDStrategy(sync_every=4, merge=Merge("krum", f=5), start_method="fork", timeout=TIMEOUT),
            max_steps=4,
        )
    with pytest.raises(
        Exception, match=r"ValueError: `merge` Merge\('slerp'\) interpolates exactly 2 models"
    ):
        fit_fork(
            tmp_path,
            KnownBatchModule(),
            lf.LocalSGDStrategy(sync_every=4, merge="slerp", start_method="fork", timeout=TIMEOUT),
            n=3,
            max_steps=4,
        )
