"""Checkpoint/resume mid-round for the outer-optimizer strategies whose state lives per replica."""

from __future__ import annotations

import pytest
from modules import KnownBatchModule
from reference_outer import run_and_resume
from runners import assert_close_state

import lightning_fedopt as lf

FACTORIES = {
    # phi_i and the outer momentum m_i differ per replica (replica shards)
    "noloco": lambda: lf.NoLoCoStrategy(sync_every=3, final_sync=False, start_method="fork"),
    # the prox-correction g_hat_i (replica shards) and the round start x^t (checkpoint)
    "fedspeed": lambda: lf.FedSpeedStrategy(sync_every=3, final_sync=False, start_method="fork"),
    # global weights and Nesterov momentum (checkpoint)
    "diloco": lambda: lf.DiLoCoStrategy(sync_every=3, final_sync=False, start_method="fork"),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_mid_round_is_exact(tmp_path, name):
    def module():
        return KnownBatchModule(optimizer="adam", lr=0.01)

    full, resumed, _ = run_and_resume(tmp_path, module, FACTORIES[name], total=11, at=7)
    for r in range(2):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)


def test_noloco_four_ranks_resume_restores_each_replicas_own_state(tmp_path):
    """4 ranks, H=3, checkpoint after step 7 (mid-round 3): the pairs change between rounds 0 and 1,
    so by then phi_i and m_i differ on every rank; each rank must get back its own shard (a
    resume handing every rank rank 0's state, or its pair partner's, diverges at the next round)."""
    import torch

    from lightning_fedopt.strategies.diloco.noloco import pair_groups

    rounds = [sorted(map(sorted, pair_groups(k, 4))) for k in range(2)]
    assert rounds[0] != rounds[1], "the pairing must change for phi_i to differ on all ranks"

    def module():
        return KnownBatchModule(optimizer="adam", lr=0.01)

    full, resumed, path = run_and_resume(tmp_path, module, FACTORIES["noloco"], total=11, at=7, n=4)
    shards = [torch.load(f"{path}.replicas/rank{r}.pt", weights_only=False)["replica"] for r in range(4)]
    for key in ("global", "momentum"):
        for a in range(4):
            for b in range(a + 1, 4):
                diff = max((x - y).abs().max().item() for x, y in zip(shards[a][key], shards[b][key]))
                assert diff > 1e-6, f"{key} of ranks {a} and {b} should differ at step 7"
    for r in range(4):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)
    # the replicas really are distinct at the end too (no final average)
    assert not torch.equal(full[0]["state_dict"]["net.0.weight"], full[3]["state_dict"]["net.0.weight"])
