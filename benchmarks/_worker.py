"""Inside a worker process: the digits model and data under one strategy, and what is recorded.

Only worker processes import this module (it imports Lightning): :func:`train` is what
``python -m benchmarks.<suite> --worker <name>`` runs, :func:`digits_trainer` the ``Trainer`` every
benchmark builds (one thread, seeded, no logger/checkpoints/progress bar, validation every
``val_every`` optimizer steps), :class:`Recorder` the callback that records validation rows,
traffic and the time of every step, :class:`ValLossRecorder` the one that records only the
validation loss.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from typing_extensions import override

import lightning_fedopt  # noqa: F401  (the package's import side effects, as a user would have them)
from benchmarks.harness import REFERENCE_DESCRIPTION, REFERENCES, Suite
from examples.digits import DigitsClassifier, DigitsDataModule

__all__ = [
    "Recorder",
    "ValLossRecorder",
    "digits_trainer",
    "one_thread",
    "sync_marker",
    "train",
    "train_module",
]


def one_thread() -> None:
    """One torch thread in this process (and its ranks: Lightning's launcher would otherwise set
    cores / ranks threads from ``OMP_NUM_THREADS``)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def digits_trainer(
    *,
    strategy: Any,
    devices: int,
    steps: int,
    val_every: int,
    callbacks: Sequence[Callback],
    root: str,
    **kwargs: Any,
) -> L.Trainer:
    """The benchmarks' ``Trainer``: CPU, deterministic, validation every ``val_every`` optimizer
    steps (no sanity check), no logger, checkpoints, progress bar or model summary; ``kwargs`` on top."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
        **{"enable_checkpointing": False, **kwargs},
    )


def sync_marker(strategy: Any) -> int:
    """A number that changes whenever the strategy synchronises (replica syncs, DDP all-reduces)."""
    count = getattr(strategy, "sync_count", None)
    if count is not None:
        return int(count)
    stats = getattr(strategy, "comm_stats", None)
    return int(stats.purpose("sync").rounds) if stats is not None else 0


def _traffic(strategy: Any) -> dict[str, Any]:
    """Bytes and rounds this rank has sent so far (all zero for a strategy that counts nothing)."""
    stats = getattr(strategy, "comm_stats", None)
    if stats is None:
        return {"bytes_sent": 0, "sync_bytes_sent": 0, "rounds": 0, "bytes_source": "none"}
    return {
        "bytes_sent": int(stats.bytes_sent),
        "sync_bytes_sent": int(stats.purpose("sync").bytes_sent),
        "rounds": int(stats.rounds),
        "bytes_source": getattr(strategy, "bytes_source", "counted"),
        "by_purpose": {k: int(v.bytes_sent) for k, v in stats.by_purpose.items()},
    }


def _wait_for_copies(barrier: str, copies: int, index: int, timeout: float = 300.0) -> None:
    """File barrier: the independent ``single_par`` copies start training together."""
    Path(barrier, f"ready.{index}").touch()
    deadline = time.monotonic() + timeout
    while len(list(Path(barrier).glob("ready.*"))) < copies:
        if time.monotonic() > deadline:
            raise TimeoutError(f"single_par: only some of the {copies} copies started within {timeout}s")
        time.sleep(0.001)


class Recorder(Callback):
    """Records validation rows, traffic and the time of every training step (on every rank).

    Args:
        name: the row's name, written into every validation row.
        barrier: ``(folder, copies, index)``: wait at this file barrier before training (the
            ``single_par`` copies start together); ``None``: start at once.
    """

    def __init__(self, name: str, barrier: tuple[str, int, int] | None = None) -> None:
        self.name = name
        self.barrier = barrier
        self.rows: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self._tb = 0.0
        self._cb = 0.0
        self._tv = 0.0
        self._te: float | None = None
        self._gap: float | None = None
        self.val_s = 0.0
        self._val_s_at_end = 0.0
        self._marker = 0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.barrier is not None:
            _wait_for_copies(*self.barrier)
            self.t0 = time.perf_counter()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tv = time.perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._marker = sync_marker(trainer.strategy)
        self._cb = time.thread_time()
        self._tb = time.perf_counter()
        # loop time between two steps (data loading, Lightning's per-step broadcast), validation excluded
        self._gap = None if self._te is None else self._tb - self._te - (self.val_s - self._val_s_at_end)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._te = time.perf_counter()
        self._val_s_at_end = self.val_s
        seconds = self._te - self._tb
        cpu = time.thread_time() - self._cb  # CPU time of this (the training) thread
        synced = sync_marker(trainer.strategy) != self._marker
        self.steps.append(
            {
                "step": int(trainer.global_step),
                "seconds": seconds,
                "cpu_seconds": cpu,
                "gap_seconds": self._gap,
                "sync": int(synced),
            }
        )

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_s += time.perf_counter() - self._tv
        m = trainer.callback_metrics
        traffic = _traffic(trainer.strategy)
        traffic.pop("by_purpose", None)
        # the digits model logs val_acc, the language model val_bpb: record whichever is there
        extra = {k: float(m[k]) for k in ("val_acc", "val_bpb") if k in m}
        self.rows.append(
            {
                "strategy": self.name,
                "step": int(trainer.global_step),
                "val_loss": float(m["val_loss"]),
                **extra,
                **traffic,
                "wall_s": time.perf_counter() - self.t0,
                "train_s": sum(s["seconds"] for s in self.steps),
                "val_s": self.val_s,
            }
        )

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final = {
            "wall_s": time.perf_counter() - self.t0,
            "step": int(trainer.global_step),
            "sync_count": sync_marker(trainer.strategy),
            **_traffic(trainer.strategy),
        }


class ValLossRecorder(Callback):
    """Records ``{"step", "val_loss"}`` at every validation (sanity checks excepted) in :attr:`rows`."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.rows.append(
            {"step": trainer.global_step, "val_loss": float(trainer.callback_metrics["val_loss"])}
        )


