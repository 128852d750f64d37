"""HardBatchSelection in one process: the training step gets the highest-loss candidates of each
pool (on real processes: tests/multiprocess/test_hard_batch.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hard_batch_helpers import MINI, POOL, Recorder, make_data
from runners import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

import lightning_fedopt as lf


def test_select_hard_batches():
    assert lf.callbacks.select_hard_batches(torch.tensor([0.3, 0.1, 0.7, 0.5]), 2).tolist() == [2, 3]
    assert lf.callbacks.select_hard_batches(torch.tensor([1.0, 1.0, 0.0]), 1).tolist() == [0]


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_training_step_receives_the_hardest_candidates(tmp_path, fraction):
    # a known "loss": the first feature; the kept candidates are those with the highest mean of it
    cb = lf.callbacks.HardBatchSelection(pool=POOL, fraction=fraction, score_fn=lambda m, b: b[0][:, 0] * 1.0)
    module = Recorder()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(
        callbacks=[cb], **trainer_kwargs(devices=1, max_steps=6, logger=logger, log_every_n_steps=1)
    )
    trainer.fit(module)
    x = make_data().tensors[0]
    keep = int(POOL * fraction)
    for t, got in enumerate(module.seen):
        pool_idx = torch.arange(t * POOL * MINI, (t + 1) * POOL * MINI).view(POOL, MINI)
        means = x[pool_idx, 0].mean(1)
        kept = torch.sort(torch.argsort(means, descending=True)[:keep]).values
        assert got == pool_idx[kept].flatten().tolist()
    assert cb.extra_forward_samples == 6 * POOL * MINI
    assert cb.trained_samples == 6 * keep * MINI
    assert cb.history[-1]["hard_batch/extra_forward_ratio"] == pytest.approx(POOL / keep)
    assert cb.history[-1]["hard_batch/selected_loss"] >= cb.history[-1]["hard_batch/pool_loss"]
    assert "hard_batch/extra_forward_seconds" in (Path(logger.log_dir) / "metrics.csv").read_text()
    # the wrapper is gone after fit
    assert "training_step" not in module.__dict__


def test_default_scores_are_the_module_hook_and_weights_change_only_through_kept_samples():
    torch.manual_seed(0)
    cb = lf.callbacks.HardBatchSelection(pool=POOL, fraction=0.5)
    module = Recorder()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    # reference: the hook's per-sample losses pick the candidates, one SGD step on their concatenation
    data = make_data()
    first = [t[: POOL * MINI] for t in data.tensors]
    with torch.no_grad():
        losses = module.score_samples(first).view(POOL, MINI).mean(1)
    kept = torch.sort(torch.argsort(losses, descending=True)[:2]).values
    idx = (kept[:, None] * MINI + torch.arange(MINI)).flatten()
    ref = nn.Linear(4, 3)
    ref.load_state_dict({k.removeprefix("net."): v for k, v in before.items()})
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    nn.functional.cross_entropy(ref(first[0][idx]), first[1][idx]).backward()
    opt.step()
    trainer = L.Trainer(callbacks=[cb], **trainer_kwargs(devices=1, max_steps=1))
    trainer.fit(module)
    assert module.seen[0] == idx.tolist()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(module.state_dict()[f"net.{k}"], v, rtol=0, atol=1e-7)


def test_bad_input():
    with pytest.raises(ValueError, match="pool"):
        lf.callbacks.HardBatchSelection(pool=1)
    with pytest.raises(ValueError, match="fraction"):
        lf.callbacks.HardBatchSelection(fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        lf.callbacks.HardBatchSelection(fraction=1.5)
    with pytest.raises(ValueError, match="fraction"):
        lf.callbacks.HardBatchSelection(fraction=float("nan"))
    with pytest.raises(ValueError, match="pool"):
        lf.callbacks.HardBatchSelection(pool=4.0)

    class Odd(Recorder):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(), batch_size=30)

    trainer = L.Trainer(
        callbacks=[lf.callbacks.HardBatchSelection(pool=4)], **trainer_kwargs(devices=1, max_steps=1)
    )
    with pytest.raises(ValueError, match="multiple of 4"):
        trainer.fit(Odd())
    bad = lf.callbacks.HardBatchSelection(pool=4, score_fn=lambda m, b: torch.zeros(3))
    trainer = L.Trainer(callbacks=[bad], **trainer_kwargs(devices=1, max_steps=1))
    with pytest.raises(ValueError, match="one score per sample"):
        trainer.fit(Recorder())
