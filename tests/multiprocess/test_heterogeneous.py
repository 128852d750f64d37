"""Heterogeneous local work: wall-clock-bounded rounds with a deliberately slow rank."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
from modules import KnownBatchModule
from reference_outer import default_outer, local_step, make_replicas, states
from runners import assert_close_state, fit_fork

import lightning_fedopt as lf


class SlowRank(KnownBatchModule):
    """Rank 1 takes ``delay`` seconds longer per training step."""

    def __init__(self, delay: float, **kw) -> None:
        super().__init__(**kw)
        self.delay = delay

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            time.sleep(self.delay)
        return super().training_step(batch, batch_idx)


class SaveHistory(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        torch.save(trainer.strategy.effective_steps_history, self.out / f"hist{trainer.global_rank}.pt")


def reference(history: list[list[int]], sync_every: int, algorithm: str) -> list[dict[str, torch.Tensor]]:
    """Replica r computes the first history[r][j] batches of round j and skips the rest; then
    Local SGD: theta <- phi + mean_k * mean_i (theta_i - phi) / k_i, or DiLoCo: the outer
    optimizer steps on mean_k * mean_i (phi - theta_i) / k_i (replicas with k_i = 0 left out)."""
    n, rounds = len(history), len(history[0])
    nets, opts = make_replicas(n, "sgd", 0.1)
    params = [list(m.parameters()) for m in nets]
    phi = [p.detach().clone() for p in params[0]]
    outer = default_outer(phi) if algorithm == "diloco" else None
    for j in range(rounds):
        for r in range(n):
            for s in range(history[r][j]):
                local_step(nets[r], opts[r], r, j * sync_every + s)
        ok = [r for r in range(n) if history[r][j] > 0]
        tau = sum(history[r][j] for r in ok) / len(ok)
        with torch.no_grad():
            for i in range(len(phi)):
                d = sum((params[r][i] - phi[i]) / history[r][j] for r in ok) / len(ok) * tau
                if outer is None:
                    phi[i] = phi[i] + d
                else:
                    phi[i].grad = -d
        if outer is not None:
            outer.step()
            outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for r in range(n):
                for p, g in zip(params[r], phi):
                    p.copy_(g)
    return states(nets)


@pytest.mark.parametrize("algorithm", ["local_sgd", "diloco"])
def test_slow_rank_contributes_what_it_managed(tmp_path, algorithm):
    """H=6 batches per round, 0.25 s of compute per round; rank 1 needs > 0.1 s a step, so it
    manages at most 3 steps a round while rank 0 (a few ms a step) does more. Each rank equals the
    reference fed with the step counts the ranks recorded."""
    cls = lf.LocalSGDStrategy if algorithm == "local_sgd" else lf.DiLoCoStrategy
    strategy = cls(sync_every=6, round_seconds=0.25, start_method="fork")
    tmp_path.mkdir(exist_ok=True)
    ranks = fit_fork(
        tmp_path / "out", SlowRank(0.1), strategy, max_steps=18, callbacks=[SaveHistory(tmp_path)]
    )
    history = [torch.load(tmp_path / f"hist{r}.pt") for r in range(2)]
    assert len(history[0]) == len(history[1]) == 3
    assert all(1 <= k <= 3 for k in history[1]), history  # the slow rank was cut short, but contributed
    assert all(a > b for a, b in zip(*history)), history  # the fast rank did more
    ref = reference(history, 6, algorithm)
    for r in range(2):
        assert ranks[r]["replica_step"] == 18  # every rank counted every batch of every round
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
