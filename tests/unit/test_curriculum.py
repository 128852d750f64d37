"""Curriculum ordering of a partition in one process: order, pacing, scores, reloaded loaders,
argument checks (per-rank independence and resume: tests/multiprocess/test_curriculum.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from curriculum_helpers import BATCH, CLASSES, IndexedModule, N, given_scores, make_data
from runners import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

import lightning_fedopt as lf


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
