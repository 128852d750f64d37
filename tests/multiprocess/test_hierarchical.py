"""Hierarchical groups: gradients all-reduced inside a group every step, the algorithm across groups."""

from __future__ import annotations

import pytest
import torch
from modules import KnownBatchModule
from reference_outer import reference_diloco
from runners import assert_close_state, fit_fork

import lightning_fedopt as lf


def test_diloco_and_local_sgd_over_two_groups_of_two(tmp_path):
    """4 ranks, group_size=2: ranks {0,1} and {2,3} are DDP groups; DiLoCo runs between the groups.
    Every rank equals the reference in which a group is one replica stepping on its members' mean
    gradient; Local SGD equals DiLoCo with outer SGD(lr=1) (plain averaging)."""
    members = [[0, 1], [2, 3]]
    ranks = fit_fork(
        tmp_path / "diloco",
        KnownBatchModule(),
        lf.DiLoCoStrategy(sync_every=3, group_size=2, start_method="fork"),
        n=4,
        max_steps=8,
    )
    ref = reference_diloco(2, 8, 3, members=members)
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[0], atol=1e-5)  # final sync: all equal
    for r in range(4):
        # the inner all-reduce runs every step, on the gradients (97 floats), inside the group only
        inner = ranks[r]["comm"]["by_purpose"]["inner"]
        assert inner["rounds"] == 8 and inner["bytes_sent"] == 8 * 97 * 4  # 2 ranks: 2(N-1)/N = 1

    ranks = fit_fork(
        tmp_path / "local",
        KnownBatchModule(),
        lf.LocalSGDStrategy(sync_every=3, group_size=2, final_sync=False, start_method="fork"),
        n=4,
        max_steps=8,
    )
    ref = reference_diloco(
        2, 8, 3, members=members, outer=lambda p: torch.optim.SGD(p, lr=1.0), final_sync=False
    )
    for r in range(4):
        assert_close_state(ranks[r]["state_dict"], ref[r // 2], atol=1e-5)
    assert not torch.equal(ranks[0]["state_dict"]["net.0.weight"], ranks[2]["state_dict"]["net.0.weight"])


@pytest.mark.parametrize("name", ["diloco", "local_sgd"])
def test_two_fits_and_a_validation_with_groups_on_four_ranks(tmp_path, name):
    """One Trainer, ``group_size=2`` on 4 processes: fit, fit again, validate. Every part that lives
    for an entry point is rebuilt (the groups are dropped at each teardown), every rank ends each fit
    with the same weights, and the validation after fit scores the same model on every rank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "tests/scripts/refit_groups.py", str(tmp_path), name],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    for r in range(1, 4):
        assert_close_state(ranks[r]["first"], ranks[0]["first"], atol=0)
        assert_close_state(ranks[r]["second"], ranks[0]["second"], atol=0)
        assert ranks[r]["val"] == ranks[0]["val"]
    for got in ranks:
        assert got["dropped"] and got["outer_world"] == 2
        assert got["steps"] == 6  # the second fit counts its own steps (a new fit, not a resume)
    # the second fit trained on: the model moved
    assert not torch.equal(ranks[0]["first"]["net.0.weight"], ranks[0]["second"]["net.0.weight"])
