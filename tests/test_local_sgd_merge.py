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


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"merge": "average"}, "merge"),
        ({"merge": "trimmed_mean", "participation": 0.5}, "merge"),
        ({"merge": lf.Merge("nna", f=1), "adaptive_weights": True}, "merge"),
    ],
)
def test_bad_merge_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lf.LocalSGDStrategy(**kwargs)


@pytest.mark.parametrize(
    "merge",
    [
        Merge("mean"),
        Merge("task_arithmetic"),
        Merge("dare", density=1.0),
        Merge("ties", density=1.0),
        Merge("model_stock"),
        Merge("variance_corrected"),
    ],
)
def test_a_round_of_identical_replicas_moves_by_their_delta(merge):
    """Four replicas that each moved by 1 from the last round's result: the round moves by 1 with
    every operator (task arithmetic and DARE used to add the four deltas up and move by 4)."""
    from lightning_fedopt.strategies.local_sgd.merge import merge_round

    base = [torch.zeros(3, 2), torch.zeros(2)]
    models = [[b + 1.0 for b in base] for _ in range(4)]
    merged, n_bad = merge_round(merge, models, 0, base=base)
    assert n_bad == 0
    for m in merged:
        torch.testing.assert_close(m, torch.ones_like(m))


def test_dare_round_averages_the_kept_deltas():
    """DARE at density 0.5 in a Local SGD round: each replica's delta, dropped and rescaled, counts
    1/N; over many coordinates the round moves by about the (common) delta, not N times it."""
    from lightning_fedopt.strategies.local_sgd.merge import merge_round

    base = [torch.zeros(4000)]
    models = [[torch.ones(4000)] for _ in range(4)]
    merged, _ = merge_round(Merge("dare", density=0.5, seed=3), models, 7, base=base)
    assert float(merged[0].mean()) == pytest.approx(1.0, abs=0.05)


def test_merge_round_leaves_out_non_finite_replicas():
    from lightning_fedopt.runtime.reduce import NoFiniteReplicaError
    from lightning_fedopt.strategies.local_sgd.merge import merge_round

    base = [torch.zeros(2)]
    models = [[torch.ones(2)], [torch.full((2,), float("nan"))], [torch.ones(2)]]
    merged, n_bad = merge_round(Merge("task_arithmetic"), models, 0, base=base)
    assert n_bad == 1
    torch.testing.assert_close(merged[0], torch.ones(2))
    with pytest.raises(NoFiniteReplicaError, match="nothing is left to merge"):
        merge_round(Merge("ties"), [models[1]], 0, base=base)


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
