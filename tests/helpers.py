"""Shared pieces of the multi-process tests: a module with data known by (rank, step), a
single-process reference of the replicas, and a runner that starts real processes over gloo."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from compressed_reference import simulate_all_reduce_compressed  # noqa: F401 (re-exported for the tests)
from torch import nn
from torch.utils.data import DataLoader

TIMEOUT = timedelta(seconds=120)


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


class SaveFinal(L.Callback):
    """Writes what each rank ends with to ``<out>/rank<r>.pt``."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy: Any = trainer.strategy
        stats = getattr(strategy, "comm_stats", None)
        payload = {
            "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "comm": stats.state_dict() if stats is not None else None,
            "replica_step": getattr(strategy, "replica_step", None),
            "sync_count": getattr(strategy, "sync_count", None),
            "nonfinite_events": getattr(strategy, "nonfinite_events", None),
            "global_step": trainer.global_step,
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(payload, self.out / f"rank{trainer.global_rank}.pt")


class CountDistCalls(L.Callback):
    """Counts the real ``torch.distributed`` calls a rank makes between the start and the end of
    training (each function wrapped, then called through), to check that no collective bypasses
    comm.py and that nothing is sent where nothing should be. Writes ``<out>/calls<rank>.pt`` with
    the counts and the rank's comm statistics before and after."""

    NAMES = (
        "broadcast",
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "all_to_all_single",
        "reduce",
        "gather",
        "scatter",
        "barrier",
        "all_gather_object",
        "broadcast_object_list",
        "gather_object",
        "scatter_object_list",
        "batch_isend_irecv",  # (isend/irecv themselves cannot be wrapped: P2POp checks their identity)
        "send",
        "recv",
    )

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        self.calls = dict.fromkeys(self.NAMES, 0)
        self.active = False
        self.originals = {}
        for name in self.NAMES:
            original = getattr(dist, name)
            self.originals[name] = original

            def wrapper(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                if self.active:
                    self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = True
        self.before = trainer.strategy.comm_stats.state_dict()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before the strategy's final synchronisation
        import torch.distributed as dist

        self.active = False
        for name, original in self.originals.items():
            setattr(dist, name, original)
        torch.save(
            {"calls": self.calls, "before": self.before, "after": trainer.strategy.comm_stats.state_dict()},
            self.out / f"calls{trainer.global_rank}.pt",
        )


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


class SaveSeen(L.Callback):
    """Writes each rank's recorded batch indices and final weights to ``<out>/seen<r>.pt``."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"seen": pl_module.seen, "state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()}},
            self.out / f"seen{trainer.global_rank}.pt",
        )


def load_seen(out: str | os.PathLike, n: int) -> list[dict[str, Any]]:
    return [torch.load(Path(out) / f"seen{r}.pt", weights_only=False) for r in range(n)]


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    kw.update(overrides)
    return kw


def load_ranks(out: str | os.PathLike, n: int) -> list[dict[str, Any]]:
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(n)]


def reference_local_sgd(
    n_replicas: int,
    steps: int,
    schedule: Any,
    *,
    lr: float = 0.1,
    seed: int = 0,
    optimizer: str = "sgd",
    nan_at: tuple[int, int] | None = None,
    init_offset: float = 0.0,
    batch_sizes: list[int] | None = None,
    participants_fn: Any = None,
    fedau_cutoff: int | bool | None = False,
    server_lr: float = 1.0,
    average_optimizer_state: bool = False,
    final_average: bool = True,
    select_fn: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """Single-process reference of Local SGD / FedAvg / FedAU on ``n_replicas`` copies.

    Replica ``r`` takes optimizer steps on :func:`make_batch` ``(r, step)``. After each step that
    ``schedule.should_sync`` names, the participants (``participants_fn(round)``, default all)
    are averaged, weighted by the samples they saw since the last average when ``batch_sizes``
    is given (uniform otherwise), or combined by FedAU (``fedau_cutoff`` not False); replicas with
    non-finite weights are left out; everyone continues from the result. At the end, unless the
    last step was a sync, all replicas are averaged once more (the strategy's final sync).
    ``select_fn(round, step, mean_losses)`` chooses the participants from every replica's mean
    training loss in the round instead (loss-based replica selection).
    """
    nets = [make_net(seed) for _ in range(n_replicas)]
    with torch.no_grad():
        for n in nets:
            for p in n.parameters():
                p.add_(init_offset)
    if optimizer == "adam":
        opts = [torch.optim.Adam(n.parameters(), lr=lr) for n in nets]
    else:
        opts = [torch.optim.SGD(n.parameters(), lr=lr) for n in nets]
    params = [list(n.parameters()) for n in nets]
    global_x = [p.detach().clone() for p in params[0]]
    # FedAU bookkeeping, written out independently of the package's FedAUState
    since = [0] * n_replicas
    intervals: list[list[int]] = [[] for _ in range(n_replicas)]
    samples = [0] * n_replicas
    rounds = 0
    synced_last = False
    round_losses: list[list[float]] = [[] for _ in range(n_replicas)]

    def finite(r: int) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params[r])

    def weight(r: int) -> float:
        return float(samples[r]) if batch_sizes is not None and samples[r] > 0 else 1.0

    def average(members: list[int]) -> list[torch.Tensor] | None:
        ok = [r for r in members if finite(r)]
        if not ok:
            return None
        total = sum(weight(r) for r in ok)
        return [sum(params[r][i] * weight(r) for r in ok) / total for i in range(len(params[0]))]

    for step in range(steps):
        for r, (net, opt) in enumerate(zip(nets, opts)):
            x, y = make_batch(r, step)
            loss = nn.functional.mse_loss(net(x), y)
            if nan_at is not None and (r, step) == tuple(nan_at):
                loss = loss * float("nan")
            round_losses[r].append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples[r] += batch_sizes[r] if batch_sizes is not None else 1
        synced_last = False
        if not schedule.should_sync(step + 1):
            continue
        if select_fn is not None:
            means = [sum(v) / len(v) for v in round_losses]
            members = select_fn(rounds, step + 1, means)
        else:
            members = participants_fn(rounds) if participants_fn is not None else list(range(n_replicas))
        round_losses = [[] for _ in range(n_replicas)]
        was_finite = [finite(r) for r in range(n_replicas)]
        with torch.no_grad():
            if fedau_cutoff is not False:
                omega = [sum(iv) / len(iv) if iv else 1.0 for iv in intervals]
                new = [
                    global_x[i]
                    + server_lr
                    / n_replicas
                    * sum(
                        (omega[r] * (params[r][i] - global_x[i]) for r in members if was_finite[r]),
                        torch.zeros(()),
                    )
                    for i in range(len(global_x))
                ]
                for r in range(n_replicas):
                    if r in members:
                        intervals[r].append(since[r] + 1)
                        since[r] = 0
                    else:
                        since[r] += 1
                        if fedau_cutoff is not None and since[r] >= fedau_cutoff:
                            intervals[r].append(since[r])
                            since[r] = 0
            else:
                # nobody took part: everyone restarts from the last round's result
                new = average(members) if members else [g.clone() for g in global_x]
                assert new is not None
            if average_optimizer_state:
                ok = [r for r in members if was_finite[r]]
                for i in range(len(params[0])):
                    states = [opts[r].state[params[r][i]] for r in ok]
                    for key in states[0]:
                        mean = sum(s[key] for s in states) / len(states)
                        for r in range(n_replicas):
                            opts[r].state[params[r][i]][key] = mean.clone()
            for r in range(n_replicas):
                for p, v in zip(params[r], new):
                    p.copy_(v)
                if not was_finite[r]:
                    opts[r].state.clear()
            global_x = [v.clone() for v in new]
        rounds += 1
        samples = [0] * n_replicas
        synced_last = True
    if final_average and not synced_last:
        new = average(list(range(n_replicas)))
        with torch.no_grad():
            for r in range(n_replicas):
                for p, v in zip(params[r], new):
                    p.copy_(v)
    return [{f"net.{k}": v.detach().clone() for k, v in n.state_dict().items()} for n in nets]


def assert_close_state(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6
) -> None:
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for k in expected:
        diff = (actual[k].float() - expected[k].float()).abs().max().item()
        assert diff <= atol, f"{k}: max |diff| = {diff:.3g} > {atol}"


def fit_fork(
    out: str | os.PathLike,
    module: L.LightningModule,
    strategy: Any,
    n: int = 2,
    callbacks: list[Any] | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Fit ``module`` on ``n`` real processes (fork start method, gloo) and return what each rank ended with."""
    trainer = L.Trainer(
        strategy=strategy, callbacks=[*(callbacks or []), SaveFinal(out)], **trainer_kwargs(devices=n, **kw)
    )
    trainer.fit(module)
    return load_ranks(out, n)
