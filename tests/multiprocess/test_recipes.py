"""Lightning recipes that must give the right model (issue 16), on real processes (2 gloo ranks):
the last checkpoint and the last validation describe the model ``fit`` returns; validation does
not re-score an unchanged consensus (EarlyStopping); BatchNorm statistics belong to the weights
they are used with; ranks that fall out of step raise a clear error instead of hanging."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from modules import KnownBatchModule, make_batch
from runners import fit_fork
from torch import nn

import lightning_fedopt as lf


def _val_loss(state_dict: dict[str, torch.Tensor], batches: int = 2) -> float:
    """KnownBatchModule's validation loss (batches ``make_batch(99, i)``) of a state dict."""
    module = KnownBatchModule()
    module.load_state_dict(state_dict)
    with torch.no_grad():
        losses = [
            nn.functional.mse_loss(module.net(x), y) for x, y in (make_batch(99, i) for i in range(batches))
        ]
    return float(torch.stack(losses).mean())


class LinearTask(KnownBatchModule):
    """Noise-free linear regression: the validation loss falls with every outer step."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 1))

    @staticmethod
    def task(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
        return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.task(1000 * self.global_rank + self.global_step)
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.task(-1 - batch_idx)
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss, sync_dist=True)
        return loss


class History(L.Callback):
    """Writes ``<out>/history<r>.pt``: (global_step, val_loss) of every validation during fit."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.seen: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.seen, self.out / f"history{trainer.global_rank}.pt")


def co2() -> Any:
    return lf.CO2Strategy(sync_every=8, start_method="fork")


def streaming() -> Any:
    return lf.DiLoCoStrategy(sync_every=8, fragments=2, sync_delay=1, mixing=0.5, start_method="fork")


def diloco() -> Any:
    return lf.DiLoCoStrategy(
        sync_every=8, outer_kwargs={"lr": 1.0, "momentum": 0.0, "nesterov": False}, start_method="fork"
    )


