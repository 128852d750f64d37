"""SparseLoCo under DiLoCo on 2 real gloo ranks against the single-process reference."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from modules import KnownBatchModule
from reference_outer import reference_diloco
from runners import TIMEOUT, assert_close_state, fit_fork
from sparseloco_reference import RefSparseLoCo, ref_nbytes

import lightning_fedopt as lf
from lightning_fedopt.compression import SparseLoCo


class SaveTotals(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        s = trainer.strategy
        torch.save(
            {"totals": vars(s.compressor.totals).copy(), "ratio": s.compression_ratio},
            self.out / f"totals{trainer.global_rank}.pt",
        )


def test_diloco_with_sparseloco_matches_the_reference(tmp_path):
    """DiLoCoStrategy(compressor=SparseLoCo(...), outer_optimizer="SGD", outer_kwargs={"lr": 1.0})
    on 2 gloo ranks, H=4, 12 steps (three outer rounds): every rank equals single-process DiLoCo
    whose mean pseudo-gradient is the mean of the two reference replicas' SparseLoCo messages, with
    outer SGD without momentum. The net's 1-value bias travels dense (a message would be larger)."""
    cfg = dict(topk=4, chunk=16, beta=0.95)

    def strategy():
        return lf.DiLoCoStrategy(
            sync_every=4,
            compressor=SparseLoCo(**cfg),
            outer_optimizer="SGD",
            outer_kwargs={"lr": 1.0},
            start_method="fork",
            timeout=TIMEOUT,
        )

    ranks = fit_fork(tmp_path, KnownBatchModule(), strategy(), max_steps=12, callbacks=[SaveTotals(tmp_path)])
    replicas = [RefSparseLoCo(cfg["topk"], cfg["chunk"], cfg["beta"]) for _ in range(2)]

    def compress(per_rank, names):
        out = []
        for i, name in enumerate(names):
            shape, n = per_rank[0][i].shape, per_rank[0][i].numel()
            if ref_nbytes(n, cfg["topk"], cfg["chunk"], 2) >= 4 * n:  # dense and exact
                out.append(sum(d[i] for d in per_rank) / 2)
                continue
            sent = [rep.send(name, d[i]) for rep, d in zip(replicas, per_rank)]
            out.append(((sent[0] + sent[1]) / 2).view(shape))
        return out

    ref = reference_diloco(2, 12, 4, outer=lambda p: torch.optim.SGD(p, lr=1.0), compress=compress)
    for r in range(2):
        assert_close_state(ranks[r]["state_dict"], ref[r], atol=1e-5)
    # the compression was real: plain DiLoCo with the same outer SGD ends elsewhere
    plain = reference_diloco(2, 12, 4, outer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert (ref[0]["net.0.weight"] - plain[0]["net.0.weight"]).abs().max() > 1e-4
    # bytes: 3 rounds of 64 + 16 + 16 values as messages (K = 16, 4, 4) and 1 value dense
    per_round = ref_nbytes(64, 4, 16, 2) + 2 * ref_nbytes(16, 4, 16, 2) + 4
    for r in range(2):
        saved = torch.load(tmp_path / f"totals{r}.pt", weights_only=False)
        assert saved["totals"]["raw_bytes"] == 3 * 97 * 4
        assert saved["totals"]["compressed_bytes"] == 3 * per_round == 3 * (52 + 25 + 25 + 4)
        assert saved["ratio"] == pytest.approx(97 * 4 / per_round)
