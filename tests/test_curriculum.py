"""Curriculum ordering of each replica's partition: order, pacing, per-rank independence, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from modules import IndexRecorder
from runners import SaveSeen, fit_fork, load_seen, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fedopt as lf
from lightning_fedopt.data import Dirichlet, Pacing, PartitionSampler, order_by_scores, partition_dataloader

N, CLASSES, BATCH = 240, 3, 8
PARTITION = Dirichlet(alpha=0.5, min_size=20, seed=3)


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % CLASSES
    x = torch.randn(N, 4, generator=g) + y[:, None].float()
    return TensorDataset(x, y, torch.arange(N))


def given_scores(seed: int = 0) -> torch.Tensor:
    return torch.rand(N, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)


class IndexedModule(IndexRecorder):
    """Samples this rank's part of PARTITION through a PartitionDataLoader."""

    def __init__(self) -> None:
        super().__init__(classes=CLASSES)
        self.data = make_data()

    def train_dataloader(self) -> DataLoader:
        return partition_dataloader(self.data, PARTITION, trainer=self.trainer, batch_size=BATCH, seed=5)


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


def fit_single(callbacks: list[Any], steps: int = 12) -> IndexedModule:
    module = IndexedModule()
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(devices=1, max_steps=steps))
    trainer.fit(module)
    return module


@pytest.mark.parametrize("ordering", ["curriculum", "anti"])
def test_first_batches_have_the_lowest_or_highest_scores(ordering):
    scores = given_scores()
    cb = lf.callbacks.Curriculum("given", ordering, "linear", a=1.0, b=0.1, scores=scores)
    module = fit_single([cb], steps=12)
    ranked = torch.argsort(scores if ordering == "curriculum" else -scores)
    # pacing: bN = 24 samples visible at t=0, growing by (N - bN)/T = 18 per batch
    for t, batch in enumerate(module.seen[:4]):
        visible = int(N * min(1.0, 0.1 + 0.9 * t / 12))
        allowed = set(ranked[:visible].tolist())
        assert set(batch) <= allowed, (t, visible)
    first = scores[torch.tensor(module.seen[0])].mean()
    assert (first < 0.15) if ordering == "curriculum" else (first > 0.85)
    assert cb.history and cb.history[0]["curriculum/scorings"] == 1.0


def test_local_scores_under_the_module_hook_and_cost_logged(tmp_path):
    cb = lf.callbacks.Curriculum("local", "curriculum", "root", a=0.5, b=0.2, rescore_every=1, batch_size=50)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    module = IndexedModule()
    trainer = L.Trainer(
        callbacks=[cb], **trainer_kwargs(devices=1, max_steps=70, logger=logger, log_every_n_steps=5)
    )
    trainer.fit(module)
    # 30 batches per epoch: scored at the start of epochs 0, 1 and 2, each over the whole part
    assert cb.n_scorings == 3 and cb.score_samples == 3 * N and cb.score_seconds > 0
    with torch.no_grad():  # the last scores are the module's own per-sample losses at that time
        assert cb.scores is not None and cb.scores.shape == (N,)
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "curriculum/score_seconds" in metrics and "curriculum/visible_fraction" in metrics


def test_score_function_with_the_wrong_shape_is_a_clear_error():
    bad = lf.callbacks.Curriculum("local", score_fn=lambda m, b: torch.zeros(len(b[0]), 2))
    with pytest.raises(
        ValueError,
        match=r"shape \(240, 2\) for a batch of 240 samples; it must return one score per sample, shape \(240,\)",
    ):
        fit_single([bad])
    bad2 = lf.callbacks.Curriculum("local", score_fn=lambda m, b: [0.0] * len(b[0]))
    with pytest.raises(ValueError, match="must return a Tensor"):
        fit_single([bad2])


