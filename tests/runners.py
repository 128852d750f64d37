"""Running the multi-process tests: real processes over gloo (fork), what each rank ended with, and
callbacks that record it (final state, seen samples, real ``torch.distributed`` calls, the
CommunicationMonitor's history)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_fedopt.callbacks import CommunicationMonitor

TIMEOUT = timedelta(seconds=120)


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


class KeepHistory(L.Callback):
    """Saves the monitor's rows and (on rank 0) the wandb run summary, per rank."""

    def __init__(self, monitor: CommunicationMonitor, out):
        self.monitor, self.out = monitor, out

    def on_fit_end(self, trainer, pl_module):
        summary = {}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                summary = {k: v for k, v in dict(logger.experiment.summary).items() if k.startswith("comm/")}
                # forked workers leave through os._exit, which skips wandb's own exit hook
                logger.experiment.finish()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"history": self.monitor.history, "summary": summary}, self.out / f"hist{trainer.global_rank}.pt"
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
