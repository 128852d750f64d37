"""HardBatchSelection: the training step gets the highest-loss candidates of each pool."""

from __future__ import annotations

import torch
from hard_batch_helpers import MINI, POOL, N, Recorder, make_data
from runners import SaveSeen, fit_fork, load_seen
from torch.utils.data import DataLoader

import lightning_fedopt as lf


def test_two_replicas_each_train_on_their_own_hardest_candidates(tmp_path):
    """Under a replica strategy on 2 real processes every rank selects from its own pools."""

    class Parted(Recorder):
        def train_dataloader(self) -> DataLoader:
            return lf.data.partition_dataloader(
                make_data(), lf.data.IID(seed=0), trainer=self.trainer, batch_size=POOL * MINI, shuffle=False
            )

    score = lambda m, b: b[0][:, 0] * 1.0  # noqa: E731
    cb = lf.callbacks.HardBatchSelection(pool=POOL, fraction=0.5, score_fn=score)
    fit_fork(
        tmp_path / "run",
        Parted(),
        lf.LocalSGDStrategy(sync_every=2, start_method="fork"),
        callbacks=[cb, SaveSeen(tmp_path)],
        max_steps=3,
    )
    x = make_data().tensors[0]
    part = lf.data.IID(seed=0).split(N, 2)
    for r, rec in enumerate(load_seen(tmp_path, 2)):
        seen = rec["seen"]
        order = torch.as_tensor(part[r])  # shuffle=False: the part in index order, one pool per step
        for t, got in enumerate(seen):
            pool_idx = order[t * POOL * MINI : (t + 1) * POOL * MINI].view(POOL, MINI)
            kept = torch.sort(torch.argsort(x[pool_idx, 0].mean(1), descending=True)[:2]).values
            assert got == pool_idx[kept].flatten().tolist()
