"""NoLoCo on real processes: the reference's pairs and momentum, and no collective during training."""

from __future__ import annotations

import torch
from modules import KnownBatchModule
from reference_outer import reference_noloco
from runners import CountDistCalls, assert_close_state, fit_fork

import lightning_fedopt as lf
from lightning_fedopt.strategies.diloco.noloco import pair_groups


def test_noloco_three_ranks_matches_reference_without_collectives(tmp_path):
    """3 replicas (one sits out each round), H=3, 12 steps, no final sync: each rank equals the
    reference (the paper's two-term formula), during training no collective was made at all (only
    batched point-to-point), and each exchange sent one model (fp32 parameters + a finite flag)."""
    tmp_path.mkdir(exist_ok=True)
    ranks = fit_fork(
        tmp_path / "out",
        KnownBatchModule(),
        lf.NoLoCoStrategy(sync_every=3, seed=5, final_sync=False, start_method="fork"),
        n=3,
        max_steps=12,
        callbacks=[CountDistCalls(tmp_path)],
    )
    ref = reference_noloco(3, 12, 3, lambda r: pair_groups(r, 3, seed=5), final_sync=False)
    for r in range(3):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
        rec = torch.load(tmp_path / f"calls{r}.pt", weights_only=False)
        calls = dict(rec["calls"])
        exchanges = calls.pop("batch_isend_irecv")
        assert sum(calls.values()) == 0, rec["calls"]
        p2p = (
            rec["after"]["by_op"]["send"]["rounds"]
            - rec["before"]["by_op"].get("send", {"rounds": 0})["rounds"]
        )
        paired = sum(len(g) == 2 and r in g for k in range(4) for g in pair_groups(k, 3, seed=5))
        assert p2p == paired and exchanges == paired
        sent = (
            rec["after"]["by_op"]["send"]["bytes_sent"]
            - rec["before"]["by_op"].get("send", {"bytes_sent": 0})["bytes_sent"]
        )
        n_values = sum(v.numel() for v in ref[r].values())
        assert sent == paired * 4 * (n_values + 1)
    assert not torch.equal(ranks[0]["state_dict"]["net.0.weight"], ranks[1]["state_dict"]["net.0.weight"])


def test_noloco_final_average_and_nan(tmp_path):
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(nan_at=(0, 4)),
        lf.NoLoCoStrategy(sync_every=3, start_method="fork"),
        max_steps=8,
    )
    assert_close_state(ranks[0]["state_dict"], ranks[1]["state_dict"], atol=0.0)
    assert all(torch.isfinite(v).all() for v in ranks[0]["state_dict"].values())
    assert ranks[0]["nonfinite_events"][0]["local"] == 1
