"""Test modules and data of the multi-process tests: a LightningModule whose batches are known by
(rank, step), so a single-process reference can replay exactly what every replica saw."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader


def make_batch(rank: int, step: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch replica ``rank`` trains on at optimizer step ``step`` (0-based)."""
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + step)
    x = torch.randn(batch_size, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(batch_size, 1, generator=g)
    return x, y


def make_net(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class KnownBatchModule(L.LightningModule):
    """Trains on :func:`make_batch` chosen by (global rank, optimizer step), whatever the loader yields.

    ``nan_at``: (rank, step) at which this module's loss becomes NaN (to poison one replica).
    """

    def __init__(
        self,
        lr: float = 0.1,
        optimizer: str = "sgd",
        seed: int = 0,
        nan_at: tuple[int, int] | None = None,
        init_seed_per_rank: bool = False,
        hidden: int = 16,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.nan_at = lr, optimizer, nan_at
        self.net = make_net(seed, hidden)
        self.init_seed_per_rank = init_seed_per_rank

    def setup(self, stage: str) -> None:
        if self.init_seed_per_rank:  # different initial weights per rank: the strategy must broadcast
            with torch.no_grad():
                for p in self.net.parameters():
                    p.add_(float(self.global_rank + 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = make_batch(self.global_rank, self.global_step)
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.nan_at is not None and (self.global_rank, self.global_step) == tuple(self.nan_at):
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = make_batch(99, batch_idx)
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(64)), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(range(4)), batch_size=1)


class IndexRecorder(L.LightningModule):
    """A linear classifier on ``(x, y, index)`` batches that records the data-set indices of every
    training batch it sees; its ``score_samples`` hook is the per-sample cross-entropy. Subclasses
    provide ``train_dataloader``."""

    def __init__(self, classes: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, classes)
        self.lr = lr
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return nn.functional.cross_entropy(self.net(x), y)

    def score_samples(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
