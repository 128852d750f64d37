"""Loss-based replica selection in partial-participation rounds (real processes vs a reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from modules import KnownBatchModule
from references import reference_local_sgd
from runners import assert_close_state, fit_fork

import lightning_fedopt as lf
from lightning_fedopt.data import ReplicaSelection


class SaveSelection(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.strategy.selection_history, self.out / f"sel{trainer.global_rank}.pt")


@pytest.mark.parametrize("ordering", ["curriculum", "anti"])
def test_selection_by_loss_matches_reference_on_every_rank(tmp_path, ordering):
    n, steps, h = 3, 12, 3
    selection = ReplicaSelection(ordering, pacing="linear", a=1.0, b=0.3, seed=4)
    strategy = lf.LocalSGDStrategy(
        sync_every=h, participation=2 / 3, selection=selection, start_method="fork"
    )
    ranks = fit_fork(
        tmp_path, KnownBatchModule(), strategy, n=n, max_steps=steps, callbacks=[SaveSelection(tmp_path)]
    )
    histories = [torch.load(tmp_path / f"sel{r}.pt", weights_only=False) for r in range(n)]
    assert histories[0] == histories[1] == histories[2]  # every rank made the same choice
    assert len(histories[0]) == steps // h

    chosen: list[tuple[list[float], list[int]]] = []

    def select(rnd: int, step: int, losses: list[float]) -> list[int]:
        members = selection.select(losses, 2, rnd, step, steps)
        chosen.append((losses, members))
        return members

    ref = reference_local_sgd(n, steps, lf.Periodic(h), select_fn=select)
    for r in range(n):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    for rec, (losses, members) in zip(histories[0], chosen):
        assert rec["participants"] == members
        assert rec["losses"] == pytest.approx(losses, rel=1e-5)
    # at t = 3 of 12 only the 2 lowest-loss (curriculum) / highest-loss (anti) replicas are eligible
    first = histories[0][0]
    ranked = sorted(range(n), key=lambda i: first["losses"][i], reverse=ordering == "anti")
    assert first["participants"] == sorted(ranked[:2])
    # control traffic: one float64 per replica per round, all-gathered
    assert ranks[0]["comm"]["by_purpose"]["control"]["bytes_sent"] >= (steps // h) * 8 * (n - 1)


def test_selection_resumes_mid_round_exactly(tmp_path):
    """The round's running loss and the selection history are in each replica's shard."""
    from reference_outer import run_and_resume

    def strategy():
        sel = ReplicaSelection("anti", pacing="root", a=1.0, b=0.3)
        return lf.LocalSGDStrategy(
            sync_every=3, participation=2 / 3, selection=sel, final_sync=False, start_method="fork"
        )

    full, resumed, _ = run_and_resume(tmp_path, KnownBatchModule, strategy, total=11, at=7, n=3)
    for r in range(3):
        assert_close_state(resumed[r]["state_dict"], full[r]["state_dict"], atol=0.0)
