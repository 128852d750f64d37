"""``sync_every="auto"`` on 2 real gloo ranks that compute at different speeds: both take the same H
(the slowest rank's numbers, agreed in one all-reduce), and a resumed run keeps the decisions; the
same for CO2 (the overlapped rule, from the round's transfer time) and streaming DiLoCo (the
fragment schedule's period, changed only at a round's end)."""

from __future__ import annotations

import itertools
import os
import socket
import time
from datetime import timedelta
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from modules import KnownBatchModule
from runners import fit_fork

import lightning_fedopt as lf
from lightning_fedopt.comm import Communicator
from lightning_fedopt.plan import choose_sync_every
from lightning_fedopt.runtime.auto import agree_sync_every
from lightning_fedopt.schedules import streaming_sync_every
from lightning_fedopt.strategies.diloco.fragments import AutoFragmentEvents


class Uneven(KnownBatchModule):
    """Rank 1 takes 20 ms longer per step than rank 0."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            time.sleep(0.02)
        return super().training_step(batch, batch_idx)


class SaveSchedule(L.Callback):
    """Saves each rank's decisions, its last synchronisation's numbers and every measurement
    (the agreed numbers, at the step they were agreed)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.measured: list[tuple[int, float, float, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        last = trainer.strategy.last_sync
        if "sync_every" in last and (not self.measured or self.measured[-1][0] != last["step"]):
            step_s, sync_s = last["measured_step_seconds"], last["measured_sync_seconds"]
            self.measured.append((int(last["step"]), step_s, sync_s, last["sync_every"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        s = trainer.strategy
        torch.save(
            {"decisions": s.schedule.decisions, "last": s.last_sync, "measured": self.measured},
            self.out / f"auto{trainer.global_rank}.pt",
        )


def _same_weights(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["sync_count"] == ranks[1]["sync_count"]
    for k in ranks[0]["state_dict"]:
        assert torch.equal(ranks[0]["state_dict"][k], ranks[1]["state_dict"][k])


def test_ranks_that_measure_different_speeds_choose_the_same_period(tmp_path):
    strategy = lf.DiLoCoStrategy(
        sync_every=lf.AutoSync(budget=0.05, probe=4, low=2, high=40, min_rounds=None), start_method="fork"
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


def test_min_rounds_caps_the_period_on_every_rank(tmp_path):
    """A budget that asks for a long period (0.1%: H ~ 50 or more for a loopback round against
    >= 20 ms steps) on a 64-step run with ``min_rounds=8``: both ranks take H = 64 // 8 = 8 from
    the first measurement, log the ceiling, and end identical."""
    auto = lf.AutoSync(budget=0.001, probe=4, low=2, high=1000, min_rounds=8)
    strategy = lf.DiLoCoStrategy(sync_every=auto, start_method="fork")
    ranks = fit_fork(tmp_path, Uneven(), strategy, max_steps=64, callbacks=[SaveSchedule(tmp_path)])
    got = [torch.load(tmp_path / f"auto{r}.pt", weights_only=False) for r in range(2)]
    assert got[0]["decisions"] == got[1]["decisions"] == [(0, 4), (4, 8)]
    for _step, step_s, sync_s, every in got[0]["measured"]:
        assert every == 8
        assert choose_sync_every(step_s, sync_s, budget=0.001, low=2, high=1000) > 8  # the budget's H
    assert ranks[0]["sync_count"] == 1 + 60 // 8 + 1  # the probe, 7 full rounds, the last 4 steps
    _same_weights(ranks)


def _agree_worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        auto = lf.AutoSync(budget=0.001, probe=4, low=2, high=1000, min_rounds=8)
        # rank 0 knows 64 steps, rank 1 128 (epochs of different lengths); and rank 1 a slower step
        info = agree_sync_every(
            auto,
            Communicator(),
            torch.device("cpu"),
            step=4,
            step_seconds=0.02 * (rank + 1),
            round_seconds=0.001,
            total_steps=64 * (rank + 1),
        )
        torch.save({"decisions": auto.decisions, "info": info}, os.path.join(out, f"agree{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_run_length(tmp_path):
    """Ranks that know different run lengths cap H alike: the largest length any rank knows."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_agree_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    got = [torch.load(tmp_path / f"agree{r}.pt", weights_only=False) for r in range(2)]
    assert got[0]["decisions"] == got[1]["decisions"] == [(0, 4), (4, 16)]  # 128 // 8
    assert got[0]["info"] == got[1]["info"]
    assert got[0]["info"]["sync_every_ceiling"] == 16.0
    assert got[0]["info"]["measured_step_seconds"] == pytest.approx(0.04)


def test_resume_keeps_the_decisions(tmp_path):
    """A checkpoint carries the decisions: the resumed run synchronises at the same steps."""
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}"
    )
    auto = lf.AutoSync(
        budget=0.05, probe=4, low=3, high=7, remeasure_every=None
    )  # one decision, before step 10
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
        sync_every=lf.AutoSync(budget=0.05, probe=4, low=3, high=7, remeasure_every=None), start_method="fork"
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


def test_co2_ranks_choose_the_same_period(tmp_path):
    """CO2 measures a round's transfer time when the round is applied (the next synchronisation),
    so the first decision is at the second synchronisation (step 8); every rank takes the same H,
    on CPU the blocking rule's for the agreed numbers (gloo's all-reduce shares the cores with the
    compute: nothing is surely hidden), and the replicas end identical."""
    auto = lf.AutoSync(budget=0.05, probe=4, low=2, high=40, remeasure_every=2, min_rounds=None)
    strategy = lf.CO2Strategy(sync_every=auto, start_method="fork")
    ranks = fit_fork(tmp_path, Uneven(), strategy, max_steps=30, callbacks=[SaveSchedule(tmp_path)])
    got = [torch.load(tmp_path / f"auto{r}.pt", weights_only=False) for r in range(2)]
    assert got[0]["decisions"] == got[1]["decisions"]
    assert got[0]["measured"] == got[1]["measured"]
    decisions, measured = got[0]["decisions"], got[0]["measured"]
    assert decisions[0] == (0, 4)
    assert measured and measured[0][0] == 8  # the round launched at 4 completed by then
    for _step, step_s, sync_s, every in measured:
        assert step_s >= 0.02 and sync_s >= 0.0  # rank 1's sleep is in the agreed step time
        assert every == choose_sync_every(step_s, sync_s, budget=0.05, low=2, high=40)
    # every change of H is at a synchronisation at which it was measured (a round boundary)
    assert {s for s, _ in decisions[1:]} <= {m[0] for m in measured}
    _same_weights(ranks)


def test_streaming_ranks_choose_the_same_period(tmp_path):
    """Streaming DiLoCo (F = 2, tau = 1): H starts at F (tau + 1) = 4, is measured at the end of the
    first round (step 4) and set from the fragment rounds' transfer time, at least ``low`` = 6; both
    ranks agree and end identical."""
    auto = lf.AutoSync(budget=0.05, probe=4, low=6, high=40, remeasure_every=1, min_rounds=None)
    strategy = lf.DiLoCoStrategy(sync_every=auto, fragments=2, sync_delay=1, start_method="fork")
    assert isinstance(strategy.schedule, AutoFragmentEvents)
    ranks = fit_fork(tmp_path, Uneven(), strategy, max_steps=30, callbacks=[SaveSchedule(tmp_path)])
    got = [torch.load(tmp_path / f"auto{r}.pt", weights_only=False) for r in range(2)]
    assert got[0]["decisions"] == got[1]["decisions"]
    assert got[0]["measured"] == got[1]["measured"]
    decisions, measured = got[0]["decisions"], got[0]["measured"]
    assert decisions[0] == (0, 4) and decisions[1][0] == 4 and 6 <= decisions[1][1] <= 40
    assert measured[0][0] == 4
    for _step, step_s, sync_s, every in measured:
        assert step_s >= 0.02 and sync_s > 0.0
        # on CPU nothing counts as hidden (gloo shares the cores): tau 0 in the rule, H >= F (tau + 1)
        assert every == streaming_sync_every(step_s, sync_s, 2, 0, budget=0.05, low=6, high=40)
    # H changed only at the end of a round of the period before
    for (start, every), (nxt, _) in itertools.pairwise(decisions):
        assert (nxt - start) % every == 0
    _same_weights(ranks)


def test_streaming_resume_keeps_the_decisions(tmp_path):
    """A checkpoint in the middle of a streaming round (a fragment in flight) carries the decisions
    and the round: the resumed run takes the same events and ends with the same weights."""
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}"
    )

    def strategy() -> lf.DiLoCoStrategy:  # low = high: the same H whatever was measured
        auto = lf.AutoSync(budget=0.05, probe=4, low=6, high=6)
        return lf.DiLoCoStrategy(sync_every=auto, fragments=2, sync_delay=1, start_method="fork")

    full_ranks = fit_fork(
        tmp_path / "full",
        KnownBatchModule(),
        strategy(),
        max_steps=22,
        enable_checkpointing=True,
        callbacks=[ckpt, SaveSchedule(tmp_path)],
    )
    full = torch.load(tmp_path / "auto0.pt", weights_only=False)["decisions"]
    assert full == [(0, 4), (4, 6)]  # launches at 7 and 10 (in flight at the checkpoint), 13, 16, ...
    trainer_out = tmp_path / "resumed"
    trainer_out.mkdir()
    from runners import SaveFinal, load_ranks, trainer_kwargs

    trainer = L.Trainer(
        strategy=strategy(),
        callbacks=[SaveFinal(trainer_out), SaveSchedule(trainer_out)],
        **trainer_kwargs(devices=2, max_steps=22, default_root_dir=str(trainer_out)),
    )
    trainer.fit(KnownBatchModule(), ckpt_path=str(tmp_path / "ckpt" / "step=10.ckpt"))
    again = torch.load(trainer_out / "auto0.pt", weights_only=False)["decisions"]
    assert again == full
    resumed = load_ranks(trainer_out, 2)
    assert resumed[0]["sync_count"] == full_ranks[0]["sync_count"]
    for k in full_ranks[0]["state_dict"]:
        assert torch.equal(resumed[0]["state_dict"][k], full_ranks[0]["state_dict"][k]), k
