"""A real task that ships offline: scikit-learn's handwritten digits (1797 8x8 images, 10 classes).

Run it with any registered strategy through Lightning's CLI, e.g.::

    python examples/digits.py fit --trainer.accelerator=cpu --trainer.devices=2 \
        --trainer.strategy=local_sgd --trainer.max_steps=300
    python examples/digits.py fit --trainer.devices=2 --trainer.max_steps=300 \
        --trainer.strategy=lightning_fedopt.LocalSGDStrategy --trainer.strategy.sync_every=16
    # non-IID: every replica sees a Dirichlet(alpha) label skew of the training set
    python examples/digits.py fit --trainer.devices=2 --trainer.strategy=local_sgd --data.alpha=0.3

The data is split once, by seed, into 80% training and 20% validation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_fedopt._validate import check_choice, check_float, check_int


def load_digits_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits as standardised float features, split 80/20 by ``seed``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-3
    x = (x - mean) / std
    to = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]).long())  # noqa: E731
    return to(train), to(val)


class DigitsDataModule(LightningDataModule):
    """Digits train/val loaders; with ``alpha`` each replica gets its own Dirichlet label-skewed part.

    Args:
        batch_size: per-replica batch size.
        seed: split seed.
        alpha: Dirichlet concentration for a non-IID split across replicas (None: IID through
            Lightning's distributed sampler). The split is ``lightning_fedopt.data.Dirichlet`` and
            each rank samples its part with a ``PartitionSampler`` (equal-length, resumable epochs).
        curriculum: always sample through a ``PartitionSampler`` (IID split when ``alpha`` is None),
            as ``lightning_fedopt.callbacks.Curriculum`` needs.
    """

    def __init__(
        self, batch_size: int = 32, seed: int = 0, alpha: float | None = None, curriculum: bool = False
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.alpha = check_float("alpha", alpha, low=0, low_open=True, allow_none=True)
        self.seed, self.curriculum = seed, curriculum

    @override
    def setup(self, stage: str) -> None:
        self.train_set, self.val_set = load_digits_tensors(self.seed)

    @override
    def train_dataloader(self) -> DataLoader:
        from lightning_fedopt.data import IID, Dirichlet, partition_dataloader

        world = self.trainer.world_size if self.trainer is not None else 1
        if (self.alpha is not None and world > 1) or self.curriculum:
            # every rank samples its own part; the parts differ in size, but every replica takes the
            # same number of steps per epoch (the replicas meet at the same steps)
            split = Dirichlet(self.alpha, seed=self.seed) if self.alpha is not None else IID(seed=self.seed)
            return partition_dataloader(
                self.train_set, split, trainer=self.trainer, batch_size=self.batch_size, seed=self.seed
            )
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(LightningModule):
    """An MLP classifier for 8x8 digits (64 -> hidden -> hidden -> 10), AdamW or SGD.

    Args:
        hidden: width of the two hidden layers.
        lr: learning rate.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD's momentum in [0, 1) (0 for DGC's recipe, where the compressor keeps the
            momentum); ignored by AdamW.
        schedule: ``"constant"`` learning rate, or ``"cosine"`` decay to 0 over the run's
            optimizer steps (``Trainer.estimated_stepping_batches``).
    """

    def __init__(
        self,
        hidden: int = 128,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        schedule: str = "constant",
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, ("adamw", "sgd"))
        check_float("momentum", momentum, low=0, high=1, high_open=True)
        check_choice("schedule", schedule, ("constant", "cosine"))
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    @override
    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        if self.hparams.schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main() -> None:
    from lightning.pytorch.cli import LightningCLI

    import lightning_fedopt  # noqa: F401  (registers the strategy names)

    LightningCLI(DigitsClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
