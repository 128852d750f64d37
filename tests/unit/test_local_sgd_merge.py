"""LocalSGDStrategy(merge=...): merge rounds over given replicas in one process, and argument checks
(the real processes: tests/multiprocess/test_local_sgd_merge.py)."""

from __future__ import annotations

import pytest
import torch

import lightning_fedopt as lf
from lightning_fedopt.merging import Merge


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
