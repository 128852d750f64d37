"""The data and module of the HardBatchSelection tests (tests/unit/test_hard_batch.py and
tests/multiprocess/test_hard_batch.py): pools of POOL mini-batches of MINI samples."""

from __future__ import annotations

import torch
from modules import IndexRecorder
from torch.utils.data import DataLoader, TensorDataset

N, POOL, MINI = 192, 4, 8


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(N) % 3
    return TensorDataset(torch.randn(N, 4, generator=g), y, torch.arange(N))


class Recorder(IndexRecorder):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_size=POOL * MINI, shuffle=False)