def test_bad_arguments():
    C = lf.callbacks.Curriculum
    with pytest.raises(ValueError, match="score_by"):
        C("loss")
    with pytest.raises(ValueError, match="ordering"):
        C("local", "hard_first")
    with pytest.raises(ValueError, match="pacing"):
        C("local", pacing="cubic")
    with pytest.raises(ValueError, match="pacing parameter `a`"):
        C("local", a=0)
    with pytest.raises(ValueError, match="pacing parameter `b`"):
        C("local", b=1.5)
    with pytest.raises(ValueError, match="rescore_every"):
        C("local", rescore_every=0)
    with pytest.raises(ValueError, match="scores="):
        C("given")
    with pytest.raises(ValueError, match="reference="):
        C("reference")
    with pytest.raises(ValueError, match="total_steps"):
        C("local", total_steps=True)
    with pytest.raises(ValueError, match="batch_size"):
        C("local", batch_size=0)


def test_needs_a_partition_sampler():
    class Plain(IndexedModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=BATCH)

    trainer = L.Trainer(
        callbacks=[lf.callbacks.Curriculum("local")], **trainer_kwargs(devices=1, max_steps=2)
    )
    with pytest.raises(ValueError, match="partition_dataloader"):
        trainer.fit(Plain())


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


def test_reference_scores_and_random_ordering():
    ref = nn.Linear(4, CLASSES)
    torch.manual_seed(7)
    nn.init.normal_(ref.weight)
    data = make_data()
    cb = lf.callbacks.Curriculum(
        "reference",
        "curriculum",
        reference=ref,
        score_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
    )
    fit_single([cb], steps=2)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(
            ref(data.tensors[0]), data.tensors[1], reduction="none"
        ).double()
    torch.testing.assert_close(cb.scores, expected)
    assert torch.equal(cb.order, torch.sort(expected, stable=True).indices)
    rnd = lf.callbacks.Curriculum("given", "random", scores=given_scores(), seed=3)
    fit_single([rnd], steps=2)
    again = lf.callbacks.Curriculum("given", "random", scores=given_scores(), seed=3)
    fit_single([again], steps=2)
    assert torch.equal(rnd.order, again.order)  # deterministic by seed
    assert sorted(rnd.order.tolist()) == list(range(N))
    assert not torch.equal(rnd.order, torch.argsort(given_scores()))


def test_pacing_clock_follows_limit_train_batches():
    """With limit_train_batches the pacing counts the batches really trained, so the visible
    fraction at the last batch is g(T-1), not past saturation."""
    seen: list[float] = []

    class Visible(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            s = cb._sampler
            seen.append(s.visible(s.step_of(trainer.current_epoch, batch_idx)) / len(s.part))

    cb = lf.callbacks.Curriculum("given", "curriculum", "linear", a=1.0, b=0.1, scores=given_scores())
    module = IndexedModule()
    trainer = L.Trainer(
        callbacks=[cb, Visible()],
        **trainer_kwargs(devices=1, max_steps=-1, max_epochs=3, limit_train_batches=5),
    )
    trainer.fit(module)
    assert len(seen) == 15
    assert seen == [pytest.approx(int(N * (0.1 + 0.9 * t / 15)) / N) for t in range(15)]


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


def test_reloaded_loader_is_followed_and_rescored():
    """With reload_dataloaders_every_n_epochs the new loader gets the curriculum (re-scored: new data)."""
    cb = lf.callbacks.Curriculum("local", "curriculum", "linear", a=1.0, b=0.5)
    module = IndexedModule()
    trainer = L.Trainer(
        callbacks=[cb],
        **trainer_kwargs(devices=1, max_steps=-1, max_epochs=3, reload_dataloaders_every_n_epochs=1),
    )
    trainer.fit(module)
    assert cb.n_scorings == 3  # one per loader (rescore_every=None scores a loader once)
    # the pacing clock runs over the whole fit, not per loader
    per_epoch = N // BATCH
    scores = cb.scores
    ranked = torch.argsort(scores)
    last = module.seen[-per_epoch]  # the first batch of the last epoch, drawn under the fresh order
    visible = int(N * min(1.0, 0.5 + 0.5 * (2 * per_epoch) / (3 * per_epoch)))
    assert set(last) <= set(ranked[:visible].tolist())