@pytest.mark.parametrize("make", [co2, streaming], ids=["co2", "streaming"])
def test_last_checkpoint_and_last_validation_are_the_returned_model(tmp_path, make):
    """20 steps, H=8: at the last step a round is in flight (CO2) or a fragment is in flight and the
    replicas are mixed (streaming). last.ckpt, the last logged val_loss and the module after fit
    must all be the same model (before: the final outer step ran after the checkpoint was saved)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    ranks = fit_fork(
        tmp_path,
        KnownBatchModule(),
        make(),
        callbacks=[ckpt],
        max_steps=20,
        val_check_interval=10,
        limit_val_batches=2,
        enable_checkpointing=True,
    )
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20
    for r in range(2):
        returned = ranks[r]["state_dict"]
        for k, v in returned.items():
            assert torch.equal(last["state_dict"][k], v), k
        assert ranks[r]["callback_metrics"]["val_loss"] == pytest.approx(_val_loss(returned), rel=1e-5)


@pytest.mark.parametrize(("make", "earliest"), [(diloco, 15), (co2, 10)], ids=["diloco", "co2"])
def test_early_stopping_sees_only_changed_models(tmp_path, make, earliest):
    """H=8, validation every 5 steps, EarlyStopping(patience=1): a validation between two outer
    steps scores the same consensus again, and EarlyStopping used to stop on that repeat (DiLoCo at
    step 15, CO2 at step 10 on the initial model's loss). Now such a validation is skipped: every
    validation scores a new model, and training goes on past that point."""
    history = History(tmp_path)
    ranks = fit_fork(
        tmp_path,
        LinearTask(),
        make(),
        callbacks=[EarlyStopping(monitor="val_loss", patience=1), history],
        max_steps=40,
        val_check_interval=5,
        limit_val_batches=2,
    )
    seen = torch.load(tmp_path / "history0.pt", weights_only=True)
    losses = [loss for _, loss in seen]
    assert len(set(losses)) == len(losses), seen  # no model scored twice
    assert ranks[0]["global_step"] > earliest, seen
    if ranks[0]["global_step"] < 40:
        # stopped by EarlyStopping (not foreseeable): the returned model is the one last validated
        model = LinearTask()
        model.load_state_dict(ranks[0]["state_dict"])
        with torch.no_grad():
            val = [nn.functional.mse_loss(model.net(x), y) for x, y in map(LinearTask.task, (-1, -2))]
        assert float(torch.stack(val).mean()) == pytest.approx(losses[-1], rel=1e-5)


def _bn_data(n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs from one distribution; targets of two tasks interleaved, so that with the distributed
    sampler's split (rank r: indices r, r + 2, ...) the replicas' weights drift apart."""
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(n, 4, generator=g) + 2.0
    y = torch.sin(x @ torch.tensor([[0.5], [-1.0], [0.25], [0.75]]))
    y[1::2] = torch.cos(x[1::2] @ torch.tensor([[-1.0], [0.5], [1.0], [0.25]]))
    return x, y


class BNNet(L.LightningModule):
    """Linear-BatchNorm1d-ReLU-Linear on synthetic regression data given as (x, y) batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_bn_data()), batch_size=32)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*_bn_data(256, seed=1)), batch_size=64
        )


def _eval_loss(state: dict[str, torch.Tensor], reestimate: bool) -> float:
    """Eval-mode validation loss of ``state``; with ``reestimate`` its BatchNorm statistics are
    first re-estimated (cumulative average) on 512 training samples."""
    model = BNNet()
    model.load_state_dict(state)
    bn = model.net[1]
    if reestimate:
        bn.reset_running_stats()
        bn.momentum = None
        model.train()
        with torch.no_grad():
            for x in _bn_data()[0][:512].split(64):
                model(x)
    model.eval()
    x, y = _bn_data(256, seed=1)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize(
    "make",
    [
        lambda: lf.DiLoCoStrategy(sync_every=8, start_method="fork"),
        lambda: lf.CO2Strategy(sync_every=8, start_method="fork"),
        lambda: lf.NoLoCoStrategy(sync_every=8, outer_momentum=0.9, start_method="fork"),
    ],
    ids=["diloco", "co2", "noloco"],
)
def test_batchnorm_statistics_belong_to_the_consensus_weights(tmp_path, make):
    """The model fit returns (and its last validation) in eval mode scores as well as the same
    weights with their statistics freshly re-estimated: the statistics belong to the weights."""
    ranks = fit_fork(tmp_path, BNNet(), make(), max_steps=-1, max_epochs=2, limit_val_batches=2)
    for r in range(2):
        state = ranks[r]["state_dict"]
        fresh = _eval_loss(state, reestimate=True)
        held = _eval_loss(state, reestimate=False)
        assert held == pytest.approx(fresh, rel=0.05), (held, fresh)
    assert ranks[0]["callback_metrics"]["val_loss"] == pytest.approx(
        _eval_loss(ranks[0]["state_dict"], False), rel=1e-4
    )


class UnevenEpochs(KnownBatchModule):
    """Rank 0's loader has 10 batches, rank 1's 7 (no distributed sampler)."""

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(list(range(10 if self.global_rank == 0 else 7)), batch_size=1)


class SkipsAStep(KnownBatchModule):
    """Manual optimization; rank 1 does not step its optimizer in batch 2."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = make_batch(self.global_rank, batch_idx)
        loss = nn.functional.mse_loss(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        if not (self.global_rank == 1 and batch_idx == 2):
            opt.step()

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(list(range(10)), batch_size=1)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            UnevenEpochs,
            [
                "rank 0 after step 7, about to synchronise",
                "rank 1 after step 7, at the start of a validation",
            ],
        ),
        (
            SkipsAStep,
            [
                "rank 0 after step 10, at the start of a validation",
                "rank 1 after step 9, at the start of a validation",
            ],
        ),
    ],
    ids=["uneven_epochs", "manual_skip"],
)
def test_ranks_out_of_step_raise_a_clear_error(tmp_path, module, expected):
    """Ranks that fall out of step (10 vs 7 batches per epoch; one rank skipping an optimizer step
    under manual optimization) used to wait for each other in different collectives until the
    process-group timeout (30 minutes by default); now every rank raises at the next meeting point,
    naming each rank's step and where it is."""
    strategy = lf.DiLoCoStrategy(sync_every=4, start_method="fork", timeout=timedelta(seconds=30))
    start = time.monotonic()
    with pytest.raises(Exception, match="out of step") as err:
        fit_fork(
            tmp_path,
            module(),
            strategy,
            max_steps=-1,
            max_epochs=2,
            limit_val_batches=2,
            use_distributed_sampler=False,
        )
    assert time.monotonic() - start < 25, "it waited for the timeout"
    for part in expected:
        assert part in str(err.value), str(err.value)
