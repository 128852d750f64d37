"""The data, scores and module of the curriculum tests (tests/unit/test_curriculum.py and
tests/multiprocess/test_curriculum.py): 240 labelled samples split by PARTITION over the replicas."""

from __future__ import annotations

import torch
from modules import IndexRecorder
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedopt.data import Dirichlet, partition_dataloader

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
