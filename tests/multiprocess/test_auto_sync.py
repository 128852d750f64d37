"""``sync_every="auto"`` on 2 real gloo ranks that compute at different speeds: both take the same H
(the slowest rank's numbers, agreed in one all-reduce), and a resumed run keeps the decisions."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from modules import KnownBatchModule
from runners import fit_fork

import lightning_fedopt as lf
from lightning_fedopt.plan import choose_sync_every


class Uneven(KnownBatchModule):
    """Rank 1 takes 20 ms longer per step than rank 0."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            time.sleep(0.02)
        return super().training_step(batch, batch_idx)


class SaveSchedule(L.Callback):
    def __init__(self, out: Any) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        s = trainer.strategy
        torch.save(
            {"decisions": s.schedule.decisions, "last": s.last_sync},
            self.out / f"auto{trainer.global_rank}.pt",
        )


def test_ranks_that_measure_different_speeds_choose_the_same_period(tmp_path):
    strategy = lf.DiLoCoStrategy(
        sync_every=lf.AutoSync(budget=0.05, probe=4, low=2, high=40), start_method="fork"
    )
    ranks = fit_fork(tmp_path, Uneven(), strategy, max_steps=30, callbacks=[SaveSchedule(tmp_path)])
    got = [torch.load(tmp_path / f"auto{r}.pt", weights_only=False) for r in range(2)]
    assert got[0]["decisions"] == got[1]["decisions"]
    assert got[0]["decisions"][0] == (0, 4) and len(got[0]["decisions"]) == 2
    start, every = got[0]["decisions"][1]
    assert start == 4 and 2 <= every <= 40
    # the slowest rank's compute time (rank 1: >= 20 ms a step) decided it
    assert ranks[0]["sync_count"] == ranks[1]["sync_count"]
    for k in ranks[0]["state_dict"]:
        assert torch.equal(ranks[0]["state_dict"][k], ranks[1]["state_dict"][k])


def test_resume_keeps_the_decisions(tmp_path):
    """A checkpoint carries the decisions: the resumed run synchronises at the same steps."""
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}"
    )
    auto = lf.AutoSync(budget=0.05, probe=4, low=3, high=7)
    fit_fork(
        tmp_path / "full",
        KnownBatchModule(),
        lf.LocalSGDStrategy(sync_every=auto, start_method="fork"),
        max_steps=20,
        enable_checkpointing=True,
        callbacks=[ckpt, SaveSchedule(tmp_path)],
    )
    full = torch.load(tmp_path / "auto0.pt", weights_only=False)["decisions"]
    assert len(full) == 2
    resumed = lf.LocalSGDStrategy(
        sync_every=lf.AutoSync(budget=0.05, probe=4, low=3, high=7), start_method="fork"
    )
    trainer_out = tmp_path / "resumed"
    trainer_out.mkdir()
    from runners import SaveFinal, trainer_kwargs

    trainer = L.Trainer(
        strategy=resumed,
        callbacks=[SaveFinal(trainer_out), SaveSchedule(trainer_out)],
        **trainer_kwargs(devices=2, max_steps=20, default_root_dir=str(trainer_out)),
    )
    trainer.fit(KnownBatchModule(), ckpt_path=str(tmp_path / "ckpt" / "step=10.ckpt"))
    again = torch.load(trainer_out / "auto0.pt", weights_only=False)["decisions"]
    assert again == full  # not re-measured: the resumed run keeps the agreed H
    assert choose_sync_every(1.0, 0.0, low=3, high=7) == 3  # (the bounds hold whatever was measured)