def train(args: argparse.Namespace, suite: Suite) -> None:
    """Train the row ``args.worker`` of ``suite`` (or a reference) on the digits task; rank 0
    writes ``args.out`` (JSON)."""

    def model() -> L.LightningModule:
        return DigitsClassifier(
            **{"hidden": args.hidden, "lr": args.lr, **suite.model_kwargs.get(args.worker, {})}
        )

    def data() -> L.LightningDataModule:
        return DigitsDataModule(batch_size=args.batch_size, seed=args.seed, alpha=args.alpha)

    # a non-IID split gives each rank its own part: no distributed sampler then
    train_module(args, suite, model, data, use_distributed_sampler=args.alpha is None)


def train_module(
    args: argparse.Namespace,
    suite: Suite,
    make_model: Callable[[], L.LightningModule],
    make_data: Callable[[], L.LightningDataModule],
    **trainer_kwargs: Any,
) -> None:
    """Train the row ``args.worker`` of ``suite`` (or a reference) on the module and data the two
    factories build (called after seeding, in this order); ``trainer_kwargs`` go to
    :func:`digits_trainer`. Rank 0 writes ``args.out`` (JSON)."""
    one_thread()
    name = args.worker
    L.seed_everything(args.seed, workers=True, verbose=False)
    if name in REFERENCES:
        strategy: Any = "auto"
        devices, num_nodes = 1, 1
        description = REFERENCE_DESCRIPTION[name]
    else:
        description, factory = suite.row(name)
        strategy = factory()
        devices, num_nodes = args.devices, args.nodes
    barrier = (args.barrier, args.copies, args.copy_index) if args.barrier else None
    recorder = Recorder(name, barrier)
    with tempfile.TemporaryDirectory(prefix="fedopt-bench-") as root:
        trainer = digits_trainer(
            strategy=strategy,
            devices=devices,
            steps=args.steps,
            val_every=args.val_every,
            callbacks=[recorder],
            root=root,
            num_nodes=num_nodes,
            **trainer_kwargs,
        )
        model = make_model()
        trainer.fit(model, make_data())
    if trainer.is_global_zero:
        result = {
            "strategy": name,
            "description": description,
            "world_size": trainer.world_size,
            "n_params": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(),
            "rows": recorder.rows,
            "steps": recorder.steps,
            "final": recorder.final,
        }
        Path(args.out).write_text(json.dumps(result))
    # the baselines run Lightning's own DDPStrategy, which leaves the gloo group alive: tear it down
    # here, or the process can abort at interpreter exit (lightning_fedopt's strategies do it at exit)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
