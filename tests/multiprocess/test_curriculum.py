"""Curriculum ordering of each replica's partition: order, pacing, per-rank independence, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from curriculum_helpers import BATCH, CLASSES, PARTITION, IndexedModule, given_scores, make_data
from lightning.pytorch.callbacks import ModelCheckpoint
from runners import SaveSeen, fit_fork, load_seen, trainer_kwargs
from torch import nn

import lightning_fedopt as lf
from lightning_fedopt.data import Pacing, PartitionSampler, order_by_scores


def expected_batches(
    rank: int, scores: torch.Tensor, ordering: str, pacing: Pacing, steps: int
) -> list[list[int]]:
    """Single-process reconstruction of what rank ``rank`` draws: its own part, its own scores."""
    data = make_data()
    labels = data.tensors[1].numpy()
    sampler = PartitionSampler(data, PARTITION.split(labels, 2), rank, batch_size=BATCH, seed=5)
    order = order_by_scores(scores[sampler.part], ordering)
    sampler.set_curriculum(order, pacing, total_batches=steps)
    return [
        sampler.batch_indices(t // sampler.num_batches, t % sampler.num_batches).tolist()
        for t in range(steps)
    ]


def test_each_rank_orders_only_its_own_partition(tmp_path):
    """2 real processes: each rank's batches equal a single-process reconstruction from its own
    part and its own scores; changing the other rank's scores leaves a rank's order unchanged."""
    steps, pacing = 20, Pacing("linear", a=1.0, b=0.2)
    labels = make_data().tensors[1].numpy()
    part1 = torch.as_tensor(PARTITION.split(labels, 2)[1])

    def run(out: Path, scores: torch.Tensor) -> list[list[list[int]]]:
        cb = lf.callbacks.Curriculum("given", "curriculum", pacing, scores=scores)
        fit_fork(
            out,
            IndexedModule(),
            lf.LocalSGDStrategy(sync_every=4, start_method="fork"),
            callbacks=[cb, SaveSeen(out)],
            max_steps=steps,
        )
        return [r["seen"] for r in load_seen(out, 2)]

    scores = given_scores()
    seen = run(tmp_path / "a", scores)
    for r in range(2):
        assert seen[r] == expected_batches(r, scores, "curriculum", pacing, steps)
    other = scores.clone()
    other[part1] = torch.rand(len(part1), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    seen2 = run(tmp_path / "b", other)
    assert seen2[0] == seen[0]  # rank 0's order depends only on rank 0's samples' scores
    assert seen2[1] != seen[1]
    assert seen2[1] == expected_batches(1, other, "curriculum", pacing, steps)


@pytest.mark.parametrize(
    "mode",
    [
        "mid_epoch",  # step 22 = batch 7 of epoch 1 (15 batches per epoch)
        "last_batch",  # step 15 = the last batch of epoch 0: the re-score of epoch 1 is still due
        "epoch_end",  # on_train_epoch_end checkpoint after epoch 1, then a max_steps run
    ],
)
def test_resume_continues_the_same_order(tmp_path, mode):
    """Local scores differ per rank (each replica's own model), re-scored every epoch; a run resumed
    from a checkpoint draws the batches, and ends with the weights, of the uninterrupted run."""
    total = 40

    def curriculum() -> lf.callbacks.Curriculum:
        return lf.callbacks.Curriculum(
            "local", "anti", "quad", a=0.8, b=0.3, rescore_every=1, total_steps=total
        )

    def strategy() -> lf.LocalSGDStrategy:
        return lf.LocalSGDStrategy(sync_every=5, final_sync=False, start_method="fork")

    full_cb = curriculum()
    fit_fork(
        tmp_path / "full",
        IndexedModule(),
        strategy(),
        callbacks=[full_cb, SaveSeen(tmp_path / "full")],
        max_steps=total,
    )
    if mode == "epoch_end":
        at = 30
        ckpt = ModelCheckpoint(
            dirpath=tmp_path / "ckpt",
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            save_top_k=-1,
            filename="mid",
        )
        first = {"max_epochs": 2, "max_steps": -1}
    else:
        at = 22 if mode == "mid_epoch" else 15
        ckpt = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=at, save_top_k=-1, filename="mid"
        )
        first = {"max_steps": at}
    fit_fork(
        tmp_path / "first",
        IndexedModule(),
        strategy(),
        callbacks=[curriculum(), ckpt, SaveSeen(tmp_path / "first")],
        enable_checkpointing=True,
        **first,
    )
    path = tmp_path / "ckpt" / "mid.ckpt"
    shards = [torch.load(f"{path}.replicas/rank{r}.pt", weights_only=False)["callbacks"] for r in range(2)]
    orders = [next(iter(s.values()))["order"] for s in shards]
    assert not torch.equal(orders[0], orders[1])  # per-rank state, kept in each rank's shard
    resumed_cb = curriculum()
    trainer = L.Trainer(
        strategy=strategy(),
        callbacks=[resumed_cb, SaveSeen(tmp_path / "resumed")],
        **trainer_kwargs(devices=2, max_steps=total),
    )
    trainer.fit(IndexedModule(), ckpt_path=str(path))
    full, head, resumed = (load_seen(tmp_path / d, 2) for d in ("full", "first", "resumed"))
    for r in range(2):
        assert len(head[r]["seen"]) == at and len(resumed[r]["seen"]) == total - at
        assert head[r]["seen"] + resumed[r]["seen"] == full[r]["seen"]
        for k, v in full[r]["state_dict"].items():
            assert torch.equal(resumed[r]["state_dict"][k], v), k


def test_consensus_scores_are_the_averaged_models_losses(tmp_path):
    """score_by='consensus' under Local SGD: at the re-score of epoch 1 (step 15, mid-round for H=4)
    both ranks score with the same averaged model (one all-reduce), each on its own part."""

    class Capture(lf.callbacks.Curriculum):
        def compute_scores(self, trainer, pl_module):
            scores = super().compute_scores(trainer, pl_module)
            state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.captured.append((trainer.global_step, state, scores.clone()))
            return scores

    class Save(L.Callback):
        def __init__(self, cb):
            self.cb = cb

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                local = {k: v.clone() for k, v in pl_module.state_dict().items()}
                torch.save(
                    {"captured": self.cb.captured, "rank": trainer.global_rank},
                    tmp_path / f"cap{trainer.global_rank}.pt",
                )
                torch.save(local, tmp_path / f"local{trainer.global_rank}.pt")

    cb = Capture("consensus", "curriculum", "linear", rescore_every=1)
    cb.captured = []
    fit_fork(
        tmp_path / "run",
        IndexedModule(),
        lf.LocalSGDStrategy(sync_every=4, start_method="fork"),
        callbacks=[cb, Save(cb)],
        max_steps=31,
    )
    caps = [torch.load(tmp_path / f"cap{r}.pt", weights_only=False)["captured"] for r in range(2)]
    data = make_data()
    parts = PARTITION.split(data.tensors[1].numpy(), 2)
    for r in range(2):
        assert [c[0] for c in caps[r]] == [0, 15]
    _, model0, _ = caps[0][1]
    _, model1, _ = caps[1][1]
    for k in model0:
        assert torch.equal(model0[k], model1[k])  # the same (consensus) model on both ranks
    net = nn.Linear(4, CLASSES)
    net.load_state_dict({k.removeprefix("net."): v for k, v in model0.items()})
    for r in range(2):
        idx = torch.as_tensor(parts[r])
        x, y = data.tensors[0][idx], data.tensors[1][idx]
        with torch.no_grad():
            expected = nn.functional.cross_entropy(net(x), y, reduction="none").double()
        torch.testing.assert_close(caps[r][1][2], expected, rtol=1e-6, atol=1e-6)
    # mid-round the replicas differ from the consensus they were scored with
    assert not all(torch.equal(caps[0][0][1][k], caps[0][1][1][k]) for k in model0)


def test_partition_sampler_is_left_in_place_by_lightning(tmp_path):
    """With use_distributed_sampler=True (the default) Lightning keeps the PartitionSampler: each
    rank draws only from its own part."""
    fit_fork(
        tmp_path,
        IndexedModule(),
        lf.LocalSGDStrategy(sync_every=4, start_method="fork"),
        callbacks=[SaveSeen(tmp_path)],
        max_steps=10,
    )
    labels = make_data().tensors[1].numpy()
    parts = PARTITION.split(labels, 2)
    for r, rec in enumerate(load_seen(tmp_path, 2)):
        drawn = np.unique(np.concatenate(rec["seen"]))
        assert set(drawn.tolist()) <= set(parts[r].tolist())
